"""Pallas (Triton backend) GPU kernels for quantized matmuls; depends on jax only.

Each kernel runs natively on a CUDA GPU and in interpret mode elsewhere (``interpret=None``
picks). ``jqx.ops`` imports this package lazily; whether a kernel runs is decided in
:mod:`jqx.ops.dispatch` (docs/internals/dispatch.md).
"""

from .fp8_matmul import fp8_matmul as fp8_matmul
from .fp8_matmul import fp8_matmul_reference as fp8_matmul_reference
from .int8_matmul import int8_matmul as int8_matmul
from .int8_matmul import int8_matmul_dynamic as int8_matmul_dynamic
from .int8_matmul import (
    int8_matmul_dynamic_reference as int8_matmul_dynamic_reference,
)
from .int8_matmul import int8_matmul_reference as int8_matmul_reference
from .int8_matmul import quantize_rows as quantize_rows
from .int8_matmul import quantize_rows_reference as quantize_rows_reference
from .w4a16_matmul import dequantize_w4 as dequantize_w4
from .w4a16_matmul import w4a16_matmul as w4a16_matmul
from .w4a16_matmul import w4a16_matmul_reference as w4a16_matmul_reference

__all__ = [
    "dequantize_w4",
    "fp8_matmul",
    "fp8_matmul_reference",
    "int8_matmul",
    "int8_matmul_dynamic",
    "int8_matmul_dynamic_reference",
    "int8_matmul_reference",
    "quantize_rows",
    "quantize_rows_reference",
    "w4a16_matmul",
    "w4a16_matmul_reference",
]

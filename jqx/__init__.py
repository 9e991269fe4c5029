"""jqx: quantization for JAX.

Example:
    >>> import jax.numpy as jnp, jqx
    >>> q = jqx.quantize({"kernel": jnp.ones((16, 8))}, jqx.int8_weight_only())
    >>> jqx.tree_nbytes(q) < 16 * 8 * 4
    True
"""

from jqx import formats, native, ops, sharding, transform
from jqx.algorithms.awq import awq
from jqx.algorithms.gptq import gptq
from jqx.algorithms.hqq import hqq
from jqx.algorithms.llm_int8 import llm_int8_matmul
from jqx.algorithms.smoothquant import smoothquant
from jqx.calibrate import calibrate
from jqx.formats import Format
from jqx.qarray import ActSpec, QArray, is_qarray
from jqx.quantize import (
    Granularity,
    compute_scale,
    dequantize_array,
    fake_quant,
    per_block,
    per_channel,
    per_group,
    per_tensor,
    per_token,
    quantize_activation,
    quantize_array,
)
from jqx.recipes import (
    Recipe,
    fp4_weight_only,
    fp8_dynamic_activation_fp8_weight,
    fp8_weight_only,
    int4_weight_only,
    int8_dynamic_activation_int8_weight,
    int8_static_activation_int8_weight,
    int8_weight_only,
    llm_int8,
    nf4_weight_only,
    weight_only,
)
from jqx.report import report
from jqx.sharding import shard
from jqx.training import fp8, mixed_precision, qat
from jqx.transform import quantized
from jqx.tree import dequantize, quantize, summary, tree_nbytes

__version__ = "0.1.0"

__all__ = [
    "formats",
    "native",
    "Format",
    "ActSpec",
    "QArray",
    "is_qarray",
    "Granularity",
    "compute_scale",
    "dequantize_array",
    "fake_quant",
    "per_block",
    "per_channel",
    "per_group",
    "per_tensor",
    "per_token",
    "quantize_activation",
    "quantize_array",
    "Recipe",
    "fp4_weight_only",
    "fp8_dynamic_activation_fp8_weight",
    "fp8_weight_only",
    "int4_weight_only",
    "int8_dynamic_activation_int8_weight",
    "int8_static_activation_int8_weight",
    "int8_weight_only",
    "llm_int8",
    "nf4_weight_only",
    "weight_only",
    "report",
    "calibrate",
    "sharding",
    "shard",
    "mixed_precision",
    "qat",
    "fp8",
    "dequantize",
    "quantize",
    "summary",
    "tree_nbytes",
    "ops",
    "transform",
    "quantized",
    "awq",
    "gptq",
    "hqq",
    "llm_int8_matmul",
    "smoothquant",
]

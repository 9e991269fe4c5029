"""jqx: quantization for JAX.

Example:
    >>> import jax.numpy as jnp, jqx
    >>> q = jqx.quantize({"kernel": jnp.ones((16, 8))}, jqx.int8_weight_only())
    >>> jqx.tree_nbytes(q) < 16 * 8 * 4
    True
"""

from jqx import formats
from jqx.formats import Format
from jqx.qarray import ActSpec
from jqx.qarray import QArray
from jqx.qarray import is_qarray
from jqx.quantize import Granularity
from jqx.quantize import compute_scale
from jqx.quantize import dequantize_array
from jqx.quantize import fake_quant
from jqx.quantize import per_block
from jqx.quantize import per_channel
from jqx.quantize import per_group
from jqx.quantize import per_tensor
from jqx.quantize import per_token
from jqx.quantize import quantize_activation
from jqx.quantize import quantize_array
from jqx.recipes import Recipe
from jqx.recipes import fp4_weight_only
from jqx.recipes import fp8_dynamic_activation_fp8_weight
from jqx.recipes import fp8_weight_only
from jqx.recipes import int4_weight_only
from jqx.recipes import int8_dynamic_activation_int8_weight
from jqx.recipes import int8_static_activation_int8_weight
from jqx.recipes import int8_weight_only
from jqx.recipes import llm_int8
from jqx.recipes import nf4_weight_only
from jqx.recipes import weight_only
from jqx.algorithms.awq import awq
from jqx.algorithms.gptq import gptq
from jqx.algorithms.hqq import hqq
from jqx.algorithms.llm_int8 import llm_int8_matmul
from jqx.algorithms.smoothquant import smoothquant
from jqx.report import report
from jqx.calibrate import calibrate
from jqx import sharding
from jqx.sharding import shard
from jqx.training import mixed_precision
from jqx.training import qat
from jqx.training import fp8
from jqx.tree import dequantize
from jqx.tree import quantize
from jqx.tree import summary
from jqx.tree import tree_nbytes
from jqx import ops
from jqx import transform
from jqx.transform import quantized

__version__ = "0.1.0"

__all__ = [
    "formats",
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

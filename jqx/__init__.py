"""jqx: quantization for JAX.

One public namespace: every public name is re-exported here, one per line.
``import jqx`` needs only jax, jaxlib, ml_dtypes and numpy; the parts that
need an extra (``jqx.flax`` needs flax, ``jqx.mixed_precision`` needs optax)
load on first use. The packages follow the layers of
``docs/internals/layout.md``.

Example:
    >>> import jax.numpy as jnp, jqx
    >>> q = jqx.quantize({"kernel": jnp.ones((16, 8))}, jqx.int8_weight_only())
    >>> jqx.tree_nbytes(q) < 16 * 8 * 4
    True
"""

import importlib as _importlib

# First, before anything imports jax: applies JQX_REUSE_HOST_MEMORY=1 (docs/guide/run.md).
from jqx.kernels.cpu import host_memory as _host_memory  # noqa: F401  # isort: skip

from jqx import ops as ops
from jqx import transform as transform
from jqx.calibration.allocate import Allocation as Allocation
from jqx.calibration.allocate import allocate as allocate
from jqx.calibration.engine import calibrate as calibrate
from jqx.core import formats as formats
from jqx.core import sharding as sharding
from jqx.core.formats import Format as Format
from jqx.core.mx import quantize_mx as quantize_mx
from jqx.core.mx import quantize_nvfp4 as quantize_nvfp4
from jqx.core.numerics import Granularity as Granularity
from jqx.core.numerics import compute_scale as compute_scale
from jqx.core.numerics import dequantize_array as dequantize_array
from jqx.core.numerics import fake_quant as fake_quant
from jqx.core.numerics import per_block as per_block
from jqx.core.numerics import per_channel as per_channel
from jqx.core.numerics import per_group as per_group
from jqx.core.numerics import per_tensor as per_tensor
from jqx.core.numerics import per_token as per_token
from jqx.core.numerics import quantize_activation as quantize_activation
from jqx.core.numerics import quantize_array as quantize_array
from jqx.core.qarray import ActSpec as ActSpec
from jqx.core.qarray import QArray as QArray
from jqx.core.qarray import is_qarray as is_qarray
from jqx.core.report import report as report
from jqx.core.sharding import shard as shard
from jqx.core.tree import dequantize as dequantize
from jqx.core.tree import path_str as path_str
from jqx.core.tree import summary as summary
from jqx.core.tree import tree_nbytes as tree_nbytes
from jqx.io.checkpoint import CheckpointError as CheckpointError
from jqx.io.checkpoint import load as load
from jqx.io.checkpoint import save as save
from jqx.io.gguf import load as load_gguf
from jqx.kernels.cpu import native as native
from jqx.ops.layout import prepack as prepack
from jqx.ops.layout import quantize as quantize
from jqx.recipes.apply import default_filter as default_filter
from jqx.recipes.awq import AWQ as AWQ
from jqx.recipes.awq import awq as awq
from jqx.recipes.base import RTN as RTN
from jqx.recipes.base import Recipe as Recipe
from jqx.recipes.gptq import GPTQ as GPTQ
from jqx.recipes.gptq import gptq as gptq
from jqx.recipes.hqq import HQQ as HQQ
from jqx.recipes.hqq import hqq as hqq
from jqx.recipes.llm_int8 import llm_int8_matmul as llm_int8_matmul
from jqx.recipes.mx import MX as MX
from jqx.recipes.mx import mx_dynamic_activation_mx_weight as mx_dynamic_activation_mx_weight
from jqx.recipes.mx import mx_weight_only as mx_weight_only
from jqx.recipes.mx import mxfp4_weight_only as mxfp4_weight_only
from jqx.recipes.mx import mxfp8_weight_only as mxfp8_weight_only
from jqx.recipes.mx import nvfp4_weight_only as nvfp4_weight_only
from jqx.recipes.presets import fp4_weight_only as fp4_weight_only
from jqx.recipes.presets import (
    fp8_dynamic_activation_fp8_weight as fp8_dynamic_activation_fp8_weight,
)
from jqx.recipes.presets import fp8_weight_only as fp8_weight_only
from jqx.recipes.presets import int4_weight_only as int4_weight_only
from jqx.recipes.presets import (
    int8_dynamic_activation_int8_weight as int8_dynamic_activation_int8_weight,
)
from jqx.recipes.presets import (
    int8_static_activation_int8_weight as int8_static_activation_int8_weight,
)
from jqx.recipes.presets import int8_weight_only as int8_weight_only
from jqx.recipes.presets import llm_int8 as llm_int8
from jqx.recipes.presets import nf4_weight_only as nf4_weight_only
from jqx.recipes.presets import weight_only as weight_only
from jqx.recipes.smoothquant import SmoothQuant as SmoothQuant
from jqx.recipes.smoothquant import smoothquant as smoothquant
from jqx.training import fp8 as fp8
from jqx.training import qat as qat
from jqx.transform import quantized as quantized

__version__ = "0.1.0"

# Modules that need an extra: loaded on first attribute access.
_LAZY = {
    "flax": "jqx.flax",  # flax
    "mixed_precision": "jqx.training.mixed_precision",  # optax
    "llm": "jqx.llm",  # flax, gguf, tokenizers, jinja2
}
# Functions of those modules re-exported here, also loaded on first access.
_LAZY_FUNCTIONS = {
    "load_llm": "jqx.llm",
    "load_llm_exchange": "jqx.llm.runtime",
}


def __getattr__(name):
    if name in _LAZY:
        mod = _importlib.import_module(_LAZY[name])
        globals()[name] = mod
        return mod
    if name in _LAZY_FUNCTIONS:
        fn = getattr(_importlib.import_module(_LAZY_FUNCTIONS[name]), name)
        globals()[name] = fn
        return fn
    raise AttributeError(f"module 'jqx' has no attribute {name!r}")


__all__ = [
    "AWQ",
    "ActSpec",
    "Allocation",
    "CheckpointError",
    "Format",
    "GPTQ",
    "Granularity",
    "HQQ",
    "MX",
    "QArray",
    "RTN",
    "Recipe",
    "SmoothQuant",
    "allocate",
    "awq",
    "calibrate",
    "compute_scale",
    "default_filter",
    "dequantize",
    "dequantize_array",
    "fake_quant",
    "flax",
    "formats",
    "fp4_weight_only",
    "fp8",
    "fp8_dynamic_activation_fp8_weight",
    "fp8_weight_only",
    "gptq",
    "hqq",
    "int4_weight_only",
    "int8_dynamic_activation_int8_weight",
    "int8_static_activation_int8_weight",
    "int8_weight_only",
    "is_qarray",
    "llm",
    "llm_int8",
    "llm_int8_matmul",
    "load",
    "load_gguf",
    "load_llm",
    "load_llm_exchange",
    "mixed_precision",
    "mx_dynamic_activation_mx_weight",
    "mx_weight_only",
    "mxfp4_weight_only",
    "mxfp8_weight_only",
    "native",
    "nf4_weight_only",
    "nvfp4_weight_only",
    "ops",
    "path_str",
    "per_block",
    "per_channel",
    "per_group",
    "per_tensor",
    "per_token",
    "prepack",
    "qat",
    "quantize",
    "quantize_activation",
    "quantize_array",
    "quantize_mx",
    "quantize_nvfp4",
    "quantized",
    "report",
    "save",
    "shard",
    "sharding",
    "smoothquant",
    "summary",
    "transform",
    "tree_nbytes",
    "weight_only",
]

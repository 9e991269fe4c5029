"""Quantized matmuls: ``jqx.ops.dot_general`` with QArray operands, and the one dispatcher
that picks how each runs.

``dot_general`` computes ``x . dequantize(W)`` (with the weight's activation quantization,
``q.act``, and its ``in_scale``); ``backend=`` and :func:`policy` are the public switches
for how: see docs/internals/dispatch.md.

Example:
    >>> import jax.numpy as jnp, jqx
    >>> w = jqx.int8_weight_only().quantize_weight(jnp.ones((8, 4)))
    >>> DN = (((1,), (0,)), ((), ()))
    >>> jqx.ops.dot_general(jnp.ones((2, 8)), w, DN).tolist()[0]
    [8.0, 8.0, 8.0, 8.0]
"""

from jqx.ops.conv import conv_general_dilated as conv_general_dilated
from jqx.ops.conv import explain_conv as explain_conv
from jqx.ops.dispatch import Policy as Policy
from jqx.ops.dispatch import current_policy as current_policy
from jqx.ops.dispatch import native_status as native_status
from jqx.ops.dispatch import policy as policy
from jqx.ops.gather import take as take
from jqx.ops.layout import prepack as prepack
from jqx.ops.matmul import dot_general as dot_general
from jqx.ops.matmul import dynamic_dot_general as dynamic_dot_general
from jqx.ops.matmul import explain as explain
from jqx.ops.matmul import float_dot_general as float_dot_general
from jqx.ops.matmul import gguf_layout as gguf_layout
from jqx.ops.matmul import mlp as mlp

__all__ = [
    "Policy",
    "conv_general_dilated",
    "current_policy",
    "dot_general",
    "dynamic_dot_general",
    "explain",
    "explain_conv",
    "float_dot_general",
    "gguf_layout",
    "mlp",
    "native_status",
    "policy",
    "prepack",
    "take",
]

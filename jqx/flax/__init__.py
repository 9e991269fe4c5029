"""Flax adapters: quantized layers built on Flax's own injection points.

``jqx.flax.linen`` (Dense, DenseGeneral, Einsum) and ``jqx.flax.nnx``
(Linear, Einsum) are Flax's classes with ``dot_general=`` /
``promote_dtype=`` (and nnx ``einsum_op=``) injected, so a kernel that is a
:class:`jqx.QArray` runs through ``jqx.ops.dot_general``. Parameter names are
Flax's, so ``jqx.quantize(float_params, recipe)`` loads directly.

This package imports flax; the rest of jqx never does.

Example:
    >>> import jax, jax.numpy as jnp, jqx
    >>> import jqx.flax
    >>> layer = jqx.flax.linen.Dense(4)
    >>> p = layer.init(jax.random.key(0), jnp.ones((2, 8)))
    >>> y = layer.apply(jqx.quantize(p, jqx.int8_weight_only()), jnp.ones((2, 8)))
    >>> y.shape
    (2, 4)
"""

from jqx.flax import linen, nnx
from jqx.flax.linen import dot_general, promote_dtype

__all__ = [
    "linen",
    "nnx",
    "dot_general",
    "promote_dtype",
]

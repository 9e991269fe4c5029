"""Quantized flax.nnx layers: ``Linear``, ``Einsum`` and ``Embed``.

``flax.nnx.Linear`` / ``flax.nnx.Einsum`` with ``promote_dtype=`` (nnx passes
one tuple; QArrays pass through), ``dot_general=`` (nnx also passes
``out_sharding=``) and, for Einsum, ``einsum_op=`` injected. Parameter names
are Flax's: split a float model, ``jqx.quantize`` its State, merge it back
(or ``nnx.update``) and call it.

Example:
    >>> import jax.numpy as jnp, jqx
    >>> from flax import nnx
    >>> from jqx.flax import nnx as qnnx
    >>> m = qnnx.Linear(32, 8, rngs=nnx.Rngs(0))
    >>> gdef, state = nnx.split(m)
    >>> qm = nnx.merge(gdef, jqx.quantize(state, jqx.int8_weight_only()))
    >>> qm(jnp.ones((2, 32))).shape
    (2, 8)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx as _nnx

from jqx.flax._inject import (
    einsum,
    embed_attend,
    embed_lookup,
    make_conv_general_dilated,
    make_dot_general,
    promote_dtype_tuple,
)

__all__ = ["Linear", "Conv", "Einsum", "Embed"]


class Linear(_nnx.Linear):
    """``flax.nnx.Linear`` whose ``kernel`` may hold a :class:`jqx.QArray`.

    Takes Flax's arguments, plus ``backend`` (``jqx.ops`` backend, None = auto).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> Linear(4, 2, rngs=nnx.Rngs(0))(jnp.ones((1, 4))).shape
        (1, 2)
    """

    def __init__(self, in_features: int, out_features: int, *, backend: str | None = None, **kw):
        kw.setdefault("dot_general", make_dot_general(backend))
        kw.setdefault("promote_dtype", promote_dtype_tuple)
        super().__init__(in_features, out_features, **kw)


class Conv(_nnx.Conv):
    """``flax.nnx.Conv`` whose ``kernel`` may hold a :class:`jqx.QArray`: the
    convolution runs through ``jqx.ops.conv_general_dilated`` (docs/guide/conv.md).

    Takes Flax's arguments, plus ``backend`` (``jqx.ops`` backend, None = auto).

    Example:
        >>> import jax.numpy as jnp, jqx
        >>> from flax import nnx
        >>> m = Conv(2, 4, (3, 3), rngs=nnx.Rngs(0))
        >>> gdef, state = nnx.split(m)
        >>> qm = nnx.merge(gdef, jqx.quantize(state, jqx.int8_dynamic_activation_int8_weight(
        ...     conv_kernels=True)))
        >>> qm(jnp.ones((1, 8, 8, 2))).shape
        (1, 8, 8, 4)
    """

    def __init__(self, in_features: int, out_features: int, kernel_size, *args, **kw):
        backend = kw.pop("backend", None)
        kw.setdefault("conv_general_dilated", make_conv_general_dilated(backend))
        kw.setdefault("promote_dtype", promote_dtype_tuple)
        super().__init__(in_features, out_features, kernel_size, *args, **kw)


class Einsum(_nnx.Einsum):
    """``flax.nnx.Einsum`` whose ``kernel`` may hold a :class:`jqx.QArray`.

    Takes Flax's arguments, plus ``backend`` (``jqx.ops`` backend, None = auto).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> Einsum("bk,kn->bn", (4, 2), (2,), rngs=nnx.Rngs(0))(jnp.ones((1, 4))).shape
        (1, 2)
    """

    def __init__(
        self, einsum_str: str, kernel_shape, bias_shape=None, *, backend: str | None = None, **kw
    ):
        kw.setdefault("einsum_op", functools.partial(einsum, backend=backend))
        kw.setdefault("promote_dtype", promote_dtype_tuple)
        super().__init__(einsum_str, kernel_shape, bias_shape, **kw)


class Embed(_nnx.Embed):
    """``flax.nnx.Embed`` whose ``embedding`` may hold a :class:`jqx.QArray`.

    A lookup gathers the codes and scales of the looked-up rows and decodes only
    those; ``attend`` (a tied output projection) runs ``query @ embedding.T``
    through ``jqx.ops.dot_general``. Takes Flax's arguments, plus ``backend``
    (``jqx.ops`` backend for ``attend``, None = auto).

    Example:
        >>> import jax.numpy as jnp, jqx
        >>> from flax import nnx
        >>> m = Embed(100, 16, rngs=nnx.Rngs(0))
        >>> gdef, state = nnx.split(m)
        >>> qm = nnx.merge(gdef, jqx.quantize(state, jqx.int8_weight_only(), embeddings=True))
        >>> qm(jnp.array([[1, 2, 3]])).shape, qm.attend(jnp.ones((2, 16))).shape
        ((1, 3, 16), (2, 100))
    """

    def __init__(self, num_embeddings: int, features: int, *, backend: str | None = None, **kw):
        kw.setdefault("promote_dtype", promote_dtype_tuple)
        super().__init__(num_embeddings, features, **kw)
        self.backend = backend

    def __call__(self, inputs, out_sharding=None):
        # Same steps as flax.nnx.Embed.__call__ (flax 0.12) with a row-gathering lookup.
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError("Input type must be an integer or unsigned integer.")
        (embedding,) = self.promote_dtype((self.embedding[...],), dtype=self.dtype, inexact=False)
        y = embed_lookup(embedding, inputs, self.features, self.num_embeddings)
        if out_sharding is not None:
            y = jax.lax.with_sharding_constraint(y, out_sharding)
        return y

    def attend(self, query, out_sharding=None):
        query, embedding = self.promote_dtype((query, self.embedding[...]), dtype=self.dtype)
        return embed_attend(query, embedding, make_dot_general(self.backend), out_sharding)

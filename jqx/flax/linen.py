"""Quantized flax.linen layers: ``Dense``, ``DenseGeneral``, ``Einsum``, ``Embed``.

Each is Flax's own class with ``promote_dtype=`` (QArrays pass through) and
``dot_general=`` (QArray operands go to ``jqx.ops.dot_general``) injected.
Parameter names and shapes are Flax's, so a float checkpoint quantized with
``jqx.quantize`` loads directly, and float params still work.

Two things are not injection: linen's parameter shape check compares the
stored leaves with the initializer's, which fails for packed 4-bit codes, so
:class:`_QuantizedParams` checks a QArray kernel's *logical* shape itself
(and names the layer on a mismatch); and ``linen.Einsum`` calls
``jnp.einsum`` directly (no ``einsum_op`` hook), so :class:`Einsum` repeats
its short ``__call__`` with an einsum that accepts a QArray kernel. ``Embed``
has no lookup hook either: its ``__call__`` and ``attend`` repeat Flax's with a
lookup that gathers rows of a QArray table and a ``dot_general`` for ``attend``.

Example:
    >>> import jax, jax.numpy as jnp, jqx
    >>> from jqx.flax import linen as qnn
    >>> layer = qnn.Dense(16)
    >>> x = jnp.ones((2, 32))
    >>> v = layer.init(jax.random.key(0), x)
    >>> qv = jqx.quantize(v, jqx.int4_weight_only(group_size=16))
    >>> layer.apply(qv, x).shape
    (2, 16)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import module as _module

from jqx.core.qarray import is_qarray
from jqx.flax._inject import (
    conv_general_dilated,
    dot_general,
    einsum,
    embed_attend,
    embed_lookup,
    make_dot_general,
    promote_dtype,
)

__all__ = [
    "Conv",
    "Dense",
    "DenseGeneral",
    "Einsum",
    "Embed",
    "dot_general",
    "promote_dtype",
    "make_dot_general",
]


class _QuantizedParams:
    """Mixin: lets a stored QArray stand in for a float param of the same logical shape."""

    def param(self, name: str, init_fn, *init_args, unbox: bool = True, **init_kwargs):
        if self.scope is not None and self.has_variable("params", name):
            v = self.get_variable("params", name)
            if is_qarray(v):
                want = jax.eval_shape(lambda: init_fn(jax.random.key(0), *init_args, **init_kwargs))
                want = tuple(getattr(want, "shape", ()))
                if want != tuple(v.shape):
                    where = "/".join(str(s) for s in self.scope.path)
                    raise ValueError(
                        f"{where}/{name}: the quantized {name} has shape {tuple(v.shape)} but "
                        f"{type(self).__name__} expects {want} for these inputs; quantize the "
                        "params of this same model (or fix the layer's features / the input "
                        "size)."
                    )
                # Flax compares leaf shapes; hand it the QArray's own leaves.
                return super().param(name, lambda *_a, **_k: v, unbox=unbox)
        return super().param(name, init_fn, *init_args, unbox=unbox, **init_kwargs)


class Dense(_QuantizedParams, nn.Dense):
    """``flax.linen.Dense`` whose ``kernel`` may be a :class:`jqx.QArray`.

    Example:
        >>> import jax, jax.numpy as jnp, jqx
        >>> m = Dense(4)
        >>> v = m.init(jax.random.key(0), jnp.ones((1, 8)))
        >>> m.apply(jqx.quantize(v, jqx.int8_weight_only()), jnp.ones((3, 8))).shape
        (3, 4)
    """

    promote_dtype: Any = promote_dtype
    dot_general: Any = dot_general


class DenseGeneral(_QuantizedParams, nn.DenseGeneral):
    """``flax.linen.DenseGeneral`` whose ``kernel`` may be a :class:`jqx.QArray`.

    Example:
        >>> import jax, jax.numpy as jnp, jqx
        >>> m = DenseGeneral((2, 4), axis=-1)
        >>> v = m.init(jax.random.key(0), jnp.ones((1, 8)))
        >>> m.apply(jqx.quantize(v, jqx.int8_weight_only()), jnp.ones((3, 8))).shape
        (3, 2, 4)
    """

    promote_dtype: Any = promote_dtype
    dot_general: Any = dot_general


class Conv(_QuantizedParams, nn.Conv):
    """``flax.linen.Conv`` whose ``kernel`` may be a :class:`jqx.QArray`: the
    convolution runs through ``jqx.ops.conv_general_dilated`` (int8 codes for W8A8
    kernels, docs/guide/conv.md). ``ConvTranspose`` has no injection point: run it
    through ``jqx.quantized(model.apply)``.

    Example:
        >>> import jax, jax.numpy as jnp, jqx
        >>> m = Conv(4, (3, 3))
        >>> v = m.init(jax.random.key(0), jnp.ones((1, 8, 8, 2)))
        >>> qv = jqx.quantize(v, jqx.int8_dynamic_activation_int8_weight(conv_kernels=True))
        >>> m.apply(qv, jnp.ones((2, 8, 8, 2))).shape
        (2, 8, 8, 4)
    """

    promote_dtype: Any = promote_dtype
    conv_general_dilated: Any = conv_general_dilated


class Einsum(_QuantizedParams, nn.Einsum):
    """``flax.linen.Einsum`` whose ``kernel`` may be a :class:`jqx.QArray`.

    Attributes:
      backend: ``jqx.ops`` backend for a QArray kernel (None = auto).

    Example:
        >>> import jax, jax.numpy as jnp, jqx
        >>> m = Einsum((8, 2, 4), "bk,knh->bnh")
        >>> v = m.init(jax.random.key(0), jnp.ones((1, 8)))
        >>> m.apply(jqx.quantize(v, jqx.int8_weight_only()), jnp.ones((3, 8))).shape
        (3, 2, 4)
    """

    promote_dtype: Any = promote_dtype
    backend: str | None = None

    @nn.compact
    def __call__(self, inputs, einsum_str: str | None = None):
        # Same steps as flax.linen.Einsum.__call__ (flax 0.12), with an einsum
        # that accepts a QArray kernel.
        einsum_str = _module.merge_param("einsum_str", self.einsum_str, einsum_str)
        einsum_str = einsum_str.replace(" ", "")
        if "->" not in einsum_str:
            raise ValueError('`einsum_str` equation must be explicit and include "->".')
        if einsum_str.count(",") != 1:
            raise ValueError(
                "`einsum_str` equation must have exactly two operands and therefore, exactly one "
                f"comma character, instead of {einsum_str.count(',')}"
            )
        kernel = self.param("kernel", self.kernel_init, self.shape, self.param_dtype)
        if self.use_bias:
            # Bias shapes depend on shapes only: give the helper a stand-in kernel.
            kshape = jax.ShapeDtypeStruct(tuple(kernel.shape), jnp.dtype(kernel.dtype))
            bias_shape, broadcasted_bias_shape = self._get_bias_shape(einsum_str, inputs, kshape)
            bias = self.param("bias", self.bias_init, bias_shape, self.param_dtype)
        else:
            bias = None
        inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        y = einsum(
            einsum_str,
            inputs,
            kernel,
            precision=self.precision,
            preferred_element_type=self.preferred_element_type,
            backend=self.backend,
        )
        if bias is not None:
            y += jnp.reshape(bias, broadcasted_bias_shape)
        return y


class Embed(_QuantizedParams, nn.Embed):
    """``flax.linen.Embed`` whose ``embedding`` may be a :class:`jqx.QArray`.

    A lookup gathers the codes and scales of the looked-up rows and decodes only
    those (quantize the table with ``jqx.quantize(..., embeddings=True)``);
    ``attend`` (a tied output projection) runs ``query @ embedding.T`` through
    ``jqx.ops.dot_general``.

    Attributes:
      backend: ``jqx.ops`` backend for ``attend`` with a QArray table (None = auto).

    Example:
        >>> import jax, jax.numpy as jnp, jqx
        >>> m = Embed(100, 16)
        >>> v = m.init(jax.random.key(0), jnp.array([1, 2]))
        >>> qv = jqx.quantize(v, jqx.int8_weight_only(), embeddings=True)
        >>> m.apply(qv, jnp.array([[1, 2, 3]])).shape
        (1, 3, 16)
        >>> m.apply(qv, jnp.ones((2, 16)), method="attend").shape
        (2, 100)
    """

    promote_dtype: Any = promote_dtype
    backend: str | None = None

    def __call__(self, inputs):
        # Same steps as flax.linen.Embed.__call__ (flax 0.12) with a row-gathering lookup.
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError("Input type must be an integer or unsigned integer.")
        (embedding,) = self.promote_dtype(self.embedding, dtype=self.dtype, inexact=False)
        return embed_lookup(embedding, inputs, self.features, self.num_embeddings)

    def attend(self, query):
        query, embedding = self.promote_dtype(query, self.embedding, dtype=self.dtype)
        return embed_attend(query, embedding, make_dot_general(self.backend))

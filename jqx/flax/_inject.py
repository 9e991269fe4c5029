"""The functions injected into Flax layers (shared by the linen and nnx adapters)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jqx.core.qarray import is_qarray

__all__ = [
    "conv_general_dilated",
    "make_conv_general_dilated",
    "promote_dtype",
    "promote_dtype_tuple",
    "dot_general",
    "make_dot_general",
    "einsum",
    "embed_lookup",
    "embed_attend",
]


def _promote(args: Sequence[Any], dtype, inexact: bool) -> list:
    if dtype is None:
        # A QArray takes part with the dtype it dequantizes to.
        dts = [
            jnp.dtype(a.dtype) if is_qarray(a) else jnp.asarray(a).dtype
            for a in args
            if a is not None
        ]
        dtype = jnp.result_type(*dts)
        if inexact and not jnp.issubdtype(dtype, jnp.inexact):
            dtype = jnp.promote_types(jnp.float32, dtype)
    if inexact and not jnp.issubdtype(dtype, jnp.inexact):
        raise ValueError(f"promote_dtype: dtype must be inexact (a float type), got {dtype}.")
    # QArrays keep their codes: jqx.ops.dot_general dequantizes (or not) itself. Only
    # the static dtype they dequantize to follows the compute dtype, as a float
    # kernel would be cast.
    name = jnp.dtype(dtype).name
    return [
        a if a is None else (_with_dtype(a, name) if is_qarray(a) else jnp.asarray(a, dtype))
        for a in args
    ]


def _with_dtype(q, name: str):
    return q if q.dtype == name else q.replace(dtype=name)


def promote_dtype(*args, dtype=None, inexact: bool = True) -> list:
    """linen-style ``promote_dtype(*args, dtype=None)`` that passes QArrays through.

    Float operands are cast to ``dtype`` (or the dtype inferred from all
    operands, a QArray counting as its logical dtype), exactly as Flax does.

    Example:
        >>> import jax.numpy as jnp, jqx
        >>> q = jqx.quantize_array(jnp.ones((2, 2)), "int8")
        >>> x, k, b = promote_dtype(jnp.ones(2, jnp.float32), q, None)
        >>> k is q, b is None
        (True, True)
        >>> promote_dtype(q, dtype=jnp.bfloat16)[0].dtype  # codes untouched, metadata only
        'bfloat16'
    """
    return _promote(args, dtype, inexact)


def promote_dtype_tuple(args: tuple, /, *, dtype=None, inexact: bool = True) -> tuple:
    """nnx-style ``promote_dtype((inputs, kernel, bias), dtype=None)`` that passes QArrays through.

    Example:
        >>> import jax.numpy as jnp
        >>> promote_dtype_tuple((jnp.ones(2, jnp.bfloat16), None), dtype=jnp.float32)[0].dtype
        dtype('float32')
    """
    return tuple(_promote(args, dtype, inexact))


def make_dot_general(backend: str | None = None) -> Callable:
    """A ``dot_general`` for Flax's injection point using the given ``jqx.ops`` backend.

    Example:
        >>> dg = make_dot_general("xla")
        >>> callable(dg)
        True
    """

    def dot_general(
        lhs,
        rhs,
        dimension_numbers,
        precision=None,
        preferred_element_type=None,
        out_sharding=None,
    ):
        if is_qarray(lhs) or is_qarray(rhs):
            from jqx import ops  # lazily: ops may pull in kernels

            y = ops.dot_general(
                lhs,
                rhs,
                dimension_numbers,
                precision=precision,
                preferred_element_type=preferred_element_type,
                backend=backend,
            )
            if out_sharding is not None:
                y = jax.lax.with_sharding_constraint(y, out_sharding)
            return y
        kw = {} if out_sharding is None else {"out_sharding": out_sharding}
        return lax.dot_general(
            lhs,
            rhs,
            dimension_numbers,
            precision=precision,
            preferred_element_type=preferred_element_type,
            **kw,
        )

    dot_general.__doc__ = (
        "``lax.dot_general`` signature (plus nnx's ``out_sharding``); a QArray operand goes to "
        f"``jqx.ops.dot_general(..., backend={backend!r})``."
    )
    return dot_general


#: The default injected ``dot_general`` (``jqx.ops`` picks the backend).
dot_general = make_dot_general(None)


def make_conv_general_dilated(backend: str | None = None) -> Callable:
    """A ``conv_general_dilated`` for Flax's ``Conv`` injection point: a QArray kernel
    goes to ``jqx.ops.conv_general_dilated`` with the given backend.

    Example:
        >>> import jax.numpy as jnp, jqx
        >>> conv = make_conv_general_dilated("xla")
        >>> w = jqx.int8_weight_only().quantize_weight(jnp.ones((3, 3, 1, 2)), path="conv/kernel")
        >>> conv(jnp.ones((1, 3, 3, 1)), w, (1, 1), "VALID",
        ...      dimension_numbers=("NHWC", "HWIO", "NHWC")).shape
        (1, 1, 1, 2)
    """

    def conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=None,
        rhs_dilation=None,
        dimension_numbers=None,
        feature_group_count=1,
        batch_group_count=1,
        precision=None,
        preferred_element_type=None,
        out_sharding=None,
    ):
        kw = dict(
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            batch_group_count=batch_group_count,
            precision=precision,
            preferred_element_type=preferred_element_type,
        )
        if is_qarray(rhs):
            from jqx import ops  # lazily, as dot_general

            y = ops.conv_general_dilated(lhs, rhs, window_strides, padding, backend=backend, **kw)
            if out_sharding is not None:
                y = jax.lax.with_sharding_constraint(y, out_sharding)
            return y
        if out_sharding is not None:
            kw["out_sharding"] = out_sharding
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kw)

    conv_general_dilated.__doc__ = (
        "``lax.conv_general_dilated`` signature; a QArray kernel goes to "
        f"``jqx.ops.conv_general_dilated(..., backend={backend!r})``."
    )
    return conv_general_dilated


#: The default injected ``conv_general_dilated`` (``jqx.ops`` picks the backend).
conv_general_dilated = make_conv_general_dilated(None)


def einsum(
    subscripts: str,
    inputs,
    kernel,
    *,
    precision=None,
    preferred_element_type=None,
    out_sharding=None,
    backend: str | None = None,
):
    """``jnp.einsum(subscripts, inputs, kernel)`` where ``kernel`` may be a QArray.

    A QArray kernel runs through ``jqx.quantized``, so the einsum's
    ``dot_general`` reaches ``jqx.ops`` (einsum's own transposes and reshapes
    of the kernel are followed by the interpreter).

    Example:
        >>> import jax.numpy as jnp, jqx
        >>> q = jqx.quantize_array(jnp.ones((4, 3)), "int8")
        >>> einsum("bk,kn->bn", jnp.ones((2, 4)), q).tolist()[0]
        [4.0, 4.0, 4.0]
    """
    kw = {} if out_sharding is None else {"out_sharding": out_sharding}
    f = functools.partial(
        jnp.einsum,
        subscripts,
        precision=precision,
        preferred_element_type=preferred_element_type,
        **kw,
    )
    if is_qarray(inputs) or is_qarray(kernel):
        from jqx.transform.interpreter import quantized

        return quantized(f, backend=backend)(inputs, kernel)
    return f(inputs, kernel)


def embed_lookup(embedding, inputs, features: int, num_embeddings: int):
    """``Embed.__call__`` after ``promote_dtype``: ``jnp.take(embedding, inputs, axis=0)``,
    where a QArray table gathers the rows' codes and scales and decodes only those.

    Example:
        >>> import jax.numpy as jnp, jqx
        >>> q = jqx.quantize({"embedding": jnp.eye(4)}, jqx.int8_weight_only(), embeddings=True)
        >>> embed_lookup(q["embedding"], jnp.array([2]), 4, 4).tolist()
        [[0.0, 0.0, 1.0, 0.0]]
    """
    if not is_qarray(embedding):
        if num_embeddings == 1:
            return jnp.broadcast_to(embedding, inputs.shape + (features,))
        return jnp.take(embedding, inputs, axis=0)
    from jqx.ops.gather import take  # lazily, as dot_general: ops may pull in kernels

    if num_embeddings == 1:
        return jnp.broadcast_to(embedding.dequantize(), inputs.shape + (features,))
    # Flax's take wraps negative ids and fills out-of-range ones with NaN; a gather of
    # rows would clamp instead, so keep Flax's result by masking.
    ok = (inputs >= -num_embeddings) & (inputs < num_embeddings)
    rows = take(embedding, jnp.where(ok, jnp.where(inputs < 0, inputs + num_embeddings, inputs), 0))
    return jnp.where(ok[..., None], rows, jnp.array(jnp.nan, rows.dtype))


def embed_attend(query, embedding, dot_general_fn: Callable, out_sharding=None):
    """``Embed.attend`` after ``promote_dtype``: ``query @ embedding.T`` with the
    (possibly quantized) table as the matmul weight, never transposed in memory.

    Example:
        >>> import jax.numpy as jnp, jqx
        >>> q = jqx.quantize({"embedding": jnp.eye(4)}, jqx.int8_weight_only(), embeddings=True)
        >>> embed_attend(jnp.ones((1, 4)), q["embedding"], dot_general).tolist()
        [[1.0, 1.0, 1.0, 1.0]]
    """
    dn = (((query.ndim - 1,), (1,)), ((), ()))
    kw = {} if out_sharding is None else {"out_sharding": out_sharding}
    return dot_general_fn(query, embedding, dn, **kw)

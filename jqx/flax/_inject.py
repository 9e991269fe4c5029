"""The functions injected into Flax layers (shared by the linen and nnx adapters)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jqx.core.qarray import is_qarray

__all__ = ["promote_dtype", "promote_dtype_tuple", "dot_general", "make_dot_general", "einsum"]


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

"""LLM.int8() matmul (Dettmers et al., 2022): int8 plus 16-bit outlier columns.

``y = x @ W`` with ``W`` an int8 QArray quantized per output channel
(``jqx.llm_int8()``):

1. Outlier columns: input feature ``k`` is an outlier if any row of the
   current ``x`` has ``|x[:, k]| >= threshold``.
2. Ordinary features: ``x`` with the outlier columns zeroed is quantized to
   int8 per token (absmax / 127), multiplied by the int8 weight codes with
   int32 accumulation, and rescaled by both scales ("vector-wise").
3. Outlier features: ``x`` restricted to the outlier columns, in float16 (as
   in the paper and bitsandbytes), times the dequantized weight restricted to
   the same rows, in float16, accumulated in float32.
4. The two products are summed.

Static shapes throughout: the outlier columns are selected by masking, not by
a data-dependent gather, so the function is jit-compatible and compiles once
per shape (the float16 product is a full-size matmul with zeroed rows).

Example:
    >>> import jax.numpy as jnp, jqx
    >>> w = jqx.quantize({"kernel": jnp.eye(4)}, jqx.llm_int8())["kernel"]
    >>> y = llm_int8_matmul(jnp.array([[1.0, 2.0, 30.0, 4.0]]), w, 6.0)
    >>> [round(v, 1) for v in y[0].tolist()]  # 30.0 exact (float16 path), the rest int8
    [1.0, 2.0, 30.0, 4.0]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jqx.core.numerics import quantize_activation
from jqx.core.qarray import QArray

__all__ = ["llm_int8_matmul", "outlier_columns"]

_HI = lax.Precision.HIGHEST


def outlier_columns(x: jax.Array, threshold: float | jax.Array) -> jax.Array:
    """Boolean (K,): features of ``x`` (..., K) with some ``|x| >= threshold``."""
    xf = jnp.abs(x.astype(jnp.float32)).reshape(-1, x.shape[-1])
    return jnp.max(xf, axis=0, initial=0.0) >= threshold


def _check(x, q):
    if not isinstance(q, QArray):
        raise TypeError(f"llm_int8_matmul: q must be a jqx.QArray, got {type(q).__name__}.")
    if q.format != "int8" or len(q.shape) != 2 or q.block != (q.shape[0], 1):
        raise NotImplementedError(
            f"llm_int8_matmul supports 2-D int8 weights (K, N) quantized per output channel "
            f"(block (K, 1), as jqx.llm_int8() makes); got format={q.format!r}, shape={q.shape}, "
            f"block={q.block}. Quantize the weight with jqx.llm_int8()."
        )
    if x.shape[-1] != q.shape[0]:
        raise ValueError(
            f"llm_int8_matmul: x has {x.shape[-1]} features (shape {tuple(x.shape)}) but the "
            f"weight expects K={q.shape[0]}; x must be (..., {q.shape[0]})."
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"llm_int8_matmul: x must be floating point, got dtype={x.dtype}.")


def llm_int8_matmul(
    x: jax.Array,
    q: QArray,
    threshold: float | None = None,
    *,
    outlier_dtype=jnp.float16,
    out_dtype=None,
    int8_dot=None,
    max_outliers: int | None = None,
) -> jax.Array:
    """``x @ q`` with LLM.int8() mixed-precision decomposition.

    Args:
      x: activations (..., K), any float dtype.
      q: int8 QArray (K, N) quantized per output channel (``jqx.llm_int8()``).
        A stored ``in_scale`` (K, 1) divides ``x`` first.
      threshold: outlier threshold on |x|; defaults to ``q.act.threshold``
        (6.0 in the paper).
      outlier_dtype: 16-bit float for the outlier product (float16 default;
        jnp.bfloat16 also accepted).
      out_dtype: result dtype (default ``x.dtype``).
      int8_dot: the exact int32 product of the int8 codes ``(R, K)`` and ``q``'s codes
        (default: XLA's int32 dot; ``jqx.ops``' native route passes the VNNI GEMM's,
        bit-identical).
      max_outliers: None (default): the outlier product runs over all K features, the
        ordinary ones zeroed. An int T: it runs over the rows of the (at most T)
        outlier features only, gathered, and over all K when more than T are outliers;
        the same products, summed in another order (float32); without outlier
        features, none.

    Returns:
      (..., N) array: int8 product of the ordinary features plus the 16-bit
      product of the outlier features.

    Example:
        >>> import jax.numpy as jnp, jqx
        >>> w = jqx.quantize({"kernel": jnp.ones((4, 2))}, jqx.llm_int8())["kernel"]
        >>> llm_int8_matmul(jnp.ones((3, 4)), w).shape
        (3, 2)
    """
    x = jnp.asarray(x)
    _check(x, q)
    if threshold is None:
        threshold = q.act.threshold if q.act is not None and q.act.threshold is not None else 6.0
    if jnp.dtype(outlier_dtype) not in (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16)):
        raise ValueError(
            f"llm_int8_matmul: outlier_dtype={outlier_dtype!r}; use jnp.float16 or jnp.bfloat16."
        )
    if max_outliers is not None and (
        isinstance(max_outliers, bool) or not isinstance(max_outliers, int) or max_outliers < 1
    ):
        raise ValueError(
            f"llm_int8_matmul: max_outliers={max_outliers!r} must be None (the product over "
            "all K features) or an int >= 1 (the most outlier rows to gather, e.g. 32)."
        )
    out_dtype = out_dtype or x.dtype
    k, n = q.shape
    lead = x.shape[:-1]
    xf = x.astype(jnp.float32).reshape(-1, k)
    if q.in_scale is not None:
        xf = xf / q.in_scale.astype(jnp.float32).reshape(1, k)
    mask = outlier_columns(xf, threshold)
    x_reg = jnp.where(mask[None, :], 0.0, xf)
    x_codes, x_scale = quantize_activation(x_reg, "int8", "per_token")
    w_codes = q.qvalue  # int8 (K, N)
    w_scale = q.scale.astype(jnp.float32).reshape(1, n)
    if int8_dot is None:
        acc = lax.dot_general(
            x_codes, w_codes, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32
        )
    else:
        acc = int8_dot(x_codes)
    y = acc.astype(jnp.float32) * x_scale * w_scale

    def dense():
        # Outlier part: only the masked rows of the dequantized weight take part.
        w_deq = w_codes.astype(jnp.float32) * w_scale
        x_out = jnp.where(mask[None, :], xf, 0.0).astype(outlier_dtype)
        w_out = jnp.where(mask[:, None], w_deq, 0.0).astype(outlier_dtype)
        return lax.dot_general(
            x_out, w_out, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )

    if max_outliers is None:
        return (y + dense()).reshape(*lead, n).astype(out_dtype)
    t = min(max_outliers, k)
    count = jnp.sum(mask)

    def gathered():
        idx = jnp.nonzero(mask, size=t, fill_value=0)[0]
        used = jnp.arange(t) < count
        x_g = jnp.where(used[None, :], xf[:, idx], 0.0).astype(outlier_dtype)
        w_g = (q.row_codes(idx).astype(jnp.float32) * w_scale).astype(outlier_dtype)
        # 16-bit operands, exact products and float32 sums, as the dense product.
        return jnp.dot(
            x_g.astype(jnp.float32), w_g.astype(jnp.float32), precision=lax.Precision.HIGHEST
        )

    def none():  # no outlier feature (most decode steps): nothing to add
        return jnp.zeros_like(y)

    branch = jnp.where(count == 0, 0, jnp.where(count <= t, 1, 2))
    y = y + lax.switch(branch, (none, gathered, dense))
    return y.reshape(*lead, n).astype(out_dtype)

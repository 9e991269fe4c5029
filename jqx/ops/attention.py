"""Grouped-query attention over a KV cache: the XLA formulation, and the decode step
that the dispatcher may send to the native CPU kernel.

:func:`gqa_attention` is masked grouped-query attention for any number of queries;
:func:`decode_attention` is the one-query-per-sequence case of a decode step, which reads
only the visible cache slots ``lo[b] <= s < hi[b]`` when the native kernel runs it.

Example:
    >>> import jax.numpy as jnp
    >>> from jqx.ops.attention import decode_attention
    >>> q = jnp.ones((1, 4, 8)); k = v = jnp.ones((1, 2, 16, 8))
    >>> decode_attention(q, k, v, jnp.array([0]), jnp.array([3])).shape
    (1, 4, 8)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jqx.kernels.cpu import native
from jqx.ops import dispatch

__all__ = ["gqa_attention", "decode_attention"]

# A finite mask value: a query that sees no slot (a padding position) gets a uniform
# row instead of NaN, which would reach real queries through the cache (0 * NaN = NaN).
_MASKED = -1e30


def gqa_attention(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array) -> jax.Array:
    """``softmax(q k^T / sqrt(d) | visible) v`` with grouped-query heads (XLA).

    Args:
      q: float (batch, seq, heads, d).
      k, v: (batch, kv_heads, slots, d), any float dtype (read as float32).
      visible: bool (batch, seq, slots): which slots each query may attend to.

    Returns:
      float32 (batch, seq, heads * d).
    """
    b, t, h, d = q.shape
    kvh = k.shape[1]
    g = h // kvh
    # (b, kvh, g*t, d): the query heads that share a kv head become rows of one product
    qq = q.astype(jnp.float32).reshape(b, t, kvh, g, d).transpose(0, 2, 3, 1, 4)
    qq = qq.reshape(b, kvh, g * t, d)
    batch = ((0, 1), (0, 1))
    scores = jax.lax.dot_general(qq, k.astype(jnp.float32), (((3,), (3,)), batch))
    scores = scores.reshape(b, kvh, g, t, -1) * (1.0 / math.sqrt(d))
    scores = jnp.where(visible[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).reshape(b, kvh, g * t, -1)
    out = jax.lax.dot_general(probs, v.astype(jnp.float32), (((3,), (2,)), batch))
    out = out.reshape(b, kvh, g, t, d).transpose(0, 3, 1, 2, 4)
    return out.reshape(b, t, h * d)


def decode_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lo: jax.Array,
    hi: jax.Array,
    *,
    backend: str | None = None,
) -> jax.Array:
    """One query per sequence over cache slots ``lo[b] <= s < hi[b]``.

    Args:
      q: float32 (batch, heads, d).
      k, v: (batch, kv_heads, slots, d), float32 or float16.
      lo, hi: int32 (batch,): the visible slots of each sequence (``hi`` may be traced;
        it changes every step without retracing).
      backend: None (the dispatcher's choice), ``"xla"`` or ``"native"``.

    Returns:
      float32 (batch, heads, d); zeros for a sequence with no visible slot.
    """
    impl = dispatch.choose_attention(q, k, backend)
    if impl == "native":
        return native.decode_attention(
            q.astype(jnp.float32),
            k,
            v,
            lo.astype(jnp.int32),
            hi.astype(jnp.int32),
            scale=1.0 / math.sqrt(q.shape[-1]),
        )
    b, h, d = q.shape
    s = jnp.arange(k.shape[2])
    visible = (s[None, :] >= lo[:, None]) & (s[None, :] < hi[:, None])
    out = gqa_attention(q[:, None], k, v, visible[:, None])
    return jnp.where((hi > lo)[:, None, None], out.reshape(b, h, d), 0.0)

"""jqx.ops.attention: grouped-query attention over a KV cache (XLA and native)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jqx.kernels.cpu import native
from jqx.ops.attention import decode_attention, gqa_attention


def _reference(q, k, v, lo, hi):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, h, d = q.shape
    g = h // k.shape[1]
    out = np.zeros((b, h, d))
    for i in range(b):
        for j in range(h):
            kk, vv = k[i, j // g, lo[i] : hi[i]], v[i, j // g, lo[i] : hi[i]]
            if len(kk) == 0:
                continue
            s = kk @ q[i, j] / np.sqrt(d)
            p = np.exp(s - s.max())
            out[i, j] = (p / p.sum()) @ vv
    return out


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
@pytest.mark.parametrize("backend", ["xla", None])
def test_decode_attention_matches_reference(dtype, backend):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 6, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 3, 40, 16)), dtype)
    v = jnp.asarray(rng.normal(size=(2, 3, 40, 16)), dtype)
    lo, hi = np.array([5, 0]), np.array([6, 40])
    f = jax.jit(lambda q, k, v, lo, hi: decode_attention(q, k, v, lo, hi, backend=backend))
    got = np.asarray(f(q, k, v, jnp.asarray(lo), jnp.asarray(hi)))
    np.testing.assert_allclose(got, _reference(q, k, v, lo, hi), atol=2e-5, rtol=2e-5)
    # no visible slot: zeros, never NaN
    none = np.asarray(f(q, k, v, jnp.asarray([3, 0]), jnp.asarray([3, 0])))
    assert (none == 0).all()


def test_native_is_chosen_where_it_runs_and_xla_on_request():
    from jqx.ops import dispatch

    q, k = jnp.ones((1, 9, 64)), jnp.ones((1, 3, 256, 64))
    expect = "native" if native.gguf_available() else "xla"
    assert dispatch.choose_attention(q, k) == expect
    assert dispatch.choose_attention(q, k, "xla") == "xla"
    with pytest.raises(ValueError, match="backend='pallas' must be None, 'xla' or 'native'"):
        dispatch.choose_attention(q, k, "pallas")


def test_gqa_attention_is_causal_softmax_attention():
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(1, 4, 2, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 4, 8)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(1, 1, 4, 8)), jnp.float32)
    visible = jnp.tril(jnp.ones((4, 4), bool))[None]
    got = np.asarray(gqa_attention(q, k, v, visible)).reshape(1, 4, 2, 8)
    for t in range(4):
        ref = _reference(q[:, t], k, v, np.array([0]), np.array([t + 1]))
        np.testing.assert_allclose(got[:, t], ref, atol=2e-5, rtol=2e-5)

"""jqx.ops.attention: grouped-query attention over a KV cache (XLA and native)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jqx
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


# ----------------------------------------------------------------- softmax_dot

U = 2.0**-24
# (x's einsum spec, v's, the output's): the probabilities on either side, batch dims
# anywhere, several free dims, two contracted axes.
SOFTMAX_DOT_LAYOUTS = {
    "linen (p rhs)": ("bhqk", "bkhd", "bhdq"),
    "p lhs": ("bhqk", "bkhd", "bhqd"),
    "batch last": ("qkb", "kdb", "bqd"),
    "no batch": ("qk", "kd", "qd"),
    "two free": ("bqrk", "bkd", "bqrd"),
    "two contracted": ("bqkl", "bkld", "bqd"),
}


def _dn(xs: str, vs: str, p_lhs: bool):
    """dot_general dimension numbers of einsum(xs, vs) (x first when p_lhs)."""
    contract = [c for c in xs if c in vs and c in "kl"]
    batch = [c for c in xs if c in vs and c not in "kl"]
    xd = (
        (tuple(xs.index(c) for c in contract), tuple(vs.index(c) for c in contract)),
        (tuple(xs.index(c) for c in batch), tuple(vs.index(c) for c in batch)),
    )
    if p_lhs:
        return xd
    (a, b), (c, d) = xd
    return ((b, a), (d, c))


@pytest.mark.parametrize("layout", list(SOFTMAX_DOT_LAYOUTS))
@pytest.mark.parametrize("backend", ["xla", None])
def test_softmax_dot_layouts_against_float64(layout, backend):
    from jqx.ops.attention import softmax_dot

    xs, vs, _ = SOFTMAX_DOT_LAYOUTS[layout]
    p_lhs = layout != "linen (p rhs)"
    sizes = dict(b=2, h=3, q=5, r=2, k=7, l=3, d=4)
    rng = np.random.default_rng(len(layout))
    s = rng.standard_normal([sizes[c] for c in xs]).astype(np.float32) * 3 + 20
    axes = tuple(i for i, c in enumerate(xs) if c in "kl")
    v = rng.standard_normal([sizes[c] for c in vs]).astype(np.float32)
    dn = _dn(xs, vs, p_lhs)
    f = jax.jit(lambda s, v: softmax_dot(s, v, dn, 0 if p_lhs else 1, backend=backend))
    got = np.asarray(f(jnp.asarray(s), jnp.asarray(v)))
    e = np.exp((s - s.max(axis=axes, keepdims=True)).astype(np.float64))
    p = e / e.sum(axis=axes, keepdims=True)
    ops = (p, v.astype(np.float64)) if p_lhs else (v.astype(np.float64), p)
    ref = np.asarray(jax.lax.dot_general(*ops, dn, precision="highest"))
    assert got.shape == ref.shape
    k = int(np.prod([s.shape[a] for a in axes]))
    assert np.abs(got - ref).max() <= (2 * k + 8) * U * np.abs(v).max()


def test_softmax_dot_routes_and_errors():
    from jqx.ops import dispatch
    from jqx.ops.attention import softmax_dot

    x, v = jnp.zeros((2, 3, 4)), jnp.zeros((2, 4, 5))
    expect = "native" if native.gguf_available() else "xla"
    assert dispatch.choose_softmax_dot(x, v) == expect
    assert dispatch.choose_softmax_dot(x, v, "xla") == "xla"
    with jqx.ops.policy(softmax_kernel=False):
        assert dispatch.choose_softmax_dot(x, v) == "xla"
    with jqx.ops.policy(platform="cuda"):
        assert dispatch.choose_softmax_dot(x, v) == "xla"
    # Above softmax_kernel_max_scores (batch x heads x q x k) XLA fuses the exps into
    # its dot; backend="native" still asks for the kernel.
    big = jax.ShapeDtypeStruct((48, 128, 128), jnp.float32)
    assert dispatch.choose_softmax_dot(big, v) == "xla"
    with jqx.ops.policy(softmax_kernel_max_scores=48 * 128 * 128):
        assert dispatch.choose_softmax_dot(big, v) == expect
    if native.gguf_available():
        assert dispatch.choose_softmax_dot(big, v, "native") == "native"
    with pytest.raises(ValueError, match="backend='pallas' must be None, 'xla' or 'native'"):
        dispatch.choose_softmax_dot(x, v, "pallas")
    with pytest.raises(RuntimeError, match=r"cannot run this.*takes float32 operands"):
        dispatch.choose_softmax_dot(x.astype(jnp.float16), v, "native")
    dn = (((2,), (1,)), ((0,), (0,)))
    with pytest.raises(ValueError, match="operand=2 must be 0"):
        softmax_dot(x, v, dn, 2)
    # float16 operands take XLA's route, in their own dtype.
    y = softmax_dot(x.astype(jnp.float16), v.astype(jnp.float16), dn)
    assert y.dtype == jnp.float16 and y.shape == (2, 3, 5)

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


# ----------------------------------------------------------------- scores_softmax_dot

# (q spec, k spec, v spec, output spec, probabilities as the product's lhs): MiniLM's
# (b, t, h, d) projections with the output (b, h, d, q) (v lhs, as jnp.einsum lays
# "bhqk,bkhd->bqhd" out), the probabilities as lhs, no batch, heads first.
SCORES_LAYOUTS = {
    "bthd, v lhs": ("bqhd", "bkhd", "bkhd", False),
    "bthd, p lhs": ("bqhd", "bkhd", "bkhd", True),
    "no batch": ("qd", "kd", "kd", True),
    "bhtd": ("bhqd", "bhkd", "bhkd", True),
}


def _scores_case(layout, seed=0):
    qs, ks, vs, p_lhs = SCORES_LAYOUTS[layout]
    sizes = dict(b=2, h=3, q=5, k=7, d=4)
    rng = np.random.default_rng(seed)
    q, k = (jnp.asarray(rng.standard_normal([sizes[c] for c in x]), jnp.float32) for x in (qs, ks))
    v = jnp.asarray(rng.standard_normal([sizes[c] for c in vs]), jnp.float32)
    batch = [c for c in qs if c in "bh"]
    sdn = (
        ((qs.index("d"),), (ks.index("d"),)),
        (tuple(qs.index(c) for c in batch), tuple(ks.index(c) for c in batch)),
    )
    nb = len(batch)
    p = list(range(nb)) + [nb, nb + 1]  # the probabilities: (batch..., q, k)
    pdn = ((nb + 1,), (vs.index("k"),)), (tuple(p[:nb]), tuple(vs.index(c) for c in batch))
    dn = pdn if p_lhs else ((pdn[0][1], pdn[0][0]), (pdn[1][1], pdn[1][0]))
    bias = jnp.asarray(rng.standard_normal((2, 1, 1, 7)[-(nb + 2) :]), jnp.float32)
    return q, k, v, sdn, dn, 0 if p_lhs else 1, bias


def _scores_bound(s_abs, s, v, d, keys):
    """|y - y64| for attention from float32 scores: each score within d u sum|q k|
    (``s_abs``, scaled) and one rounding of its steps, carried through exp to p and y,
    plus the row sum's, dot's and division's rounding ((2 keys + 8) u max|v|)."""
    delta = 2 * (d * U * s_abs.max() + 2 * U * np.abs(s[s > -1e29]).max())
    return ((2 * keys + 8) * U + 2 * np.expm1(2 * delta)) * np.abs(np.asarray(v)).max()


@pytest.mark.parametrize("layout", list(SCORES_LAYOUTS))
@pytest.mark.parametrize("backend", ["xla", "native"])
def test_scores_softmax_dot_layouts(layout, backend):
    from jqx.ops.attention import scores_softmax_dot

    if backend == "native" and not native.gguf_available():
        pytest.skip(native.gguf_status())
    q, k, v, sdn, dn, operand, bias = _scores_case(layout)
    mask = jnp.arange(7) % 3 != 1
    steps = (("div", jnp.float32(2.0)), ("add", bias), ("where", mask, -1e30))
    f = jax.jit(
        lambda q, k, v: scores_softmax_dot(q, k, v, sdn, dn, operand, steps=steps, backend=backend)
    )
    got = np.asarray(f(q, k, v))
    # The program as written, in float64.
    qs, ks, vs, p_lhs = SCORES_LAYOUTS[layout]
    batch = "".join(c for c in qs if c in "bh")
    q64, k64, v64 = (np.asarray(a, np.float64) for a in (q, k, v))
    s = np.einsum(f"{qs},{ks}->{batch}qk", q64, k64) / 2.0 + np.asarray(bias, np.float64)
    s = np.where(np.asarray(mask), s, -1e30)
    e = np.exp(s - s.max(-1, keepdims=True))
    out = batch + ("qd" if p_lhs else "dq")
    ref = np.einsum(f"{batch}qk,{vs}->{out}", e / e.sum(-1, keepdims=True), v64)
    assert got.shape == ref.shape
    s_abs = np.einsum(f"{qs},{ks}->{batch}qk", np.abs(q64), np.abs(k64)) / 2.0
    assert np.abs(got - ref).max() <= _scores_bound(s_abs, s, v, d=4, keys=7)
    if backend == "xla":  # the scores and steps on XLA, then softmax_dot: the same bits
        from jqx.ops.attention import apply_score_steps, softmax_dot

        s32 = apply_score_steps(jax.lax.dot_general(q, k, sdn), steps)
        want = jax.jit(lambda s, v: softmax_dot(s, v, dn, operand, backend="xla"))(s32, v)
        np.testing.assert_array_equal(got, np.asarray(want))


@pytest.mark.parametrize("group", [1, 3], ids=["heads", "grouped queries"])
@pytest.mark.parametrize("operand", [0, 1], ids=["p lhs", "v lhs"])
@pytest.mark.parametrize("backend", ["xla", "native"])
def test_scores_softmax_dot_transposed_scores_and_unit_axes(operand, backend, group):
    """jax.nn.dot_product_attention's layout: q (b, t, h, g, d), scores dot (b, h, t, g,
    s), then the scale, a transpose to (g, b, h, t, s), a bias and a mask in that layout;
    the product with v (b, s, h, d) from either side. g = 1: a unit axis squeezed; g = 3:
    grouped queries, the kernel reading k and v at stride 0 along g."""
    from jqx.ops.attention import apply_score_steps, scores_route, scores_softmax_dot, softmax_dot

    if backend == "native" and not native.gguf_available():
        pytest.skip(native.gguf_status())
    b, t, s_, h, d = 2, 5, 7, 3, 4
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.standard_normal((b, t, h, group, d)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, s_, h, d)), jnp.float32) for _ in range(2))
    bias = jnp.asarray(rng.standard_normal((1, b, 1, 1, s_)), jnp.float32)
    mask = jnp.asarray(rng.random((b, 1, 1, s_)) > 0.3).at[:, ..., 0].set(True)
    sdn = (((4,), (3,)), ((0, 2), (0, 2)))
    perm = (3, 0, 1, 2, 4)
    steps = (("mul", jnp.float32(0.5)), ("transpose", perm), ("add", bias), ("where", mask, -1e30))
    # The probabilities (1, b, h, t, s) contract s with v's and batch (b, h).
    pdn = (((4,), (1,)), ((1, 2), (0, 2)))
    dn = pdn if operand == 0 else ((pdn[0][1], pdn[0][0]), (pdn[1][1], pdn[1][0]))
    route = "native" if backend == "native" else "xla"
    assert scores_route(q, k, v, sdn, dn, operand, steps, backend) == route
    f = jax.jit(
        lambda q, k, v: scores_softmax_dot(q, k, v, sdn, dn, operand, steps=steps, backend=backend)
    )
    got = np.asarray(f(q, k, v))
    s32 = apply_score_steps(jax.lax.dot_general(q, k, sdn), steps)
    want = jax.jit(lambda s, v: softmax_dot(s, v, dn, operand, backend="xla"))(s32, v)
    want_shape = (b, h, group, t, d) if operand == 0 else (b, h, d, group, t)
    assert got.shape == want.shape == want_shape
    q64, k64, v64 = (np.asarray(a, np.float64) for a in (q, k, v))
    s64 = 0.5 * np.einsum("bthgd,bshd->gbhts", q64, k64) + np.asarray(bias, np.float64)
    s64 = np.where(np.asarray(mask)[None], s64, -1e30)
    p64 = np.exp(s64 - s64.max(-1, keepdims=True))
    p64 /= p64.sum(-1, keepdims=True)
    ref = np.einsum("gbhts,bshd->bhgtd" if operand == 0 else "gbhts,bshd->bhdgt", p64, v64)
    s_abs = 0.5 * np.einsum("bthgd,bshd->gbhts", np.abs(q64), np.abs(k64))
    assert np.abs(got - ref).max() <= _scores_bound(s_abs, s64, v, d=d, keys=s_)
    if backend == "xla":  # the scores and steps on XLA, then softmax_dot: the same bits
        np.testing.assert_array_equal(got, np.asarray(want))

    # Gradients through the kernel are XLA's formula's.
    def loss(backend):
        return lambda q: jnp.sum(
            scores_softmax_dot(q, k, v, sdn, dn, operand, steps=steps, backend=backend) ** 2
        )

    np.testing.assert_allclose(
        np.asarray(jax.grad(loss(backend))(q)),
        np.asarray(jax.grad(loss("xla"))(q)),
        rtol=1e-5,
        atol=1e-6,
    )
    # A permutation that is not one of the scores' axes, or a second free axis above
    # size 1: XLA computes it, and "native" says why it cannot.
    for bad in (
        (("transpose", (1, 0, 2, 3)),),
        (("transpose", perm), ("add", jnp.zeros((2, 3, 1, 1, 1, 7)))),
    ):
        assert scores_route(q, k, v, sdn, dn, operand, bad) == "xla"
        with pytest.raises(RuntimeError, match="not laid out as one attention"):
            scores_softmax_dot(q, k, v, sdn, dn, operand, steps=bad, backend="native")
    with pytest.raises(ValueError, match=r"or \('transpose', permutation\)"):
        scores_softmax_dot(q, k, v, sdn, dn, operand, steps=(("transpose",),))


def test_scores_softmax_dot_routes_differentiates_and_errors():
    from jqx.ops import dispatch
    from jqx.ops.attention import scores_softmax_dot

    q, k, v, sdn, dn, operand, bias = _scores_case("bthd, v lhs", 1)
    expect = "native" if native.gguf_available() else "xla"
    assert dispatch.choose_scores_softmax_dot(q, k, v) == expect
    assert dispatch.choose_scores_softmax_dot(q, k, v, "xla") == "xla"
    with jqx.ops.policy(scores_kernel=False):
        assert dispatch.choose_scores_softmax_dot(q, k, v) == "xla"
    with jqx.ops.policy(platform="cuda"):
        assert dispatch.choose_scores_softmax_dot(q, k, v) == "xla"
    with pytest.raises(ValueError, match="backend='pallas' must be None, 'xla' or 'native'"):
        dispatch.choose_scores_softmax_dot(q, k, v, "pallas")
    with pytest.raises(RuntimeError, match=r"cannot run this.*takes float32 operands"):
        dispatch.choose_scores_softmax_dot(q.astype(jnp.float16), k, v, "native")
    steps = (("mul", jnp.float32(0.5)), ("add", bias))

    def loss(backend):
        return lambda q, k, v: jnp.sum(
            scores_softmax_dot(q, k, v, sdn, dn, operand, steps=steps, backend=backend) ** 2
        )

    want = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    got = jax.jit(jax.grad(loss(None), argnums=(0, 1, 2)))(q, k, v)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)
    # Steps the kernel does not take (two biases; a multiply and a divide) go to XLA.
    from jqx.ops.attention import scores_route

    assert scores_route(q, k, v, sdn, dn, operand, steps) == expect
    for extra in (("add", bias), ("div", jnp.float32(2.0))):
        assert scores_route(q, k, v, sdn, dn, operand, (*steps, extra)) == "xla"
    with pytest.raises(ValueError, match="operand=2 must be 0"):
        scores_softmax_dot(q, k, v, sdn, dn, 2)
    with pytest.raises(ValueError, match=r"step \('cube', 2\) must be \('mul', c\)"):
        scores_softmax_dot(q, k, v, sdn, dn, operand, steps=(("cube", 2),))
    # Two query axes: not one attention the kernel takes. XLA computes it; "native" says so.
    q2 = q.reshape(2, 5, 3, 2, 2)
    sdn2 = (((4,), (3,)), ((0, 2), (0, 2)))
    with pytest.raises(RuntimeError, match="not laid out as one attention"):
        scores_softmax_dot(q2, k[..., :2], v, sdn2, dn, operand, backend="native")
    # float16 operands take XLA's route, in their own dtype.
    y = scores_softmax_dot(
        q.astype(jnp.float16), k.astype(jnp.float16), v.astype(jnp.float16), sdn, dn, operand
    )
    assert y.dtype == jnp.float16 and y.shape == (2, 3, 4, 5)

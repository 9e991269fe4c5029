"""jqx.quantized computes softmax-then-matmul attention as ``(exp(s - max) @ v) / sum``
where that is valid (jax.nn.softmax + einsum, flax.linen attention, masked or not),
leaves it as written where it is not (probabilities reused, dropout or a mask after the
softmax), and stays within the stated bound of a float64 reference
(docs/guide/run.md#attention)."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jqx
from jqx.kernels.cpu import native

B, T, H, D = 2, 16, 4, 8
U = 2.0**-24  # float32 unit roundoff
REORDER = {"platform": "cpu", "softmax_reorder": None}  # the measured choice on CPU
AS_WRITTEN = {"softmax_reorder": False}


def _qkv(seed=0, scale=1.0):
    r = np.random.default_rng(seed)
    return tuple(
        jnp.asarray(scale * r.standard_normal((B, T, H, D)), jnp.float32) for _ in range(3)
    )


def _attention(q, k, v):
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)


def _normalised(fn, *args, shape=(B, H, T, T), **kw) -> int:
    """How many divisions produce a whole probability tensor of ``shape`` in the jaxpr
    of ``jqx.quantized(fn)``: 1 per attention as written, 0 once rewritten."""
    text = str(jax.make_jaxpr(jqx.quantized(fn))(*args, **kw))
    return len(re.findall(rf"f32\[{','.join(map(str, shape))}\] = div ", text))


def _run(fn, *args, policy, shape=(B, H, T, T), **kw):
    with jqx.ops.policy(**policy):
        y = jax.jit(jqx.quantized(fn))(*args, **kw)
        return y, _normalised(fn, *args, shape=shape, **kw)


def _bound(q, k, v, scale=1.0):
    """|y - y64| for softmax(scale q k^T) v in float32, either order: the rounding of
    the K-term row sum and dot and of the division ((2K + 8) u max|v|, the 8 covering
    exp's and the max subtraction's rounding), plus the scores' rounding (d u sum|q k|)
    carried through exp to p and so to y (twice that, relative, times max|v|)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    s_abs = scale * np.einsum("bqhd,bkhd->bhqk", np.abs(q), np.abs(k))
    vmax = np.max(np.abs(v))
    return ((2 * T + 8) * U + 2 * 2 * D * U * np.max(s_abs)) * vmax


def _ref64(q, k, v, scale=1.0):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    s = scale * np.einsum("bqhd,bkhd->bhqk", q, k)
    e = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhqk,bkhd->bqhd", e / e.sum(-1, keepdims=True), v)


# The reordered attention's three routes: the native kernel from q and k (the scores
# never written; where the scores are a dot of q and k), the native kernel from the
# scores XLA computed, and XLA's formula.
ROUTES = {
    "scores": {"scores_kernel": True, "softmax_kernel": True},
    "softmax": {"scores_kernel": False, "softmax_kernel": True},
    "xla": {"scores_kernel": False, "softmax_kernel": False},
}
KERNEL = pytest.mark.parametrize("route", list(ROUTES))


def _route(fn, *args, **kw) -> str:
    """Which route ``jqx.quantized(fn)`` takes: "scores", "softmax" or "xla"."""
    text = str(jax.make_jaxpr(jqx.quantized(fn))(*args, **kw))
    if native.SCORES_SOFTMAX_DOT_TARGET in text or native.SCORES_SOFTMAX_DOT_AVX512_TARGET in text:
        return "scores"
    return "softmax" if native.SOFTMAX_DOT_TARGET in text else "xla"


def _expect(route, fused=True) -> str:
    """The route a policy asks for, where the kernels run (``fused``: the scores are a
    dot of q and k the kernel takes)."""
    if not native.gguf_available() or route == "xla":
        return "xla"
    return "scores" if route == "scores" and fused else "softmax"


def _scores_rounding(q, k, v, scale=1.0):
    """How far the kernel's scores (one FMA chain over d) may move y from the scores XLA
    computed (both within D u sum|q k|), carried through exp to p and y."""
    q, k = (np.asarray(a, np.float64) for a in (q, k))
    s_abs = scale * np.einsum("bqhd,bkhd->bhqk", np.abs(q), np.abs(k))
    return 2 * 2 * 2 * D * U * np.max(s_abs) * float(jnp.max(jnp.abs(v)))


@KERNEL
@pytest.mark.parametrize("scale", [1.0, 4.0], ids=["scores~1", "scores~16"])
def test_softmax_einsum_is_rewritten_within_the_bound(scale, route):
    q, k, v = _qkv(0, scale)
    y, n = _run(_attention, q, k, v, policy={**REORDER, **ROUTES[route]})
    with jqx.ops.policy(**REORDER, **ROUTES[route]):
        assert _route(_attention, q, k, v) == _expect(route)
    y0, n0 = _run(_attention, q, k, v, policy=AS_WRITTEN)
    assert (n, n0) == (0, 1)
    ref, bound = _ref64(q, k, v), _bound(q, k, v)
    err, err0 = np.max(np.abs(y - ref)), np.max(np.abs(y0 - ref))
    assert err <= bound and err0 <= bound, (err, err0, bound)
    # The two orders share exp (and, but on the scores route, the scores): they differ
    # by the reordering's rounding (and the scores').
    reorder = 2 * (2 * T + 8) * U * float(jnp.max(jnp.abs(v)))
    if _expect(route) == "scores":
        reorder += _scores_rounding(q, k, v)
    assert float(jnp.max(jnp.abs(y - y0))) <= reorder
    # Switched off, it is the program as written, bit for bit.
    np.testing.assert_array_equal(np.asarray(y0), np.asarray(jax.jit(_attention)(q, k, v)))


def test_rewrite_is_the_measured_choice_on_cpu_only():
    q, k, v = _qkv(1)
    assert _run(_attention, q, k, v, policy={"platform": "cpu"})[1] == 0
    # Not measured elsewhere: as written (traced only; nothing runs on the named platform).
    with jqx.ops.policy(platform="cuda"):
        assert _normalised(_attention, q, k, v) == 1
    with jqx.ops.policy(platform="cuda", softmax_reorder=True):
        assert _normalised(_attention, q, k, v) == 0


LAYOUTS = {
    # p as the dot's lhs, output (b, h, q, d)
    "p lhs": (lambda s, v: jnp.einsum("bhqk,bkhd->bhqd", jax.nn.softmax(s, -1), v), (B, H, T, T)),
    # normalised over the queries, contracting them
    "axis 2": (lambda s, v: jnp.einsum("bhqk,bqhd->bkhd", jax.nn.softmax(s, 2), v), (B, H, T, T)),
    # one softmax over two axes, both contracted (with |tanh(s)| <= 1 <= max|v|)
    "two axes": (
        lambda s, v: jnp.einsum("bhqk,bhqk->bh", jax.nn.softmax(s, (2, 3)), jnp.tanh(s)),
        (B, H, T, T),
    ),
    # no batch dims: a single head as (T, T) @ (T, D)
    "2-D": (lambda s, v: jax.nn.softmax(s[0, 0], -1) @ v[0, :, 0], (T, T)),
}


@KERNEL
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_other_layouts_are_rewritten(layout, route):
    fn, shape = LAYOUTS[layout]
    q, k, v = _qkv(7)

    def f(q, k, v):
        return fn(jnp.einsum("bqhd,bkhd->bhqk", q, k), v)

    y, n = _run(f, q, k, v, policy={**REORDER, **ROUTES[route]}, shape=shape)
    # Only "p lhs" keeps the scores a dot the kernel takes (the softmax over the keys,
    # the scores not sliced); the others go from the scores.
    with jqx.ops.policy(**REORDER, **ROUTES[route]):
        assert _route(f, q, k, v) == _expect(route, fused=layout == "p lhs")
    y0, n0 = _run(f, q, k, v, policy=AS_WRITTEN, shape=shape)
    assert (n, n0) == (0, 1)
    terms = T * T if layout == "two axes" else T
    reorder = 2 * (2 * terms + 8) * U * float(jnp.max(jnp.abs(v)))
    if _expect(route, fused=layout == "p lhs") == "scores":
        reorder += _scores_rounding(q, k, v)
    assert float(jnp.max(jnp.abs(y - y0))) <= reorder


def _p_returned(q, k, v):
    p = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v), p


def _p_summed(q, k, v):
    p = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v) + jnp.sum(p, axis=(1, 3))[:, :, None, None]


def _mask_after(q, k, v):
    p = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k), axis=-1)
    keep = jnp.tril(jnp.ones((T, T), bool))
    return jnp.einsum("bhqk,bkhd->bqhd", jnp.where(keep, p, 0.0), v)


def _other_axis(q, k, v):
    # Contracts the query axis: the row sums are not constant along it.
    p = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k), axis=-1)
    return jnp.einsum("bhqk,bqhd->bkhd", p, v)


def _two_uses(q, k, v):
    p = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v) + jnp.einsum("bhqk,bkhd->bqhd", p, q)


@pytest.mark.parametrize(
    "fn",
    [_p_returned, _p_summed, _mask_after, _other_axis, _two_uses],
    ids=["p returned", "p summed", "mask after softmax", "other axis", "p used twice"],
)
def test_not_rewritten_where_invalid(fn):
    q, k, v = _qkv(2)
    y, n = _run(fn, q, k, v, policy=REORDER)
    assert n >= 1
    ref = jax.jit(fn)(q, k, v)
    for a, b in zip(jax.tree.leaves(y), jax.tree.leaves(ref), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_attention_inside_an_inner_jit_and_a_causal_mask():
    q, k, v = _qkv(3)
    causal = jnp.tril(jnp.ones((T, T), bool))

    @jax.jit
    def attend(q, k, v):
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k)
        s = jnp.where(causal, s, -jnp.inf)  # masked before the softmax: still valid
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)

    def fn(q, k, v):
        return attend(q, k, v) * 2.0

    y, n = _run(fn, q, k, v, policy=REORDER)
    assert n == 0
    qf, kf, vf = (np.asarray(a, np.float64) for a in (q, k, v))
    s = np.einsum("bqhd,bkhd->bhqk", qf, kf)
    s = np.where(np.asarray(causal), s, -np.inf)
    e = np.exp(s - s.max(-1, keepdims=True))
    ref = 2.0 * np.einsum("bhqk,bkhd->bqhd", e / e.sum(-1, keepdims=True), vf)
    assert np.max(np.abs(y - ref)) <= 2.0 * _bound(q, k, v)


def test_attention_inside_remat_is_rewritten():
    # jax.checkpoint / flax's nn.remat bodies are entered like calls (and re-run under
    # jax.checkpoint); gradients still flow.
    q, k, v = _qkv(10)
    fn = jax.checkpoint(_attention)
    y, n = _run(fn, q, k, v, policy=REORDER)
    assert n == 0
    assert float(jnp.max(jnp.abs(y - _ref64(q, k, v)))) <= _bound(q, k, v)
    with jqx.ops.policy(**REORDER):
        assert _route(fn, q, k, v) == _expect("scores")
        g = jax.grad(lambda q: jnp.sum(jqx.quantized(fn)(q, k, v) ** 2))(q)
    g0 = jax.grad(lambda q: jnp.sum(_attention(q, k, v) ** 2))(q)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g0), rtol=1e-4, atol=1e-5)
    m = nn.remat(nn.MultiHeadDotProductAttention)(num_heads=H, qkv_features=H * D)
    x = jnp.asarray(np.random.default_rng(11).standard_normal((B, T, H * D)), jnp.float32)
    variables = m.init(jax.random.key(0), x)
    assert _run(m.apply, variables, x, policy=REORDER)[1] == 0


def _mha(dropout=0.0, deterministic=True):
    return nn.MultiHeadDotProductAttention(
        num_heads=H, qkv_features=H * D, dropout_rate=dropout, deterministic=deterministic
    )


@KERNEL
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "padding mask"])
def test_flax_linen_attention_is_rewritten_within_the_bound(masked, route):
    m = _mha()
    x = jnp.asarray(np.random.default_rng(4).standard_normal((B, T, H * D)), jnp.float32)
    variables = m.init(jax.random.key(0), x)
    qv = jqx.quantize(variables, jqx.int8_weight_only())
    lengths = jnp.array([[T // 2], [T]])
    valid = (jnp.arange(T)[None] < lengths).astype(jnp.float32)
    mask = nn.make_attention_mask(jnp.ones((B, T)), valid)
    kw = {"mask": mask} if masked else {}
    y, n = _run(m.apply, qv, x, policy={**REORDER, **ROUTES[route]}, **kw)
    y0, n0 = _run(m.apply, qv, x, policy=AS_WRITTEN, **kw)
    assert (n, n0) == (0, 1)
    with jqx.ops.policy(**REORDER, **ROUTES[route]):
        # flax.linen's scores: q (scaled first) dot k, then jnp.where with the mask.
        assert _route(m.apply, qv, x, **kw) == _expect(route)
    # Only the attention differs between the two; its per-row error bound (at most
    # _bound's reorder part for each) reaches the output through |W_out|.
    wo = np.abs(np.asarray(qv["params"]["out"]["kernel"].dequantize(), np.float64))
    col = wo.reshape(H * D, -1).sum(0)
    _, _, vproj = jax.jit(
        lambda p, x: [
            jnp.einsum("btf,fhd->bthd", x, p[n]["kernel"].dequantize()) + p[n]["bias"]
            for n in ("query", "key", "value")
        ]
    )(qv["params"], x)
    per_ctx = 2 * (2 * T + 8) * U * float(jnp.max(jnp.abs(vproj)))
    if _expect(route) == "scores":
        qproj, kproj, _ = jax.jit(
            lambda p, x: [
                jnp.einsum("btf,fhd->bthd", x, p[n]["kernel"].dequantize()) + p[n]["bias"]
                for n in ("query", "key", "value")
            ]
        )(qv["params"], x)
        per_ctx += _scores_rounding(qproj, kproj, vproj, scale=D**-0.5)
    assert np.all(np.abs(np.asarray(y) - np.asarray(y0)) <= per_ctx * col * 1.01 + 1e-7)
    # And both stay close to the float model run on the dequantized weights.
    with jax.default_matmul_precision("highest"):
        ref = m.apply(jqx.dequantize(qv), x, **kw)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-4, atol=1e-4)


def test_flax_linen_attention_w8a8_and_dropout():
    m = _mha()
    x = jnp.asarray(np.random.default_rng(5).standard_normal((B, T, H * D)), jnp.float32)
    variables = m.init(jax.random.key(0), x)
    qv = jqx.quantize(variables, jqx.int8_dynamic_activation_int8_weight())
    y, n = _run(m.apply, qv, x, policy=REORDER)
    assert n == 0
    with jax.default_matmul_precision("highest"):
        ref = m.apply(jqx.dequantize(qv), x)
    err = float(jnp.max(jnp.abs(y - ref)))
    assert err <= 0.05 * (1.0 + float(jnp.max(jnp.abs(ref)))), err
    # Dropout at training time scales p after the softmax: the rewrite must not apply.
    md = _mha(dropout=0.5, deterministic=None)
    rngs = {"dropout": jax.random.key(1)}
    fn = lambda v, x: md.apply(v, x, deterministic=False, rngs=rngs)  # noqa: E731
    assert _run(fn, variables, x, policy=REORDER)[1] == 1
    # Deterministic (inference) mode with a dropout rate set: no dropout, rewritten.
    infer = lambda v, x: md.apply(v, x, deterministic=True)  # noqa: E731
    assert _run(infer, variables, x, policy=REORDER)[1] == 0


def _unshifted(q, k, v):
    e = jnp.exp(jnp.einsum("bqhd,bkhd->bhqk", q, k))  # no maximum subtracted
    return jnp.einsum("bhqk,bkhd->bqhd", e / jnp.sum(e, -1, keepdims=True), v)


@pytest.mark.skipif(not native.gguf_available(), reason=native.gguf_status())
def test_kernel_only_for_jax_nn_softmax_and_off_with_backend_xla():
    q, k, v = _qkv(8)
    with jqx.ops.policy(**REORDER):
        assert _route(_attention, q, k, v) == "scores"
        with jqx.ops.policy(scores_kernel=False):
            assert _route(_attention, q, k, v) == "softmax"
        # exp of scores without the maximum subtracted: reordered on XLA (the kernels
        # compute jax.nn.softmax's s - max(s)), within the same bound as written.
        assert _route(_unshifted, q, k, v) == "xla"
        assert _normalised(_unshifted, q, k, v) == 0
        y = jax.jit(jqx.quantized(_unshifted))(q, k, v)
        assert float(jnp.max(jnp.abs(y - _ref64(q, k, v)))) <= _bound(q, k, v)
        # jqx.quantized(backend="xla") keeps every product on XLA.
        text = str(jax.make_jaxpr(jqx.quantized(_attention, backend="xla"))(q, k, v))
        assert native.SOFTMAX_DOT_TARGET not in text and "scores_softmax_dot" not in text


@KERNEL
def test_reordered_attention_is_differentiable(route):
    # The native kernel's derivatives are XLA's formula's (a custom JVP), so gradients
    # through jqx.quantized agree with those of the attention as written.
    q, k, v = _qkv(9)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) ** 2)

    with jqx.ops.policy(**REORDER, **ROUTES[route]):
        assert _route(_attention, q, k, v) == _expect(route)
        got = jax.jit(jax.grad(loss(jqx.quantized(_attention)), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(loss(_attention), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)


def test_activation_matmuls_quantize_p_as_written():
    """activation_matmuls="int8" quantizes the normalised probabilities, as before."""
    q, k, v = _qkv(6)
    with jqx.ops.policy(**REORDER):
        y = jax.jit(jqx.quantized(_attention, activation_matmuls="int8"))(q, k, v)
    with jqx.ops.policy(**AS_WRITTEN):
        y0 = jax.jit(jqx.quantized(_attention, activation_matmuls="int8"))(q, k, v)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y0))


def _bert(q, k, v, bias):  # Hugging Face / PlainBert: scale after the dot, additive bias
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.float32(np.sqrt(D)) + bias
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)


def _where_fill_first(q, k, v, bias):  # jnp.where(padding, fill, s): the mask inverted
    s = 0.25 * jnp.einsum("bqhd,bkhd->bhqk", q, k)
    s = jnp.where(bias < 0, -jnp.inf, s)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)


def _soft_capped(q, k, v, bias):  # tanh soft-capping: a step the kernel does not take
    s = 30.0 * jnp.tanh(jnp.einsum("bqhd,bkhd->bhqk", q, k) / 30.0) + bias
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)


@jax.jit
def _where(c, a, b):  # a function of one's own that happens to share jnp.where's name
    return jnp.where(c, 2.0 * a, b)


def _own_where(q, k, v, bias):
    s = _where(bias == 0, jnp.einsum("bqhd,bkhd->bhqk", q, k), -1e30)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)


def _two_biases(q, k, v, bias):  # two additive biases: the kernel takes one
    s = 0.5 * jnp.einsum("bqhd,bkhd->bhqk", q, k) + bias + jnp.arange(T, dtype=jnp.float32)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)


def _sdpa_bias(q, k, v, bias):  # scores (b, h, t, 1, s), transposed before the softmax
    return jax.nn.dot_product_attention(q, k, v, bias=bias)


def _sdpa_mask(q, k, v, bias):  # its jnp.where, batched by vmap, transposes the scores
    return jax.nn.dot_product_attention(q, k, v, mask=bias == 0, scale=0.5)


def _sdpa_causal(q, k, v, bias):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True)


def _sdpa_causal_and_mask(q, k, v, bias):  # two masks and-ed: the whole mask is read
    return jax.nn.dot_product_attention(q, k, v, mask=bias == 0, is_causal=True)


def _sdpa_unmasked(q, k, v, bias):  # its maximum taken before the transpose
    return jax.nn.dot_product_attention(q, k, v)


def _sdpa_unbatched(q, k, v, bias):  # (t, h, d) operands: a unit batch axis added
    return jax.nn.dot_product_attention(q[1], k[1], v[1], bias=bias[1, 0])


def _sdpa_gqa(q, k, v, bias):  # two query heads per key head: (b, h, t, 2, s) scores
    return jax.nn.dot_product_attention(q, k[:, :, :2], v[:, :, :2], bias=bias)


def _sdpa_gqa_unmasked(q, k, v, bias):  # one key head for all four query heads
    return jax.nn.dot_product_attention(q, k[:, :, :1], v[:, :, :1])


@pytest.mark.parametrize(
    "fn,route",
    [
        (_bert, "scores"),
        (_where_fill_first, "scores"),
        (_soft_capped, "softmax"),
        (_own_where, "softmax"),
        (_two_biases, "softmax"),
        (_sdpa_bias, "scores"),
        (_sdpa_mask, "scores"),
        (_sdpa_causal, "scores"),
        (_sdpa_causal_and_mask, "scores"),
        (_sdpa_unmasked, "scores"),
        (_sdpa_unbatched, "scores"),
        (_sdpa_gqa, "scores"),
        (_sdpa_gqa_unmasked, "scores"),
    ],
    ids=[
        "bert",
        "where fill first",
        "soft-capped",
        "a jit named _where",
        "two biases",
        "dot_product_attention bias",
        "dot_product_attention mask",
        "dot_product_attention causal",
        "dot_product_attention causal and mask",
        "dot_product_attention unmasked",
        "dot_product_attention unbatched",
        "dot_product_attention grouped",
        "dot_product_attention one key head",
    ],
)
def test_score_steps_on_the_kernel_or_from_the_scores(fn, route):
    q, k, v = _qkv(12, 2.0)
    low = float(np.finfo(np.float32).min)
    bias = jnp.where(jnp.arange(T) < T - 3, 0.0, low)[None, None, None, :]
    bias = jnp.broadcast_to(bias, (B, 1, 1, T)).at[1, ..., :5].set(low)
    with jqx.ops.policy(**REORDER):
        assert _route(fn, q, k, v, bias) == _expect(route)
        y = jax.jit(jqx.quantized(fn))(q, k, v, bias)
    y0 = jax.jit(fn)(q, k, v, bias)
    with jqx.ops.policy(**REORDER, scores_kernel=False):
        assert _route(fn, q, k, v, bias) == _expect("softmax")
    # The program as written: within the reordering's and the scores' rounding.
    tol = 2 * (2 * T + 8) * U * float(jnp.max(jnp.abs(v))) + _scores_rounding(q, k, v, 2.0)
    assert float(jnp.max(jnp.abs(y - y0))) <= tol
    # Under jit inside jit, and differentiable through the kernel.
    with jqx.ops.policy(**REORDER):
        g = jax.grad(lambda q: jnp.sum(jax.jit(jqx.quantized(fn))(q, k, v, bias) ** 2))(q)
    g0 = jax.grad(lambda q: jnp.sum(fn(q, k, v, bias) ** 2))(q)
    atol = 1e-5 * float(jnp.max(jnp.abs(g0)))  # float32 gradients of sharp softmaxes
    np.testing.assert_allclose(np.asarray(g), np.asarray(g0), rtol=1e-4, atol=atol)


def test_a_maximum_moved_from_other_axes_is_not_the_softmax_maximum():
    # dot_product_attention takes the maximum before its transpose and moves it after;
    # a maximum moved to other axes than the scores' is not theirs: the attention is
    # still reordered (valid for any row constant), but not sent to the kernels, which
    # subtract the row's own maximum.
    r = np.random.default_rng(5)
    q, k, v = (jnp.asarray(r.standard_normal((4, 4, 4, 4)), jnp.float32) for _ in range(3))

    def fn(q, k, v):
        s0 = jnp.einsum("bqhd,bkhd->bhqk", q, k)
        s = jnp.swapaxes(s0, 0, 1)  # (h, b, q, k)
        m = jnp.swapaxes(jnp.max(s0, -1), 1, 2)[..., None]  # (b, q, h, 1): not s's rows
        e = jnp.exp(s - jax.lax.stop_gradient(m))
        return jnp.einsum("hbqk,bkhd->bqhd", e / jnp.sum(e, -1, keepdims=True), v)

    def right(q, k, v):  # the same with the maximum moved as the scores were
        s0 = jnp.einsum("bqhd,bkhd->bhqk", q, k)
        m = jnp.swapaxes(jnp.max(s0, -1), 0, 1)[..., None]
        e = jnp.exp(jnp.swapaxes(s0, 0, 1) - jax.lax.stop_gradient(m))
        return jnp.einsum("hbqk,bkhd->bqhd", e / jnp.sum(e, -1, keepdims=True), v)

    with jqx.ops.policy(**REORDER):
        assert _route(fn, q, k, v) == "xla"
        assert _route(right, q, k, v) == _expect("scores")
        for f in (fn, right):
            y, y0 = jax.jit(jqx.quantized(f))(q, k, v), jax.jit(f)(q, k, v)
            assert float(jnp.max(jnp.abs(y - y0))) <= 1e-5 * float(jnp.max(jnp.abs(v)))


@pytest.mark.parametrize(
    "fn,mask_shape",
    [(_sdpa_mask, (B, 1, 1, T)), (_sdpa_causal, (1, 1, T, T))],
    ids=["mask", "causal"],
)
def test_dot_product_attention_masks_reach_the_kernel_unbroadcast(fn, mask_shape):
    # jax.nn.dot_product_attention and-s its mask into an all-true scores-sized tensor;
    # the kernel gets the mask itself (read at stride 0), not the (b, h, q, k) copy.
    if not native.gguf_available():
        pytest.skip(native.gguf_status())
    q, k, v = _qkv(3)
    bias = jnp.zeros((B, 1, 1, T)).at[1, ..., 11:].set(-1.0)
    with jqx.ops.policy(**REORDER):
        jaxpr = jax.make_jaxpr(jqx.quantized(fn))(q, k, v, bias)
    calls = [  # the kernel's differentiable wrapper (a custom_jvp call)
        e for e in jaxpr.jaxpr.eqns if "scores_softmax_dot" in str(e.params.get("call_jaxpr", ""))
    ]
    assert len(calls) == 1
    masks = [v.aval.shape for v in calls[0].invars if v.aval.dtype == jnp.bool_]
    assert masks == [mask_shape]

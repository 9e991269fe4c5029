"""jqx.quantized / map_dots / capture_inputs: the jaxpr interpreter on plain
functions, flax.linen and flax.nnx, against the float function run on the
dequantized parameters."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _gelu_check import assert_gelu_tanh_within_bound, assert_gelu_within_bound
from flax import nnx
from jax import lax

import jqx
from jqx import transform
from jqx.kernels.cpu import native

K, N, M = 32, 16, 4
HI = lax.Precision.HIGHEST
ALL = lambda p, x: getattr(x, "ndim", 0) >= 2  # noqa: E731  quantize every matrix


def _quantize(*args, **kw):
    """jqx.quantize in the plain layout: these tests check the interpreter's rewrites on
    the routes the plain codes take (tests/test_prepack.py runs packed trees)."""
    return jqx.quantize(*args, prepack=False, **kw)


def _x(shape=(M, K), seed=1):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _close(a, b, rel=1e-5):
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    tol = rel * (1.0 + float(jnp.max(jnp.abs(b))))
    assert float(jnp.max(jnp.abs(a - b))) <= tol, (float(jnp.max(jnp.abs(a - b))), tol)


def _deq_ref(fn, qparams, *args):
    # Jitted: one program per reference instead of each op (a whole linen model,
    # scans and remat included) dispatched and compiled eagerly. The precision is
    # read at trace time, inside the context.
    with jax.default_matmul_precision("highest"):
        return jax.jit(lambda q, *a: fn(jqx.dequantize(q), *a))(qparams, *args)


# --------------------------------------------------------------------------- plain functions

PLAIN = {
    "x@W": lambda p, x: x @ p["w"],
    "W.T tied": lambda p, x: (x @ p["w"]) @ p["w"].T,
    "cast bf16": lambda p, x: x.astype(jnp.bfloat16) @ p["w"].astype(jnp.bfloat16),
    "einsum batch": lambda p, x: jnp.einsum("bk,lkn->lbn", x, p["s"]),
    "W lhs": lambda p, x: jnp.dot(p["w"].T, x.T),
    "jit inside": lambda p, x: jax.jit(lambda w, y: jnp.tanh(y @ w))(p["w"], x),
    "non-dot use": lambda p, x: x @ p["w"] + jnp.sum(p["w"]),
}


@pytest.mark.parametrize("name", list(PLAIN))
@pytest.mark.parametrize("recipe", ["int8", "int4", "w8a8"])
def test_plain_functions(name, recipe):
    params = {"w": _x((K, N), 0), "s": _x((3, K, N), 2)}
    r = {
        "int8": jqx.int8_weight_only(),
        "int4": jqx.int4_weight_only(group_size=8),
        "w8a8": jqx.int8_dynamic_activation_int8_weight(),
    }[recipe]
    q = _quantize(params, r, filter_fn=ALL)
    fn = PLAIN[name]
    x = _x()
    y = jax.jit(jqx.quantized(fn))(q, x)
    ref = _deq_ref(fn, q, x)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    if recipe == "w8a8" and name != "non-dot use":
        _close(y, ref, rel=0.03)  # activation rounding error
    elif name == "cast bf16":
        _close(y, ref, rel=2e-2)
    elif recipe != "w8a8":
        _close(y, ref)


def test_dot_goes_to_ops_not_dequantize():
    q = _quantize({"w": _x((K, N), 0)}, jqx.int8_dynamic_activation_int8_weight(), filter_fn=ALL)
    jaxpr = str(jax.make_jaxpr(jqx.quantized(lambda p, x: x @ p["w"].T.T))(q, _x()))
    assert "preferred_element_type=int32" in jaxpr
    # the double transpose was folded into the dimension numbers: no (N, K) copy of the codes
    assert f"i8[{N},{K}]" not in jaxpr and f"f32[{N},{K}]" not in jaxpr


def test_tied_transpose_uses_int_dot():
    q = _quantize(
        {"e": _x((N, K), 0)}, jqx.int8_dynamic_activation_int8_weight(axis=-1), filter_fn=ALL
    )
    f = jqx.quantized(lambda p, x: x @ p["e"].T)
    assert "preferred_element_type=int32" in str(jax.make_jaxpr(f)(q, _x()))
    _close(f(q, _x()), _deq_ref(lambda p, x: x @ p["e"].T, q, _x()), rel=0.03)


def test_unwrapped_qarray_error():
    q = _quantize({"w": _x((K, N), 0)}, jqx.int8_weight_only(), filter_fn=ALL)
    with pytest.raises(TypeError, match="jqx.quantized"):
        jax.jit(lambda p, x: x @ p["w"])(q, _x())


def test_cond_and_while_fall_back_to_dequantize():
    q = _quantize({"w": _x((K, K), 0)}, jqx.int8_weight_only(), filter_fn=ALL)

    def f(p, x):
        y = lax.cond(x[0, 0] > 0, lambda w: x @ w, lambda w: -(x @ w), p["w"])
        z = lax.fori_loop(0, 2, lambda i, c: jnp.tanh(c @ p["w"]), x)
        return y + z

    _close(jax.jit(jqx.quantized(f))(q, _x()), _deq_ref(f, q, _x()))


def test_custom_vjp_and_custom_jvp_and_remat():
    @jax.custom_vjp
    def mm(x, w):
        return x @ w

    mm.defvjp(lambda x, w: (mm(x, w), (x, w)), lambda r, g: (g @ r[1].T, r[0].T @ g))

    @jax.custom_jvp
    def act(x):
        return jax.nn.relu(x)

    act.defjvp(lambda p, t: (act(p[0]), t[0]))

    def f(p, x):
        h = jax.checkpoint(lambda y: act(y @ p["a"]))(x)
        return mm(h, p["b"])

    params = {"a": _x((K, K), 0), "b": _x((K, N), 3)}
    q = _quantize(params, jqx.int8_dynamic_activation_int8_weight(), filter_fn=ALL)
    jaxpr = str(jax.make_jaxpr(jqx.quantized(f))(q, _x()))
    assert jaxpr.count("preferred_element_type=int32") == 2
    _close(jax.jit(jqx.quantized(f))(q, _x()), _deq_ref(f, q, _x()), rel=0.05)
    # gradients w.r.t. the activations flow through the quantized function
    g = jax.jit(jax.grad(lambda x: jqx.quantized(f)(q, x).sum()))(_x())
    assert g.shape == (M, K) and bool(jnp.all(jnp.isfinite(g)))


def test_no_retrace():
    q = _quantize({"w": _x((K, N), 0)}, jqx.int4_weight_only(group_size=8), filter_fn=ALL)

    @chex.assert_max_traces(n=1)
    def fn(p, x):
        return x @ p["w"]

    f = jax.jit(jqx.quantized(fn))
    for s in range(3):
        f(q, _x(seed=s))
    chex.clear_trace_counter()


# --------------------------------------------------------------------------- flax.linen


class _Linen(nn.Module):
    @nn.compact
    def __call__(self, tok):
        emb = nn.Embed(50, K)
        h = emb(tok)
        h = nn.Dense(K)(h)
        h = nn.DenseGeneral((2, 8), axis=-1)(h)  # (..., 2, 8)
        h = nn.DenseGeneral(K, axis=(-2, -1))(h)
        h = nn.Einsum((K, N), "...k,kn->...n")(h)
        h = nn.Dense(K)(h)
        return emb.attend(h)  # tied embedding: h @ embedding.T


@pytest.mark.parametrize(
    "recipe",
    [
        jqx.int8_weight_only(),
        jqx.int4_weight_only(group_size=8),
        jqx.int8_dynamic_activation_int8_weight(),
    ],
    ids=["int8", "int4", "w8a8"],
)
def test_linen_layers(recipe):
    m = _Linen()
    tok = jnp.arange(12).reshape(3, 4) % 50
    v = m.init(jax.random.key(0), tok)
    rules = {
        "embedding": recipe.replace(axis=-1),
        # (2, 8, K): contracted over its first two axes; per axis-0 channel blocks
        # vary along the contraction, which exercises the dequantize fallback.
        "DenseGeneral_1": recipe.replace(axis=0, group_size=None),
        "kernel": recipe.replace(axis=0),
    }
    qv = _quantize(v, rules, filter_fn=lambda p, x: x.ndim >= 2)
    assert jqx.is_qarray(qv["params"]["Embed_0"]["embedding"])
    y = jax.jit(jqx.quantized(m.apply))(qv, tok)
    ref = _deq_ref(m.apply, qv, tok)
    _close(y, ref, rel=0.05 if recipe.act else 1e-4)


class _Block(nn.Module):
    @nn.compact
    def __call__(self, c, _):
        return nn.relu(nn.Dense(K)(c)), None


def test_linen_scan_stacked_layers_and_remat():
    Scanned = nn.scan(
        nn.remat(_Block), variable_axes={"params": 0}, split_rngs={"params": True}, length=3
    )
    m = Scanned()
    x = _x()
    v = m.init(jax.random.key(0), x, None)
    qv = _quantize(v, jqx.int8_dynamic_activation_int8_weight())
    (k,) = [a for a in jax.tree.leaves(qv, is_leaf=jqx.is_qarray) if jqx.is_qarray(a)]
    assert k.shape == (3, K, K)
    f = jqx.quantized(lambda v, x: m.apply(v, x, None)[0])
    jaxpr = str(jax.make_jaxpr(f)(qv, x))
    assert "preferred_element_type=int32" in jaxpr  # the scan body runs the int8 dot
    _close(jax.jit(f)(qv, x), _deq_ref(lambda v, x: m.apply(v, x, None)[0], qv, x), rel=0.05)
    qw = _quantize(v, jqx.int4_weight_only(group_size=8))
    _close(jax.jit(f)(qw, x), _deq_ref(lambda v, x: m.apply(v, x, None)[0], qw, x))


# --------------------------------------------------------------------------- flax.nnx


class _Nnx(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(K, K, rngs=rngs)
        self.b = nnx.Linear(K, N, rngs=rngs)

    def __call__(self, x):
        return self.b(nnx.relu(self.a(x)))


@pytest.mark.parametrize(
    "recipe",
    [jqx.int8_weight_only(), jqx.int8_dynamic_activation_int8_weight()],
    ids=["int8", "w8a8"],
)
def test_nnx_split_merge_and_nnx_jit(recipe):
    model = _Nnx(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    qstate = _quantize(state, recipe)
    assert sum(jqx.is_qarray(a) for a in jax.tree.leaves(qstate, is_leaf=jqx.is_qarray)) == 2

    def fwd(s, x):
        return nnx.merge(graphdef, s)(x)

    x = _x()
    ref = _deq_ref(fwd, qstate, x)
    rel = 0.05 if recipe.act else 1e-5
    _close(jax.jit(jqx.quantized(fwd))(qstate, x), ref, rel)
    _close(nnx.jit(jqx.quantized(fwd))(qstate, x), ref, rel)


# --------------------------------------------------------------------------- map_dots / capture_inputs


def test_capture_inputs_order_and_shapes():
    class Mlp(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(K, name="second")(
                nn.Dense(K, name="first")(x)
            )  # forward order != name order
            return nn.Dense(N, name="a_last")(h)

    m = Mlp()
    x = _x((2, 3, K))
    v = m.init(jax.random.key(0), x)
    paths = ["params/a_last/kernel", "params/first/kernel", "params/second/kernel"]
    out, rec = transform.capture_inputs(m.apply, paths)(v, x)
    assert list(rec) == ["params/first/kernel", "params/second/kernel", "params/a_last/kernel"]
    np.testing.assert_allclose(rec["params/first/kernel"][0], x.reshape(6, K))
    assert all(r[0].shape == (6, K) for r in rec.values())
    _close(out, m.apply(v, x))
    with pytest.raises(ValueError, match="not leaves"):
        transform.capture_inputs(m.apply, ["params/nope/kernel"])(v, x)


def test_capture_inputs_through_transpose_cast_and_scan():
    params = {"e": _x((N, K), 0), "s": _x((3, K, K), 4)}

    def f(p, x):
        h, _ = lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, p["s"])
        return h.astype(jnp.bfloat16) @ p["e"].T.astype(jnp.bfloat16)

    x = _x()
    out, rec = transform.capture_inputs(f, ["e", "s"])(params, x)
    assert list(rec) == ["s", "e"]
    assert rec["s"][0].shape == (3, M, K)
    np.testing.assert_allclose(rec["s"][0][0], x)
    assert rec["e"][0].shape == (M, K) and rec["e"][0].dtype == jnp.bfloat16
    _close(out, f(params, x), rel=1e-2)


def test_capture_inputs_with_quantized_params():
    """GPTQ-style sequential use: earlier layers already quantized."""
    params = {"a": _x((K, K), 0), "b": _x((K, N), 3)}
    q = {"a": jqx.int8_weight_only().quantize_weight(params["a"]), "b": params["b"]}
    f = lambda p, x: jnp.tanh(x @ p["a"]) @ p["b"]  # noqa: E731
    _, rec = transform.capture_inputs(f, ["b"])(q, _x())
    with jax.default_matmul_precision("highest"):
        _close(rec["b"][0], jnp.tanh(_x() @ q["a"].dequantize()))


def test_map_dots_rule_sees_stored_layout():
    params = {"e": _x((N, K), 0)}
    seen = []

    def rule(path, lhs, rhs, dn, precision, pet, w_is_lhs):
        seen.append((path, rhs.shape, dn, w_is_lhs))
        return 2.0 * lax.dot_general(lhs, rhs, dn, precision=precision, preferred_element_type=pet)

    f = lambda p, x: x @ p["e"].T  # noqa: E731
    y = jax.jit(transform.map_dots(f, ["e"], rule))(params, _x())
    _close(y, 2.0 * f(params, _x()))
    assert seen == [("e", (N, K), (((1,), (1,)), ((), ())), False)]


def test_nnx_scan_stacked_layers():
    class Block(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(K, K, rngs=rngs)

        def __call__(self, x):
            return jnp.tanh(self.lin(x))

    blocks = nnx.vmap(lambda key: Block(nnx.Rngs(key)))(jax.random.split(jax.random.key(0), 3))
    graphdef, state = nnx.split(blocks)

    def fwd(s, x):
        step = nnx.scan(lambda b, c: b(c), in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        return step(nnx.merge(graphdef, s), x)

    qstate = _quantize(state, jqx.int8_dynamic_activation_int8_weight())
    x = _x((M, K))
    assert "preferred_element_type=int32" in str(jax.make_jaxpr(jqx.quantized(fwd))(qstate, x))
    _close(jax.jit(jqx.quantized(fwd))(qstate, x), _deq_ref(fwd, qstate, x), rel=0.05)


@pytest.mark.parametrize(
    "recipe",
    [jqx.int8_weight_only(axis=-1), jqx.int4_weight_only(group_size=8, axis=-1)],
    ids=["int8", "int4"],
)
def test_embedding_lookup_decodes_only_the_gathered_rows(recipe):
    vocab = 1000
    m = nn.Embed(vocab, K)
    ids = jnp.array([[1, 5, 999], [0, 0, 7]])
    v = m.init(jax.random.key(0), ids)
    qv = _quantize(v, recipe, filter_fn=ALL)
    f = jqx.quantized(m.apply)
    assert f"f32[{vocab},{K}]" not in str(jax.make_jaxpr(f)(qv, ids))
    y = jax.jit(f)(qv, ids)
    np.testing.assert_array_equal(y, m.apply(jqx.dequantize(qv), ids))
    g = jqx.quantized(lambda p, i: p["params"]["embedding"][i])
    np.testing.assert_array_equal(g(qv, ids), y)


@pytest.mark.parametrize("act_scale_shape", [(1,), (3, 1)], ids=["shared", "per_layer"])
def test_scan_static_act_scale_and_in_scale_shared_across_layers(act_scale_shape):
    """A per-tensor act_scale (1,) or one per layer (L, 1), and an in_scale
    (K, 1) of a stacked weight: the scanned body still runs the int8 dot."""
    Scanned = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    m = Scanned()
    x = _x()
    v = m.init(jax.random.key(0), x, None)
    q = _quantize(v, jqx.int8_dynamic_activation_int8_weight())
    (path,) = [
        jqx.path_str(kp)
        for kp, a in jax.tree_util.tree_flatten_with_path(q, is_leaf=jqx.is_qarray)[0]
        if jqx.is_qarray(a)
    ]
    qs = jax.tree.map(
        lambda a: (
            a.replace(
                act=jqx.ActSpec("static", "int8", "per_tensor"),
                act_scale=jnp.full(act_scale_shape, 4.0 / 127, jnp.float32),
                in_scale=jnp.linspace(0.5, 2.0, K).reshape(K, 1),
            )
            if jqx.is_qarray(a)
            else a
        ),
        q,
        is_leaf=jqx.is_qarray,
    )
    f = jqx.quantized(lambda v, x: m.apply(v, x, None)[0])
    assert "preferred_element_type=int32" in str(jax.make_jaxpr(f)(qs, x))
    _close(jax.jit(f)(qs, x), _deq_ref(lambda v, x: m.apply(v, x, None)[0], qs, x), rel=0.05)
    assert path.endswith("kernel")


def test_activation_matmuls_quantizes_attention_like_dots():
    """activation_matmuls="int8": a matmul of two activations (attention's
    q @ k^T inside a jnp.einsum jit) runs on per-row int8 codes, within the
    bound of both operands' rounding; without it the product stays float."""
    k1, k2, k3 = jax.random.split(jax.random.key(7), 3)
    w = jax.random.normal(k1, (16, 16), jnp.float32)
    x = jax.random.normal(k2, (2, 8, 16), jnp.float32)
    qw = jqx.quantize_array(w, "int8", granularity=jqx.per_channel(-1))

    def f(w, x):
        q = x @ w
        return jnp.einsum("bqd,bkd->bqk", q, x)

    ref_q = x @ qw.dequantize()
    ref = jnp.einsum("bqd,bkd->bqk", ref_q, x)
    y_float = jax.jit(jqx.quantized(f))(qw, x)
    y_int8 = jax.jit(jqx.quantized(f, activation_matmuls="int8"))(qw, x)
    np.testing.assert_allclose(np.asarray(y_float), np.asarray(ref), rtol=1e-5, atol=1e-4)
    # per-row absmax int8 on both operands: |err| <= sa/2 sum|b| + sb/2 sum|a| + sa sb K/4
    sa = jnp.max(jnp.abs(ref_q), -1, keepdims=True) / 127  # (b, q, 1)
    sb = jnp.max(jnp.abs(x), -1)[:, None, :] / 127  # (b, 1, k)
    bound = (
        sa / 2 * jnp.sum(jnp.abs(x), -1)[:, None, :]
        + sb / 2 * jnp.sum(jnp.abs(ref_q), -1)[..., None]
        + sa * sb * 16 / 4
    )
    err = jnp.abs(y_int8 - ref)
    assert bool(jnp.all(err <= bound * 1.01 + 1e-4))
    assert float(jnp.max(err)) > 1e-4  # really quantized
    jaxpr = str(jax.make_jaxpr(jqx.quantized(f, activation_matmuls="int8"))(qw, x))
    assert jaxpr.count("preferred_element_type=int32") >= 1
    with pytest.raises(ValueError, match="activation_matmuls"):
        jqx.quantized(f, activation_matmuls="int4")


def _gemm_and_erf_count(f, *args):
    """The native GEMM calls and the erfc and tanh ops XLA is left with."""
    text = f.lower(*args).as_text()
    return text.count("jqx_f32_gemm"), text.count("erfc") + text.count("tanh")


@pytest.mark.skipif(not native.available(), reason=native.status())
def test_dense_bias_and_gelu_run_in_the_gemm_epilogue():
    """A Dense layer's bias add, and jax.nn.gelu(approximate=False) after it, run inside
    the native float32 GEMM: the bias bit for bit (the same bits as the GEMM, then XLA's
    add), the GELU within its bound; with epilogue=False XLA's ops run after it."""

    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.gelu(nn.Dense(256)(x), approximate=False)  # bias and GELU
            h = nn.Dense(64)(h)  # bias only
            return h + nn.Dense(64, use_bias=False)(x)  # no bias: the plain product

    x = jnp.asarray(np.random.default_rng(5).standard_normal((4, 64, 128)), jnp.float32)
    m = M()
    v = m.init(jax.random.key(0), x)
    # 256 rows here; mlp_kernel=False: each layer its own GEMM call (the MLP below).
    with jqx.ops.policy(f32_kernel_min_rows=128, mlp_kernel=False):
        f = jax.jit(jqx.quantized(m.apply))
        assert _gemm_and_erf_count(f, v, x) == (3, 0)
        got = np.asarray(f(v, x))
        with jqx.ops.policy(epilogue=False):
            g = jax.jit(jqx.quantized(m.apply))
            assert _gemm_and_erf_count(g, v, x) == (3, 1)
            unfused = np.asarray(g(v, x))
    # With the MLP kernel the first two layers are one jqx_f32_mlp call: the same bits.
    with jqx.ops.policy(f32_kernel_min_rows=128):
        h = jax.jit(jqx.quantized(m.apply))
        assert _gemm_and_erf_count(h, v, x) == (1, 0)
        assert h.lower(v, x).as_text().count("jqx_f32_mlp") == 1
        np.testing.assert_array_equal(np.asarray(h(v, x)), got)
    want = np.asarray(m.apply(v, x))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    np.testing.assert_allclose(got, unfused, rtol=1e-5, atol=1e-5 * np.abs(want).max())

    # One layer, its pre-activations and its GELU: the bias bit for bit, the GELU bound.
    p = v["params"]["Dense_0"]
    pre = jqx.quantized(lambda p, x: x @ p["kernel"] + p["bias"])
    act = jqx.quantized(lambda p, x: jax.nn.gelu(x @ p["kernel"] + p["bias"], approximate=False))
    with jqx.ops.policy(f32_kernel_min_rows=128):
        f_pre = np.asarray(jax.jit(pre)(p, x))
        y = np.asarray(jax.jit(act)(p, x))
    gemm = np.asarray(native.f32_matmul(x, p["kernel"]))
    np.testing.assert_array_equal(f_pre, gemm + np.asarray(p["bias"]))
    assert_gelu_within_bound(f_pre, y)
    # Gradients through the epilogue are XLA's ops' (custom_jvp).
    with jqx.ops.policy(f32_kernel_min_rows=128):
        grad = jax.grad(lambda v: jqx.quantized(m.apply)(v, x).sum())(v)
    grad0 = jax.grad(lambda v: m.apply(v, x).sum())(v)
    chex.assert_trees_all_close(grad, grad0, rtol=1e-4, atol=1e-3)


@pytest.mark.skipif(not native.available(), reason=native.status())
def test_epilogue_only_where_the_chain_is_the_layers_alone():
    """The bias and GELU fold only where each step's output feeds just the next: a
    product or pre-activation used again, another activation, a full-shape add (a
    residual) and a quantized weight on XLA keep the ops as written, the same bits as
    without the epilogue (the tanh GELU folds: then its bound)."""
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((256, 96)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((96, 80)) / 10, jnp.float32)
    b = jnp.asarray(rng.standard_normal(80), jnp.float32)
    r = jnp.asarray(rng.standard_normal((256, 80)), jnp.float32)
    gelu = functools.partial(jax.nn.gelu, approximate=False)

    def twice(w, b, x):
        y = x @ w
        return y + b, y

    def pre_twice(w, b, x):
        f = x @ w + b
        return gelu(f) + f

    cases = {
        "product used twice": (twice, (1, 0)),
        "pre-activation used twice": (pre_twice, (1, 1)),
        "another activation: the bias only": (lambda w, b, x: jnp.tanh(x @ w + b), (1, 1)),
        "ReLU: folded, bit for bit": (lambda w, b, x: jax.nn.relu(x @ w + b), (1, 0)),
        "residual, not a bias": (lambda w, b, x: gelu(x @ w + r), (1, 1)),
        "bias before the product": (lambda w, b, x: gelu((x + 1.0) @ w) + b, (1, 1)),
    }
    small = {"f32_kernel_min_rows": 128, "f32_kernel_min_work": 0}
    for name, (fn, counts) in cases.items():
        with jqx.ops.policy(**small):
            f = jax.jit(jqx.quantized(fn))
            assert _gemm_and_erf_count(f, w, b, x) == counts, name
            got = f(w, b, x)
            with jqx.ops.policy(epilogue=False):
                want = jax.jit(jqx.quantized(fn))(w, b, x)
        chex.assert_trees_all_equal(got, want)
    # The tanh GELU (jax.nn.gelu's default) folds too: within its bound.
    with jqx.ops.policy(**small):
        f = jax.jit(jqx.quantized(lambda w, b, x: jax.nn.gelu(x @ w + b)))
        assert _gemm_and_erf_count(f, w, b, x) == (1, 0)
        pre = jax.jit(jqx.quantized(lambda w, b, x: x @ w + b))(w, b, x)
        assert_gelu_tanh_within_bound(pre, f(w, b, x))
    # A quantized weight: the int8 product, then XLA's add and GELU, as before.
    qw = jqx.quantize_array(w, "int8", granularity=jqx.per_channel(-1))
    fn = jqx.quantized(lambda w, b, x: gelu(x @ w + b))
    with jqx.ops.policy(**small):
        got = np.asarray(jax.jit(fn)(qw, b, x))
    with jqx.ops.policy(**small, epilogue=False):
        np.testing.assert_array_equal(got, np.asarray(jax.jit(fn)(qw, b, x)))
    np.testing.assert_allclose(got, np.asarray(gelu(x @ qw.dequantize() + b)), atol=1e-5)


@pytest.mark.skipif(not native.available(), reason=native.status())
@pytest.mark.parametrize("recipe", ["w8a8", "int8_weight_only"])
def test_quantized_dense_bias_and_gelu_in_the_int8_kernel(recipe):
    """With int8 weights the bias and GELU after a Dense layer run in the VNNI kernel's
    epilogue (one call per layer, no erfc left to XLA), at every batch size; with
    epilogue=False XLA's ops run after the kernel. The pre-activations are the same
    bits either way."""
    r = {
        "w8a8": jqx.int8_dynamic_activation_int8_weight(),
        "int8_weight_only": jqx.int8_weight_only(),
    }[recipe]

    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.gelu(nn.Dense(128)(x), approximate=False)
            return nn.Dense(64)(h)

    x = jnp.asarray(np.random.default_rng(8).standard_normal((2, 16, 96)), jnp.float32)
    m = M()
    v = jqx.quantize(m.init(jax.random.key(0), x), r)
    f = jax.jit(jqx.quantized(m.apply))
    text = f.lower(v, x).as_text()
    assert text.count("jqx_w8a8_vnni") == 2 and "erfc" not in text
    with jqx.ops.policy(epilogue=False):
        g = jax.jit(jqx.quantized(m.apply))
        assert "erfc" in g.lower(v, x).as_text()
        unfused = np.asarray(g(v, x))
    got = np.asarray(f(v, x))
    # The second layer's int8 input quantization can round a GELU output differently.
    np.testing.assert_allclose(got, unfused, atol=0.05 * np.abs(unfused).max())
    p0 = v["params"]["Dense_0"]
    pre = jax.jit(jqx.quantized(lambda p, x: x @ p["kernel"] + p["bias"]))(p0, x)
    act = jax.jit(jqx.quantized(lambda p, x: nn.gelu(x @ p["kernel"] + p["bias"], False)))
    with jqx.ops.policy(epilogue=False):
        pre_xla = jax.jit(jqx.quantized(lambda p, x: x @ p["kernel"] + p["bias"]))(p0, x)
    np.testing.assert_array_equal(np.asarray(pre), np.asarray(pre_xla))
    assert_gelu_within_bound(pre, act(p0, x))


@pytest.mark.skipif(not native.available(), reason=native.status())
@pytest.mark.parametrize("recipe", ["w8a8", "int8_weight_only"])
def test_quantized_mlp_runs_as_one_native_call(recipe):
    """Dense -> activation -> Dense (through a no-op dropout's copies) runs as one
    jqx.ops.mlp call, one native call of both layers: the same bits as the two layers'
    calls (policy(mlp_kernel=False)); of three Dense layers the first two pair. A
    hidden activation used again, a second layer
    with an activation of its own, and activation_matmuls keep two calls."""
    r = {
        "w8a8": jqx.int8_dynamic_activation_int8_weight(),
        "int8_weight_only": jqx.int8_weight_only(),
    }[recipe]

    class M(nn.Module):
        kind: str

        @nn.compact
        def __call__(self, x):
            h = nn.Dense(128)(x)
            h = nn.relu(h) if self.kind == "relu" else nn.gelu(h, approximate=False)
            h = nn.Dropout(0.1, deterministic=True)(h)
            y = nn.Dense(64)(h)
            if self.kind == "three layers":  # the first two pair; the third runs alone
                return nn.Dense(32)(y)
            if self.kind == "hidden used again":
                return y + h[..., :64]
            if self.kind == "second activation":
                return nn.gelu(y)
            return x[..., :64] + y

    x = jnp.asarray(np.random.default_rng(9).standard_normal((4, 80, 96)), jnp.float32)
    cases = {
        "gelu": 1,
        "relu": 1,
        "three layers": 1,
        "hidden used again": 0,
        "second activation": 0,
    }
    for kind, fused in cases.items():
        m = M(kind)
        v = jqx.quantize(m.init(jax.random.key(0), x), r)
        f = jax.jit(jqx.quantized(m.apply))
        assert f.lower(v, x).as_text().count("jqx_w8a8_mlp") == fused, kind
        got = np.asarray(f(v, x))
        with jqx.ops.policy(mlp_kernel=False):
            g = jax.jit(jqx.quantized(m.apply))
            assert "jqx_w8a8_mlp" not in g.lower(v, x).as_text()
            np.testing.assert_array_equal(got, np.asarray(g(v, x)), err_msg=kind)
        np.testing.assert_allclose(
            got, np.asarray(m.apply(jqx.dequantize(v), x)), atol=0.06, err_msg=kind
        )
    m = M("gelu")
    v = jqx.quantize(m.init(jax.random.key(0), x), r)
    f = jax.jit(jqx.quantized(m.apply, activation_matmuls="int8"))
    assert "jqx_w8a8_mlp" not in f.lower(v, x).as_text()

    # Inside a jit call of the program's own (the interpreter enters it).
    def fn(p, x):
        @jax.jit
        def ffn(x):
            h = jax.nn.relu(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
            return h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]

        return ffn(x) * 2.0

    f = jax.jit(jqx.quantized(fn))
    assert f.lower(v["params"], x).as_text().count("jqx_w8a8_mlp") == 1
    with jqx.ops.policy(mlp_kernel=False):
        want = jax.jit(jqx.quantized(fn))(v["params"], x)
    np.testing.assert_array_equal(np.asarray(f(v["params"], x)), np.asarray(want))


@pytest.mark.skipif(not native.available(), reason=native.status())
def test_float_products_run_on_the_native_gemm_within_the_bound():
    """jqx.quantized sends float32 products (no QArray operand) to
    jqx.ops.float_dot_general: nn.Dense, nn.DenseGeneral and `@` inside an inner jit run
    on the native float32 GEMM, to float32 rounding of XLA's result; with
    f32_kernel=False (or backend='xla') the program is XLA's, bit for bit."""

    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(256)(x)
            h = nn.DenseGeneral((4, 64))(h)  # a 3-D kernel
            h = nn.DenseGeneral(128, axis=(-2, -1))(h)
            return jax.jit(lambda a, b: a @ b)(h, jnp.ones((128, 96)))  # an inner jit

    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 64, 128)), jnp.float32)
    m = M()
    v = m.init(jax.random.key(0), x)
    want = np.asarray(jax.jit(m.apply)(v, x))
    with jqx.ops.policy(f32_kernel_min_rows=128):  # 256 rows here; the default is 2048
        f = jax.jit(jqx.quantized(m.apply))
        assert f.lower(v, x).as_text().count("jqx_f32_gemm") == 4
        got = np.asarray(f(v, x))  # traced here: the policy is read while tracing
    assert "jqx_f32_gemm" not in jax.jit(jqx.quantized(m.apply)).lower(v, x).as_text()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    with jqx.ops.policy(f32_kernel=False):
        g = jax.jit(jqx.quantized(m.apply))
        assert "jqx_f32_gemm" not in g.lower(v, x).as_text()
        np.testing.assert_array_equal(np.asarray(g(v, x)), want)
    g = jax.jit(jqx.quantized(m.apply, backend="xla"))
    assert "jqx_f32_gemm" not in g.lower(v, x).as_text()
    np.testing.assert_array_equal(np.asarray(g(v, x)), want)
    # Gradients through the native products are XLA's dots' (custom_jvp).
    with jqx.ops.policy(f32_kernel_min_rows=128):
        grad = jax.grad(lambda v: jqx.quantized(m.apply)(v, x).sum())(v)
    grad0 = jax.grad(lambda v: m.apply(v, x).sum())(v)
    chex.assert_trees_all_close(grad, grad0, rtol=1e-4, atol=1e-3)

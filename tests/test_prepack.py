"""jqx.prepack (jqx/ops/layout.py): int8 weights packed once for the native GEMM.

What gets packed, that the values never change, that every path computes the same
products from packed weights (the native GEMM reading the panels, XLA unpacking them),
and that a packed tree saves, loads and shards."""

import os
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jqx
from jqx.kernels.cpu import native
from jqx.llm.ptq import transpose_qarray

DN = (((1,), (0,)), ((), ()))
HAS_NATIVE = jqx.ops.native_status() == "available"  # JQX_NATIVE=0 turns routing off
W8A8 = jqx.int8_dynamic_activation_int8_weight()


def _layouts(tree):
    return {
        jqx.path_str(p): leaf.code_layout
        for p, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=jqx.is_qarray)[0]
        if jqx.is_qarray(leaf)
    }


class _Model(nn.Module):
    """A Dense MLP, linen's own attention (DenseGeneral kernels), a convolution and an
    embedding: the weights a user's model has."""

    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(50, 32)(ids)
        h = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=32)(h, h)
        h = nn.Conv(32, (3,), padding="SAME")(h)
        h = nn.Dense(48)(jax.nn.gelu(h))
        return nn.Dense(32)(h)


@pytest.fixture(scope="module")
def model():
    m = _Model()
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 50, (3, 9)), jnp.int32)
    return m, m.init(jax.random.key(0), ids), ids


def test_what_gets_packed(model):
    _, variables, _ = model
    q = jqx.quantize(variables, W8A8, embeddings=True, prepack=False)
    p = jqx.prepack(q, layout="vnni")
    lay = _layouts(p)
    # Dense (in, out) and attention (in, heads, head_dim) / (heads, head_dim, out)
    # kernels are packed, and the per-row embedding table (as (out, in): lookups read
    # rows out of the panels); the convolution is not.
    assert lay["params/Dense_0/kernel"] == lay["params/Dense_1/kernel"] == "vnni"
    for name in ("query", "key", "value", "out"):
        assert lay[f"params/MultiHeadDotProductAttention_0/{name}/kernel"] == "vnni"
    assert lay["params/Conv_0/kernel"] == "plain"
    assert lay["params/Embed_0/embedding"] == "vnni"
    assert all(v == "plain" for v in _layouts(q).values())  # the input is unchanged
    d0, d1 = jqx.dequantize(q), jqx.dequantize(p)
    for a, b in zip(jax.tree_util.tree_leaves(d0), jax.tree_util.tree_leaves(d1), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    back = jqx.prepack(p, layout="plain")
    assert all(v == "plain" for v in _layouts(back).values())
    for a, b in zip(jax.tree_util.tree_leaves(q), jax.tree_util.tree_leaves(back), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_other_formats_stay_plain(model):
    _, variables, _ = model
    for recipe in (jqx.int4_weight_only(group_size=16), jqx.fp8_weight_only()):
        q = jqx.quantize(variables, recipe)
        assert set(_layouts(jqx.prepack(q, layout="vnni")).values()) == {"plain"}


@pytest.mark.parametrize("recipe", ["w8a8", "w8a8_tensor", "int8_weight_only"])
def test_model_outputs_identical_packed_or_not(model, recipe):
    """The whole model through jqx.quantized, packed and plain, on the same routes
    (native where it runs here, forced for every size; XLA elsewhere): bit for bit."""
    m, variables, ids = model
    r = {
        "w8a8": W8A8,
        "w8a8_tensor": jqx.int8_dynamic_activation_int8_weight(act_granularity="per_tensor"),
        "int8_weight_only": jqx.int8_weight_only(),
    }[recipe]
    q = jqx.quantize(variables, r, embeddings=True, prepack=False)
    p = jqx.prepack(q, layout="vnni")
    assert _layouts(p)["params/Embed_0/embedding"] == "vnni"
    with jqx.ops.policy(native_min_work=0, native_min_weight=0, native_decode_rows=0):
        y_plain = jax.jit(jqx.quantized(m.apply))(q, ids)
        y_packed = jax.jit(jqx.quantized(m.apply))(p, ids)
    np.testing.assert_array_equal(np.asarray(y_packed), np.asarray(y_plain))


@pytest.mark.parametrize("rows", [1, 5, 7, 64])
@pytest.mark.parametrize("act", ["dynamic", "static", "weight_only"])
def test_products_on_every_route(rows, act):
    """One product, packed: the dispatcher's choice (the native GEMM at every size where
    it runs), and XLA (which unpacks), equal the plain weight's XLA product."""
    rng = np.random.default_rng(rows)
    w = jnp.asarray(rng.standard_normal((72, 40)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((rows, 72)), jnp.float32)
    if act == "weight_only":
        q = jqx.int8_weight_only().quantize_weight(w)
    else:
        q = W8A8.quantize_weight(w)
        if act == "static":
            q = q.replace(
                act=jqx.ActSpec(kind="static", granularity="per_tensor"),
                act_scale=jnp.asarray(0.021, jnp.float32),
            )
    p = q.with_code_layout("vnni")
    f = jax.jit(lambda x, q: jqx.ops.dot_general(x, q, DN))
    fx = jax.jit(lambda x, q: jqx.ops.dot_general(x, q, DN, backend="xla"))
    np.testing.assert_array_equal(np.asarray(fx(x, p)), np.asarray(fx(x, q)))
    route = jqx.ops.explain(x, p, DN)
    if HAS_NATIVE:
        assert route.startswith("native."), route
        # The native route the plain weight would take when forced to, on the same data.
        with jqx.ops.policy(native_min_work=0, native_min_weight=0, native_decode_rows=0):
            want = jax.jit(lambda x, q: jqx.ops.dot_general(x, q, DN))(x, q)
            assert jqx.ops.explain(x, q, DN) == route
        np.testing.assert_array_equal(np.asarray(f(x, p)), np.asarray(want))
    with jqx.ops.policy(native_available=False):
        assert not jqx.ops.explain(x, p, DN).startswith("native.")
        y = jax.jit(lambda x, q: jqx.ops.dot_general(x, q, DN))(x, p)
        y_plain = jax.jit(lambda x, q: jqx.ops.dot_general(x, q, DN))(x, q)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_plain))


def test_lookup_in_a_packed_table():
    t = jax.random.normal(jax.random.key(3), (37, 21))
    q = jqx.quantize_array(t, "int8", granularity=jqx.per_channel(axis=-1))
    p = q.with_code_layout("vnni")
    ids = jnp.array([[0, 36, 5], [3, 4, 35]])
    np.testing.assert_array_equal(
        np.asarray(jqx.ops.take(p, ids)), np.asarray(jqx.ops.take(q, ids))
    )


def test_checkpoint_keeps_the_layout(tmp_path, model):
    _, variables, _ = model
    p = jqx.prepack(jqx.quantize(variables, W8A8), layout="vnni")
    g = jqx.per_group(32, axis=1)
    p["kn"] = jqx.quantize_array(jnp.ones((8, 64)), "int4", granularity=g).with_code_layout("kn")
    path = os.path.join(tmp_path, "packed.jqx")
    jqx.save(path, p)
    r = jqx.load(path)
    assert _layouts(r) == _layouts(p)
    for a, b in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(r), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sharding_specs_of_panels():
    q = jqx.quantize_array(jnp.ones((64, 64)), "int8", granularity=jqx.per_channel(axis=-1))
    p = q.with_code_layout("vnni")
    s = jqx.sharding.qarray_specs(p, P(None, "m"), {"m": 2})
    assert s.qvalue == P("m", None, None) and s.scale == P(None, "m")
    assert jqx.sharding.qarray_specs(p, P("m", None), {"m": 4}).qvalue == P(None, "m", None)
    with pytest.raises(ValueError, match="panels split N=64 in units of 16"):
        jqx.sharding.qarray_specs(p, P(None, "m"), {"m": 8})
    # A mesh axis of size 1 holds every panel, padded or not (N=20: two panels, 12 padded).
    odd = jqx.quantize_array(jnp.ones((64, 20)), "int8", granularity=jqx.per_channel(axis=-1))
    s = jqx.sharding.qarray_specs(odd.with_code_layout("vnni"), P("k", "m"), {"m": 1, "k": 1})
    assert s.qvalue == P("m", "k", None)
    # (out, in): the outputs are axis 0, the contraction axis 1.
    t = jqx.quantize_array(jnp.ones((64, 32)), "int8", granularity=jqx.per_channel(axis=0))
    t = t.with_code_layout("vnni")
    assert jqx.sharding.qarray_specs(t, P("m", None), {"m": 2}).qvalue == P("m", None, None)
    assert jqx.sharding.qarray_specs(t, P(None, "m"), {"m": 2}).qvalue == P(None, "m", None)
    # "kn": the children are the (in, out) transpose, so their specs swap the axes.
    g = jqx.per_group(32, axis=1)
    kn = jqx.quantize_array(jnp.ones((64, 128)), "int4", granularity=g).with_code_layout("kn")
    s = jqx.sharding.qarray_specs(kn, P("m", None), {"m": 2})
    assert s.qvalue == P(None, "m") and s.scale == P(None, "m")


def test_native_layout_where_the_gemm_does_not_run_warns_and_keeps_the_tree():
    q = jqx.quantize({"kernel": jnp.ones((32, 32))}, W8A8, prepack=False)
    with jqx.ops.policy(native_available=False):
        with pytest.warns(UserWarning, match="layout='vnni'"):
            assert jqx.prepack(q) is q
    if HAS_NATIVE:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert _layouts(jqx.prepack(q)) == {"kernel": "vnni"}


def test_quantize_packs_by_default_where_the_gemm_runs(model):
    """jqx.quantize(prepack=None) packs the weights that fill whole panels where the GEMM
    runs (one device here), none elsewhere; True packs every eligible weight, padding
    included; False none. The values never change."""
    _, variables, _ = model
    v = {**variables, "odd": {"kernel": jnp.ones((30, 20))}}  # K % 4, N % 16 != 0
    plain = jqx.quantize(v, W8A8, prepack=False)
    assert set(_layouts(plain).values()) == {"plain"}
    default = jqx.quantize(v, W8A8)
    packed = {p for p, lay in _layouts(default).items() if lay == "vnni"}
    whole = {
        "params/Dense_0/kernel",  # (32, 48)
        "params/Dense_1/kernel",  # (48, 32)
        *(f"params/MultiHeadDotProductAttention_0/{n}/kernel" for n in ("query", "key", "value")),
        "params/MultiHeadDotProductAttention_0/out/kernel",
    }
    assert packed == (whole if HAS_NATIVE else set()), packed
    assert jqx.tree_nbytes(default) == jqx.tree_nbytes(plain)  # whole panels: no padding
    with jqx.ops.policy(native_available=False):
        assert set(_layouts(jqx.quantize(v, W8A8)).values()) == {"plain"}
        forced = jqx.quantize(v, W8A8, prepack=True)  # whatever the machine, padding too
    assert {p for p, lay in _layouts(forced).items() if lay == "vnni"} == whole | {"odd/kernel"}
    for tree in (default, forced):
        for a, b in zip(
            jax.tree_util.tree_leaves(jqx.dequantize(plain)),
            jax.tree_util.tree_leaves(jqx.dequantize(tree)),
            strict=True,
        ):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_nothing_to_pack_asks_nothing_of_the_platform(monkeypatch):
    """A tree without a packable int8 weight (4-bit, or too narrow for whole panels) is
    returned as it is, without querying (and so building) the native kernels."""

    def no_query():
        raise AssertionError("native_status was queried")

    monkeypatch.setattr(jqx.ops.dispatch, "native_status", no_query)
    w = {"a": {"kernel": jnp.ones((64, 32))}, "b": {"kernel": jnp.ones((30, 20))}}
    q = jqx.quantize(w, {"a/": jqx.int4_weight_only(group_size=16), "b/": W8A8})
    assert set(_layouts(q).values()) == {"plain"}
    with pytest.raises(AssertionError, match="queried"):  # a packable weight does query
        jqx.quantize({"kernel": jnp.ones((64, 32))}, W8A8)


def test_calibrate_packs_like_quantize():
    rng = np.random.default_rng(0)
    params = {"kernel": jnp.asarray(rng.standard_normal((32, 32)), jnp.float32)}
    xs = [jnp.asarray(rng.standard_normal((4, 32)), jnp.float32)]
    recipe = jqx.int8_static_activation_int8_weight()

    def cal(**kw):
        return jqx.calibrate(lambda p, x: x @ p["kernel"], params, xs, recipe, progress=False, **kw)

    assert _layouts(cal()) == {"kernel": "vnni" if HAS_NATIVE else "plain"}
    assert _layouts(cal(prepack=False)) == {"kernel": "plain"}
    assert _layouts(cal(prepack=True)) == {"kernel": "vnni"}
    np.testing.assert_array_equal(
        np.asarray(cal(prepack=True)["kernel"].dequantize()),
        np.asarray(cal(prepack=False)["kernel"].dequantize()),
    )


@pytest.mark.parametrize("bad", ["vnni", 1, 0.5])
def test_bad_prepack_names_the_argument_and_the_choices(bad):
    with pytest.raises(TypeError, match=r"jqx.quantize\(prepack=.*None.*True.*False"):
        jqx.quantize({"kernel": jnp.ones((32, 32))}, W8A8, prepack=bad)
    with pytest.raises(TypeError, match=r"jqx.calibrate\(prepack="):
        jqx.calibrate(
            lambda p, x: x @ p["kernel"],
            {"kernel": jnp.ones((8, 8))},
            [jnp.ones((2, 8))],
            W8A8,
            progress=False,
            prepack=bad,
        )


def test_bad_layout():
    with pytest.raises(ValueError, match="'native'.*'vnni'.*'plain'"):
        jqx.prepack({}, layout="panels")


@pytest.mark.parametrize("rows", [1, 9])
@pytest.mark.parametrize("recipe", ["w8a8", "int8_weight_only"])
def test_out_in_weights_run_packed(rows, recipe):
    """x @ W.T with W (out, in), one scale per output row (the LLM's orientation): the
    packed weight runs on the GEMM at every size, with the plain weight's results on
    the same kernels, and unpacked on XLA."""
    rng = np.random.default_rng(rows)
    w = jnp.asarray(rng.standard_normal((56, 72)), jnp.float32)  # (out, in)
    x = jnp.asarray(rng.standard_normal((rows, 72)), jnp.float32)
    r = W8A8 if recipe == "w8a8" else jqx.int8_weight_only()
    q = r.quantize_weight(w.T)  # (in, out), per output channel
    q_t = transpose_qarray(q)  # (out, in), block (1, in)
    p = q_t.with_code_layout("vnni")
    dn_t = (((1,), (1,)), ((), ()))
    f = jax.jit(lambda x, w: jqx.ops.dot_general(x, w, dn_t))
    with jqx.ops.policy(native_available=False):
        y, y_plain = np.asarray(f(x, p)), np.asarray(f(x, q_t))
    if recipe == "w8a8":  # exact int32 sums: bit for bit
        np.testing.assert_array_equal(y, y_plain)
    else:  # XLA's float dot on the unpacked codes may sum in another order
        np.testing.assert_allclose(y, y_plain, rtol=1e-5, atol=1e-5)
    if HAS_NATIVE:
        assert jqx.ops.explain(x, p, dn_t).startswith("native.")
        g = jax.jit(lambda x, w: jqx.ops.dot_general(x, w, DN))
        with jqx.ops.policy(native_min_work=0, native_min_weight=0, native_decode_rows=0):
            want = g(x, q)  # the (in, out) weight on the same kernel
        # A new function: f's trace above was made under native_available=False.
        got = jax.jit(lambda x, w: jqx.ops.dot_general(x, w, dn_t))(x, p)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("rows", [1, 5, 40])
def test_kn_weights_run_as_their_stored_transpose(rows):
    """x @ W.T on a 'kn' 4-bit (out, in) weight runs on its (in, out) view: the native
    4-bit decode kernel up to 16 rows where it runs, XLA's dequantize-then-dot above;
    within float32 rounding of the plain weight's product."""
    rng = np.random.default_rng(rows)
    w = jnp.asarray(rng.standard_normal((1536, 576)), jnp.float32)  # (out, in)
    x = jnp.asarray(rng.standard_normal((rows, 576)), jnp.float32)
    q = transpose_qarray(jqx.int4_weight_only(group_size=32).quantize_weight(w.T))
    k = q.with_code_layout("kn")
    dn_t = (((1,), (1,)), ((), ()))
    f = jax.jit(lambda x, w: jqx.ops.dot_general(x, w, dn_t))
    np.testing.assert_allclose(np.asarray(f(x, k)), np.asarray(f(x, q)), rtol=1e-5, atol=2e-4)
    want = "native.w4" if HAS_NATIVE and rows <= native.W4_MAX_ROWS else "xla.dequantize_dot"
    assert jqx.ops.explain(x, k, dn_t) == want


@pytest.mark.parametrize("rows", [1, 40])
def test_kn_awq_weights_divide_x_then_run_the_view(rows):
    """An AWQ weight (in_scale on the input axis) in 'kn': x is divided by the in_scale,
    then the view's product runs on the native 4-bit kernel where it runs; within float32
    rounding of the plain weight's product."""
    from jqx.recipes.awq import awq_quantize

    rng = np.random.default_rng(rows)
    w = jnp.asarray(rng.standard_normal((576, 1536)), jnp.float32)  # (in, out)
    sample = jnp.asarray(rng.standard_normal((64, 576)) * np.linspace(0.1, 4, 576), jnp.float32)
    q = awq_quantize(w, sample, jqx.awq(bits=4, group_size=64))
    assert q.in_scale is not None
    q = transpose_qarray(q)  # (out, in), in_scale (1, in)
    k = q.with_code_layout("kn")
    x = jnp.asarray(rng.standard_normal((rows, 576)), jnp.float32)
    dn_t = (((1,), (1,)), ((), ()))
    f = jax.jit(lambda x, w: jqx.ops.dot_general(x, w, dn_t))
    want = x @ q.dequantize().T
    np.testing.assert_allclose(np.asarray(f(x, k)), np.asarray(want), rtol=1e-5, atol=3e-4)
    np.testing.assert_allclose(np.asarray(f(x, k)), np.asarray(f(x, q)), rtol=1e-5, atol=3e-4)
    if HAS_NATIVE and rows <= native.W4_MAX_ROWS:
        assert jqx.ops.explain(x, k, dn_t) == "native.w4"


@pytest.mark.parametrize("rows", [1, 40])
def test_kn_nvfp4_weights_fold_the_tensor_scale(rows):
    """NVFP4 weight-only in 'kn': the per-tensor scale is folded into the block scales
    per call, then the view's product runs on the native 4-bit kernel where it runs;
    the plain weight's product (folded too, on XLA) matches dequantize-then-dot."""
    rng = np.random.default_rng(rows)
    w = jnp.asarray(rng.standard_normal((1536, 576)), jnp.float32)  # (out, in)
    q = jqx.quantize_nvfp4(w)
    k = q.with_code_layout("kn")
    x = jnp.asarray(rng.standard_normal((rows, 576)), jnp.float32)
    dn_t = (((1,), (1,)), ((), ()))
    f = jax.jit(lambda x, w: jqx.ops.dot_general(x, w, dn_t))
    want = x @ q.dequantize().T
    np.testing.assert_allclose(np.asarray(f(x, q)), np.asarray(want), rtol=1e-5, atol=2e-4)
    np.testing.assert_allclose(np.asarray(f(x, k)), np.asarray(want), rtol=1e-5, atol=2e-4)
    if HAS_NATIVE and rows <= native.W4_MAX_ROWS:
        assert jqx.ops.explain(x, k, dn_t) == "native.w4"


@pytest.mark.parametrize("rows", [1, 40])
@pytest.mark.parametrize("recipe", ["fp8", "mxfp8"])
def test_kn_fp8_weights_run_as_their_stored_transpose(rows, recipe):
    """FP8 weight-only (per channel) and MXFP8 (E8M0 scales per 32) (out, in) weights in
    'kn': the same values; x @ W.T runs on the view, on the native FP8 kernel up to 16
    rows where it runs; within float32 rounding of the plain weight's product."""
    rng = np.random.default_rng(rows)
    w = jnp.asarray(rng.standard_normal((576, 1536)), jnp.float32)  # (in, out)
    r = jqx.fp8_weight_only() if recipe == "fp8" else jqx.mxfp8_weight_only()
    q = transpose_qarray(r.quantize_weight(w))
    k = q.with_code_layout("kn")
    np.testing.assert_array_equal(np.asarray(k.dequantize()), np.asarray(q.dequantize()))
    x = jnp.asarray(rng.standard_normal((rows, 576)), jnp.float32)
    dn_t = (((1,), (1,)), ((), ()))
    f = jax.jit(lambda x, w: jqx.ops.dot_general(x, w, dn_t))
    want = x @ q.dequantize().T
    np.testing.assert_allclose(np.asarray(f(x, k)), np.asarray(want), rtol=1e-5, atol=2e-4)
    if HAS_NATIVE and rows <= native.W4_MAX_ROWS:
        assert jqx.ops.explain(x, k, dn_t) == "native.fp8"
        # (in, out) Flax-style kernels take the same kernel without any layout.
        qi = r.quantize_weight(w)
        assert jqx.ops.explain(x, qi, DN) == "native.fp8"
        np.testing.assert_allclose(
            np.asarray(jqx.ops.dot_general(x, qi, DN)), np.asarray(x @ qi.dequantize()),
            rtol=1e-5, atol=2e-4,
        )  # fmt: skip


def test_llm_weights_are_stored_for_the_native_kernels():
    from jqx.llm.ptq import pack_llm_weights

    g = jqx.per_group(32, axis=1)
    t = {
        "int4": jqx.quantize_array(jnp.ones((64, 64)), "int4", granularity=g),
        "int8": jqx.quantize_array(jnp.ones((64, 64)), "int8", granularity=jqx.per_channel(0)),
        "float": jnp.ones((3,)),
    }
    p = pack_llm_weights(t)
    assert p["int4"].code_layout == "kn" and p["int8"].code_layout == "vnni"
    assert p["float"] is t["float"]
    # jqx.prepack(layout="plain") undoes both.
    assert set(_layouts(jqx.prepack(p, layout="plain")).values()) == {"plain"}


@pytest.mark.parametrize("rows", [1, 40])
def test_kn_act_order_products(rows):
    """GPTQ act_order weights in 'kn': x's inputs are taken in the stored order, then the
    view's product; within float32 rounding of the plain weight's (dequantize-then-dot)."""
    from jqx.core.numerics import stored_qarray
    from jqx.core.qarray import pack_4bit

    rng = np.random.default_rng(rows)
    out, k, g = 1536, 576, 64
    g_idx = np.empty(k, np.int32)
    g_idx[rng.permutation(k)] = np.arange(k) // g
    q = stored_qarray(
        qvalue=jnp.asarray(pack_4bit(rng.integers(0, 16, (out, k)).astype(np.uint8))),
        scale=jnp.asarray(rng.random((out, k // g)) * 0.1 + 0.01, jnp.float32),
        zero_point=jnp.full((out, k // g), 8.0, jnp.float32),
        g_idx=jnp.asarray(g_idx),
        format="uint4",
        shape=(out, k),
        dtype="float32",
        block=(1, g),
    )
    kn = q.with_code_layout("kn")
    x = jnp.asarray(rng.standard_normal((rows, k)), jnp.float32)
    dn_t = (((1,), (1,)), ((), ()))
    f = jax.jit(lambda x, w: jqx.ops.dot_general(x, w, dn_t))
    np.testing.assert_allclose(np.asarray(f(x, kn)), np.asarray(f(x, q)), rtol=1e-5, atol=1e-4)
    if HAS_NATIVE and rows <= native.W4_MAX_ROWS:
        assert jqx.ops.explain(x, kn, dn_t) == "native.w4"

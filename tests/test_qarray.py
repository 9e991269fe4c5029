"""QArray: packing, footprint, pytree behaviour (jit, vmap, device_put,
flatten/unflatten, tree_map), repr and misuse."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jqx
from jqx.core.qarray import pack_4bit, pack_bits, unpack_4bit, unpack_bits

W = jnp.asarray(np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32))


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 8), (2, 3, 5)])
@given(data=st.data())
def test_pack_unpack_round_trip(shape, data):
    codes = data.draw(hnp.arrays(np.uint8, shape, elements=st.integers(0, 15)))
    packed = pack_4bit(jnp.asarray(codes))
    assert packed.dtype == jnp.uint8
    assert packed.shape == shape[:-1] + ((shape[-1] + 1) // 2,)
    np.testing.assert_array_equal(np.asarray(unpack_4bit(packed, shape[-1])), codes)
    # low nibble = even index
    flat = codes.reshape(-1, shape[-1])
    np.testing.assert_array_equal(
        np.asarray(packed).reshape(flat.shape[0], -1)[:, 0] & 0xF, flat[:, 0]
    )


def test_packing_matches_ml_dtypes_uint4_bitcast():
    # DESIGN: lax.bitcast_convert_type(uint8 -> uint4) unpacks low nibble first
    codes = jnp.arange(16, dtype=jnp.uint8).reshape(2, 8)
    packed = pack_4bit(codes)
    nib = jax.lax.bitcast_convert_type(packed, jnp.uint4).reshape(2, 8)
    np.testing.assert_array_equal(np.asarray(nib.astype(jnp.uint8)), np.asarray(codes))


@pytest.mark.parametrize(
    "fmt,scheme,code_bytes",
    [
        ("int8", "absmax", 128),
        ("int4", "absmax", 64),
        ("uint4", "zero_point", 64),
        ("nf4", "absmax", 64),
        ("fp8_e4m3", "absmax", 128),
    ],
)
def test_nbytes_is_the_true_footprint(fmt, scheme, code_bytes):
    q = jqx.quantize_array(W, fmt, scheme=scheme, granularity=jqx.per_group(4, axis=0))
    n_scales = 4 * 8
    assert q.nbytes == code_bytes + n_scales * 4 * (2 if scheme == "zero_point" else 1)
    assert q.nbytes == sum(a.nbytes for a in jax.tree_util.tree_leaves(q))


def test_flatten_unflatten_round_trip():
    q = jqx.quantize_array(
        W, "uint4", scheme="zero_point", granularity=jqx.per_group(4, 0), act=jqx.ActSpec()
    )
    leaves, treedef = jax.tree_util.tree_flatten(q)
    assert len(leaves) == 3  # qvalue, scale, zero_point (None children are empty)
    q2 = jax.tree_util.tree_unflatten(treedef, leaves)
    assert isinstance(q2, jqx.QArray)
    assert (q2.format, q2.shape, q2.block, q2.act) == (q.format, q.shape, q.block, q.act)
    chex.assert_trees_all_equal(q2.dequantize(), q.dequantize())
    # static metadata is part of the tree structure, so jit specialises on it
    assert jax.tree_util.tree_structure(
        jqx.quantize_array(W, "int8")
    ) != jax.tree_util.tree_structure(jqx.quantize_array(W, "int4"))


def test_tree_map_keeps_a_qarray():
    q = jqx.quantize_array(W, "int8", granularity=jqx.per_channel(-1))
    q2 = jax.tree_util.tree_map(lambda a: a, q)
    assert isinstance(q2, jqx.QArray)
    halved = jax.tree_util.tree_map(lambda a: a / 2 if a.dtype == jnp.float32 else a, q)
    np.testing.assert_allclose(
        np.asarray(halved.dequantize()), np.asarray(q.dequantize()) / 2, rtol=1e-6
    )


def test_device_put_and_jit():
    q = jqx.quantize_array(W, "nf4", granularity=jqx.per_group(8, 0))
    qd = jax.device_put(q, jax.devices()[0])
    assert isinstance(qd, jqx.QArray)
    chex.assert_trees_all_equal(qd, q)
    f = jax.jit(lambda q, x: x @ q.dequantize())
    x = jnp.ones((2, 16), jnp.float32)
    chex.assert_trees_all_close(f(qd, x), x @ q.dequantize(), rtol=1e-6)
    # a jitted function returning a QArray
    out = jax.jit(lambda q: q)(q)
    assert isinstance(out, jqx.QArray) and out.shape == q.shape


def test_jit_does_not_retrace_for_new_values():
    calls = chex.assert_max_traces(n=1)(lambda q: q.dequantize())
    f = jax.jit(calls)
    for k in range(3):
        f(jqx.quantize_array(W + k, "int8", granularity=jqx.per_channel(-1)))


def test_vmap_over_a_stacked_qarray():
    w = jnp.asarray(np.random.default_rng(1).normal(size=(3, 16, 8)).astype(np.float32))
    q = jqx.quantize_array(w, "uint4", scheme="zero_point", granularity=jqx.per_group(4, axis=-2))
    per_layer = jax.vmap(lambda qi: qi.dequantize())(q)
    chex.assert_trees_all_equal(per_layer, q.dequantize())
    x = jnp.ones((3, 2, 16), jnp.float32)
    y = jax.vmap(lambda qi, xi: xi @ qi.dequantize())(q, x)
    chex.assert_trees_all_close(y, jnp.einsum("lmk,lkn->lmn", x, q.dequantize()), rtol=1e-5)
    S = np.repeat(np.asarray(q.scale), 4, axis=1)
    assert np.all(np.abs(np.asarray(per_layer - w)) <= S / 2 * (1 + 1e-5))


def test_vmap_of_quantize_array_gives_a_stacked_qarray():
    w = jnp.asarray(np.random.default_rng(2).normal(size=(3, 16, 7)).astype(np.float32))
    q = jax.vmap(lambda a: jqx.quantize_array(a, "int4", granularity=jqx.per_channel(-1)))(w)
    assert q.qvalue.shape == (3, 16, 4) and q.scale.shape == (3, 1, 7)
    ref = jnp.stack(
        [jqx.quantize_array(a, "int4", granularity=jqx.per_channel(-1)).dequantize() for a in w]
    )
    chex.assert_trees_all_equal(q.dequantize(), ref)
    assert np.all(np.abs(np.asarray(q.dequantize() - w)) <= np.asarray(q.scale) / 2 * (1 + 1e-5))


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_repr_of_a_stacked_qarray_shows_the_stacked_shape(fmt):
    # nbytes counts every member, so the shape beside it must too
    q = jax.vmap(lambda w: jqx.quantize_array(w, fmt))(jnp.ones((3, 8, 4)))
    one = jqx.quantize_array(jnp.ones((8, 4)), fmt)
    assert "shape=(3, 8, 4)" in repr(q) and f"nbytes={3 * one.nbytes}" in repr(q)
    assert "shape=(8, 4)" in repr(one)
    member = jax.tree.map(lambda a: a[0], q)  # a slice holds one member again
    assert "shape=(8, 4)" in repr(member)


def test_grad_free_tree_map_and_stop_gradient():
    q = jqx.quantize_array(W, "int8")
    g = jax.grad(lambda x, q: jnp.sum(x * q.dequantize()))(jnp.ones_like(W), q)
    chex.assert_trees_all_close(g, q.dequantize())


def test_dequantize_dtype_and_in_scale():
    q = jqx.quantize_array(W.astype(jnp.bfloat16), "int8", granularity=jqx.per_channel(-1))
    assert q.dtype == "bfloat16" and q.dequantize().dtype == jnp.bfloat16
    assert q.dequantize(jnp.float32).dtype == jnp.float32
    s = jnp.full((16, 1), 2.0, jnp.float32)
    q2 = jqx.quantize_array(W * s, "int8", granularity=jqx.per_channel(-1)).replace(in_scale=s)
    np.testing.assert_allclose(
        np.asarray(q2.dequantize()), np.asarray(W), atol=float(q2.scale.max())
    )
    assert q2.nbytes == 128 + 8 * 4 + 16 * 4


@pytest.mark.parametrize(
    "gran,name",
    [
        (jqx.per_tensor(), "per-tensor"),
        (jqx.per_channel(-1), "per-channel(axis 1)"),
        (jqx.per_token(), "per-channel(axis 0)"),
        (jqx.per_group(4, axis=0), "group4(axis 0)"),
        (jqx.per_block((4, 4)), "block4x4"),
    ],
)
def test_repr_names_shape_format_granularity_bytes(gran, name):
    q = jqx.quantize_array(W, "int8", granularity=gran, act=jqx.ActSpec("dynamic", "int8"))
    r = repr(q)
    assert q.granularity == name
    assert "shape=(16, 8)" in r and "format=int8" in r and f"granularity={name}" in r
    assert f"nbytes={q.nbytes}" in r and "act=dynamic:int8" in r


def test_using_a_qarray_as_an_array_explains_the_fix():
    q = jqx.quantize_array(W, "int8")
    with pytest.raises(TypeError, match=r"jqx.quantized\(fn\).*jqx.dequantize\(tree\)"):
        jnp.dot(jnp.ones((2, 16)), q)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(kind="lazy"), r"kind='lazy' is not supported; use 'dynamic', 'static' or 'llm_int8'"),
        (dict(granularity="row"), r"granularity='row' is not supported; use 'per_token' or"),
        (dict(format="nf4"), r"format='nf4': activations are quantized to int8, fp8_e4m3"),
    ],
)
def test_actspec_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        jqx.ActSpec(**kw)
    assert jqx.ActSpec(format="e4m3").format == "fp8_e4m3"


@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4", "fp8_e4m3", "bf16"])
def test_scalars(fmt):
    q = jqx.quantize_array(jnp.float32(-2.5), fmt)
    assert q.shape == () and q.dequantize().shape == ()
    assert float(q.dequantize()) == -2.5  # a constant block reconstructs exactly


# --------------------------------------------------------------------------- layout extensions
# (GGUF's layouts, built through make_qarray; jqx.io.gguf uses them, tests/test_gguf.py
# checks them bit for bit against gguf.)


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("n", [1, 7, 16])
def test_pack_bits_round_trip(bits, n):
    codes = np.random.default_rng(n).integers(0, 2**bits, size=(3, n), dtype=np.uint8)
    packed = pack_bits(jnp.asarray(codes), bits)
    assert packed.shape == (3, -(-n * bits // 8))
    np.testing.assert_array_equal(np.asarray(unpack_bits(packed, bits, n)), codes)
    if bits == 4:
        np.testing.assert_array_equal(np.asarray(packed), np.asarray(pack_4bit(jnp.asarray(codes))))


def _ext(codes, scale, zero=None, **kw):
    from jqx.core.numerics import make_qarray  # noqa: PLC0415

    shape = np.shape(codes)
    kw.setdefault("block", (1, shape[1]))
    return make_qarray(
        jnp.asarray(codes), jnp.asarray(scale), zero, shape=shape, dtype="float32", **kw
    )


@pytest.mark.parametrize("fmt,bits", [("int8", 5), ("uint8", 5), ("int8", 6), ("uint8", 6)])
def test_code_bits_split_planes(fmt, bits):
    signed = fmt == "int8"
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1)) if signed else (0, 2**bits)
    codes = np.arange(lo, hi, dtype=np.int8 if signed else np.uint8)
    codes = np.tile(codes, 2)[:64].reshape(2, 32)
    q = _ext(codes, np.full((2, 1), 0.5, np.float32), fmt=fmt, code_bits=bits)
    assert q.extensions == ("code_bits",) and q.code_bits == bits
    assert q.qvalue.shape == (2, 16) and q.qhigh.shape == (2, 32 * (bits - 4) // 8)
    np.testing.assert_array_equal(np.asarray(q.codes()), codes)
    np.testing.assert_array_equal(np.asarray(q.dequantize()), codes.astype(np.float32) * 0.5)
    assert q.nbytes == 2 * 16 + q.qhigh.size + 2 * 4  # low plane, high plane, f32 scales
    assert q.nbytes == sum(a.nbytes for a in jax.tree_util.tree_leaves(q))
    assert f"code_bits={bits}" in repr(q)


def test_float_min_and_two_level_scales():
    codes = np.arange(64, dtype=np.uint8).reshape(1, 64) % 16
    # zero_kind="min": codes * scale + min
    q = _ext(
        codes,
        [0.5, 2.0],
        np.array([-1.0, 3.0], np.float16),
        fmt="uint4",
        block=(1, 32),
        zero_kind="min",
        scale_dtype=jnp.float16,
    )
    want = codes * np.repeat([0.5, 2.0], 32) + np.repeat([-1.0, 3.0], 32)
    np.testing.assert_array_equal(np.asarray(q.dequantize()), want.astype(np.float32))
    assert q.extensions == ("min",) and "zero=min" in repr(q)
    # two-level: integer scale/min codes per 16, float factors per 64
    q = _ext(
        codes,
        np.array([1, 2, 3, 4], np.uint8),
        jnp.array([0, 1, 2, 3], jnp.uint8),
        fmt="uint4",
        block=(1, 16),
        zero_kind="min",
        super_scale=jnp.float32(0.25),
        super_zero=jnp.float32(-0.5),
        super_block=(1, 64),
    )
    s = np.repeat([1, 2, 3, 4], 16) * 0.25
    m = np.repeat([0, 1, 2, 3], 16) * -0.5
    np.testing.assert_array_equal(
        np.asarray(q.dequantize())[0], (codes[0] * s + m).astype(np.float32)
    )
    assert q.extensions == ("min", "super_scale") and q.scale.dtype == jnp.uint8
    assert q.nbytes == 32 + 4 + 4 + 4 + 4
    assert q.nbytes == sum(a.nbytes for a in jax.tree_util.tree_leaves(q))


def test_two_level_qarray_stacks_vmaps_and_jits():
    rng = np.random.default_rng(0)
    qs = [
        _ext(
            rng.integers(0, 32, (4, 64), dtype=np.uint8),
            rng.integers(0, 64, (4, 4), dtype=np.uint8),
            jnp.asarray(rng.integers(0, 64, (4, 4), dtype=np.uint8)),
            fmt="uint8",
            code_bits=5,
            block=(1, 16),
            zero_kind="min",
            super_scale=jnp.asarray(rng.random((4, 1)), jnp.float16),
            super_zero=jnp.asarray(rng.random((4, 1)), jnp.float16),
            super_block=(1, 64),
            scale_dtype=jnp.float16,
        )
        for _ in range(3)
    ]
    st = jax.tree.map(lambda *a: jnp.stack(a), *qs)
    want = np.stack([np.asarray(q.dequantize()) for q in qs])
    np.testing.assert_array_equal(np.asarray(st.dequantize()), want)  # extra leading axis
    np.testing.assert_array_equal(np.asarray(jax.vmap(lambda q: q.dequantize())(st)), want)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda q: q.dequantize())(qs[1])), want[1])


def test_jqx_own_qarrays_use_no_extension():
    q = jqx.quantize_array(W, "uint4", scheme="zero_point", granularity=jqx.per_group(4, axis=0))
    assert q.extensions == () and q.zero_kind == "code" and q.code_bits is None
    assert q.qhigh is None and q.super_scale is None and q.super_zero is None
    assert "code_bits" not in repr(q) and "zero=min" not in repr(q)


@pytest.mark.parametrize(
    "kw,err,match",
    [
        (dict(fmt="uint4", code_bits=5), ValueError, r"code_bits=5 with format='uint4'"),
        (dict(fmt="uint8", code_bits=7), ValueError, r"use code_bits=5 or 6"),
        (dict(fmt="uint4", zero_kind="max"), ValueError, r"zero_kind='max' is not supported"),
        (dict(fmt="uint4", zero_kind="min"), ValueError, r"zero_kind='min' needs the minimum"),
        (dict(fmt="uint4", super_scale=1.0), ValueError, r"super_scale needs super_block"),
        (
            dict(fmt="uint4", super_scale=1.0, super_block=(1, 48)),
            ValueError,
            r"super_block=\(1, 48\) must .* be a multiple of block=\(1, 32\)",
        ),
    ],
)
def test_extension_validation(kw, err, match):
    with pytest.raises(err, match=match):
        _ext(np.zeros((1, 64), np.uint8), np.ones((1, 2), np.uint8), block=(1, 32), **kw)


def test_two_level_scale_must_be_codes():
    with pytest.raises(TypeError, match=r"scale holds integer \(or FP8 E4M3\) codes per block"):
        _ext(
            np.zeros((1, 64), np.uint8),
            np.ones((1, 2), np.float32),
            fmt="uint4",
            block=(1, 32),
            super_scale=1.0,
            super_block=(1, 64),
        )


def test_sharding_specs_cover_extension_children():
    from jax.sharding import PartitionSpec as P  # noqa: PLC0415

    q = _ext(
        np.zeros((4, 256), np.uint8),
        np.ones((4, 8), np.uint8),
        jnp.ones((4, 8), jnp.uint8),
        fmt="uint8",
        code_bits=5,
        block=(1, 32),
        zero_kind="min",
        super_scale=jnp.ones((4, 1)),
        super_zero=jnp.ones((4, 1)),
        super_block=(1, 256),
    )
    specs = jqx.sharding.qarray_specs(q, P("m", None), {"m": 2})
    assert specs.qhigh == P("m", None) and specs.super_scale == P("m", None)
    assert specs.super_zero == P("m", None)


def test_g_idx_layout_dequantize_matmul_and_checkpoint(tmp_path):
    """A group index per input row (GPTQ's desc_act): scales are gathered through g_idx
    in dequantize, every matmul path and jqx's checkpoint; bad maps are refused."""
    import jax
    import numpy as np

    from jqx.core.numerics import make_qarray

    rng = np.random.default_rng(0)
    k, n, g = 32, 6, 8
    codes = rng.integers(0, 16, (k, n)).astype(np.float32)
    s = (rng.random((k // g, n)) + 0.1).astype(np.float32)
    z = rng.integers(0, 16, (k // g, n)).astype(np.float32)
    gi = rng.permutation(np.arange(k) // g)
    q = make_qarray(codes, s, z, fmt="uint4", shape=(k, n), dtype="float32", block=(g, 1), g_idx=gi)
    ref = (codes - z[gi]) * s[gi]
    assert q.extensions == ("g_idx",) and "g_idx" in repr(q)
    np.testing.assert_array_equal(np.asarray(q.dequantize()), ref)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda q: q.dequantize())(q)), ref)
    # stacked layers (a leading axis on every child, g_idx included)
    st2 = jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), q)
    np.testing.assert_array_equal(np.asarray(st2.dequantize()), np.stack([ref, ref]))
    x = jnp.asarray(rng.standard_normal((3, k)), jnp.float32)
    dn = (((1,), (0,)), ((), ()))
    for backend in (None, "xla", "pallas"):
        assert jqx.ops.explain(x, q, dn, backend=backend) == "xla.dequantize_dot"
    y = jqx.ops.dot_general(x, q, dn)
    np.testing.assert_allclose(np.asarray(y), np.asarray(x) @ ref, rtol=1e-5, atol=1e-5)
    fn = jqx.quantized(lambda p, x: x @ p["kernel"])
    np.testing.assert_allclose(
        np.asarray(fn({"kernel": q}, x)), np.asarray(x) @ ref, rtol=1e-5, atol=1e-5
    )
    jqx.save(tmp_path / "ck", {"w": q})
    back = jqx.load(tmp_path / "ck")["w"]
    np.testing.assert_array_equal(np.asarray(back.g_idx), gi)
    np.testing.assert_array_equal(np.asarray(back.dequantize()), ref)
    with pytest.raises(ValueError, match="not a valid group map: entry .* but there are 4 groups"):
        make_qarray(
            codes, s, z, fmt="uint4", shape=(k, n), dtype="float32", block=(g, 1), g_idx=gi + 1
        )
    with pytest.raises(ValueError, match="one group index per index of axis 0"):
        make_qarray(
            codes, s, z, fmt="uint4", shape=(k, n), dtype="float32", block=(g, 1), g_idx=gi[:-1]
        )


# ----------------------------------------------------------------- the "vnni" code layout


@given(
    k=st.integers(1, 40),
    n=st.integers(1, 40),
    scheme=st.sampled_from(["channel", "tensor"]),
    seed=st.integers(0, 2**16),
)
def test_vnni_layout_keeps_values(k, n, scheme, seed):
    """with_code_layout('vnni') stores the same codes in the GEMM's panels: the same
    dequantized values and codes, nbytes only the panels' padding more; 'plain' undoes it."""
    x = jax.random.normal(jax.random.key(seed), (k, n))
    gran = jqx.per_channel(axis=-1) if scheme == "channel" else jqx.per_tensor()
    q = jqx.quantize_array(x, "int8", granularity=gran)
    p = q.with_code_layout("vnni")
    assert p.code_layout == "vnni" and p.qvalue.shape == jqx.native.packed_shape(k, n)
    np.testing.assert_array_equal(np.asarray(p.codes()), np.asarray(q.codes()))
    np.testing.assert_array_equal(np.asarray(p.dequantize()), np.asarray(q.dequantize()))
    pad = (-(-n // 16) * 16) * (-(-k // 4) * 4) - k * n
    assert p.nbytes == q.nbytes + pad
    back = p.with_code_layout("plain")
    assert back.code_layout == "plain"
    np.testing.assert_array_equal(np.asarray(back.qvalue), np.asarray(q.qvalue))
    assert p.with_code_layout("vnni") is p


def test_vnni_layout_of_dense_general_kernels():
    """(in, heads, head_dim) and (heads, head_dim, out) kernels with per-output scales
    pack as (K, N) = their merged contraction and outputs (vnni_split)."""
    from jqx.core.qarray import vnni_split

    x = jax.random.normal(jax.random.key(0), (24, 3, 8))
    q = jqx.quantize_array(x, "int8", granularity=jqx.per_channel(axis=(1, 2)))
    assert vnni_split(q.shape, q.block) == 1
    p = q.with_code_layout("vnni")
    assert p.qvalue.shape == jqx.native.packed_shape(24, 24)
    np.testing.assert_array_equal(np.asarray(p.dequantize()), np.asarray(q.dequantize()))
    o = jqx.quantize_array(x.reshape(3, 8, 24), "int8", granularity=jqx.per_channel(axis=-1))
    assert vnni_split(o.shape, o.block) == 2
    np.testing.assert_array_equal(
        np.asarray(o.with_code_layout("vnni").dequantize()), np.asarray(o.dequantize())
    )
    assert "code_layout=vnni" in repr(p)


@pytest.mark.parametrize(
    "make",
    [
        lambda x: jqx.quantize_array(x, "int4"),  # not int8
        lambda x: jqx.quantize_array(x, "int8", granularity=jqx.per_group(2, axis=1)),  # groups
        lambda x: jqx.quantize_array(x.reshape(4, 4, 4), "int8"),  # n-D per tensor: K unknown
        lambda x: jqx.quantize_array(x, "int8", granularity=jqx.per_group(8, axis=0)),  # groups
    ],
)
def test_vnni_layout_refuses_what_the_gemm_cannot_read(make):
    q = make(jax.random.normal(jax.random.key(1), (16, 4)))
    with pytest.raises(ValueError, match="with_code_layout\\('vnni'\\)"):
        q.with_code_layout("vnni")
    with pytest.raises(ValueError, match="use 'plain', 'vnni' or 'kn'"):
        q.with_code_layout("panels")


@given(out=st.integers(2, 40), k=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_vnni_layout_of_out_in_weights_and_row_reads(out, k, seed):
    """An (out, in) weight with one scale per output row (GGUF's and PyTorch's
    orientation, a per-row table) packs its transpose; rows read out of the panels
    equal the plain rows, for both orientations."""
    x = jax.random.normal(jax.random.key(seed), (out, k))
    q = jqx.quantize_array(x, "int8", granularity=jqx.per_channel(axis=0))
    p = q.with_code_layout("vnni")
    assert p.qvalue.shape == jqx.native.packed_shape(k, out)
    np.testing.assert_array_equal(np.asarray(p.codes()), np.asarray(q.codes()))
    np.testing.assert_array_equal(np.asarray(p.dequantize()), np.asarray(q.dequantize()))
    ids = jnp.asarray(np.random.default_rng(seed).integers(0, out, (3, 2)))
    np.testing.assert_array_equal(np.asarray(p.row_codes(ids)), np.asarray(q.qvalue[ids]))
    kn = jqx.quantize_array(x, "int8", granularity=jqx.per_channel(axis=-1)).with_code_layout(
        "vnni"
    )
    np.testing.assert_array_equal(
        np.asarray(kn.row_codes(ids)), np.asarray(kn.with_code_layout("plain").qvalue[ids])
    )


@pytest.mark.parametrize("fmt,zero", [("int4", False), ("uint4", True), ("nf4", False)])
def test_kn_layout_stores_the_transpose(fmt, zero):
    """'kn': an (out, in) 4-bit weight grouped along its input axis keeps its logical
    shape and values while its children hold the (in, out) transpose; 'plain' undoes it
    exactly; rows read back re-stored."""
    x = jax.random.normal(jax.random.key(4), (24, 64))
    gran = jqx.per_group(32, axis=1)
    q = jqx.quantize_array(x, fmt, granularity=gran, scheme="zero_point" if zero else "absmax")
    k = q.with_code_layout("kn")
    assert k.shape == q.shape and k.qvalue.shape == (64, 12) and k.scale.shape == (2, 24)
    assert k.nbytes == q.nbytes
    np.testing.assert_array_equal(np.asarray(k.dequantize()), np.asarray(q.dequantize()))
    np.testing.assert_array_equal(np.asarray(k.codes()), np.asarray(q.codes()))
    back = k.with_code_layout("plain")
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(q), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ids = jnp.array([3, 0, 23])
    np.testing.assert_array_equal(np.asarray(k.row_codes(ids)), np.asarray(q.qvalue[ids]))
    with pytest.raises(ValueError, match="with_code_layout\\('kn'\\)"):
        jqx.quantize_array(x, fmt, granularity=jqx.per_group(8, axis=0)).with_code_layout("kn")


def test_kn_layout_keeps_an_awq_in_scale():
    """AWQ's in_scale (1, in) on an (out, in) weight moves with the transpose: values,
    codes and (back in 'plain') every child are the original's; an in_scale with a
    g_idx, or of another shape, keeps the weight plain."""
    from jqx.core.qarray import kn_eligible

    x = jax.random.normal(jax.random.key(5), (24, 64))
    q = jqx.quantize_array(x, "uint4", granularity=jqx.per_group(32, axis=1), scheme="zero_point")
    q = q.replace(in_scale=jnp.linspace(0.5, 2.0, 64).reshape(1, 64))
    k = q.with_code_layout("kn")
    assert k.in_scale.shape == (64, 1) and k.nbytes == q.nbytes
    np.testing.assert_array_equal(np.asarray(k.dequantize()), np.asarray(q.dequantize()))
    back = k.with_code_layout("plain")
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(q), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not kn_eligible(q.replace(in_scale=jnp.ones((64,))))
    assert not kn_eligible(q.replace(g_idx=jnp.arange(64, dtype=jnp.int32) // 32))


def test_kn_layout_keeps_nvfp4_two_level_scales():
    """NVFP4 (E4M3 block scales and a float32 per tensor, stacked per tensor when two
    are fused): 'kn' swaps the super-blocks with the transpose; values and (back in
    'plain') every child are the original's; folded, the same values with plain float32
    block scales."""
    from jqx.core.qarray import fold_super_scale, foldable_super_scale
    from jqx.llm.model import _concat_rows

    a = jqx.quantize_nvfp4(jax.random.normal(jax.random.key(6), (24, 64)))
    b = jqx.quantize_nvfp4(3 * jax.random.normal(jax.random.key(7), (24, 64)))
    fused = _concat_rows([a, b])
    assert fused.super_scale.shape == (2, 1)
    for q in (a, fused):
        assert foldable_super_scale(q)
        k = q.with_code_layout("kn")
        assert k.super_block == q.super_block and k._kn_view().super_block == q.super_block[::-1]
        np.testing.assert_array_equal(np.asarray(k.dequantize()), np.asarray(q.dequantize()))
        back = k.with_code_layout("plain")
        for x, y in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(q), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        f = fold_super_scale(q)
        assert f.extensions == () and f.scale.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(f.dequantize()), np.asarray(q.dequantize()))


def test_kn_layout_with_act_order_groups():
    """A GPTQ act_order g_idx (groups of g inputs in any order): 'kn' stores the inputs
    sorted by group and keeps that order in g_idx; values, codes and (back in 'plain')
    every child, g_idx included, are the original's. Unequal groups stay plain."""
    from jqx.core.numerics import stored_qarray
    from jqx.core.qarray import kn_eligible, pack_4bit

    rng = np.random.default_rng(0)
    out, k, g = 24, 64, 16
    g_idx = np.empty(k, np.int32)
    g_idx[rng.permutation(k)] = np.arange(k) // g
    kw = dict(format="uint4", shape=(out, k), dtype="float32", block=(1, g))
    q = stored_qarray(
        qvalue=jnp.asarray(pack_4bit(rng.integers(0, 16, (out, k)).astype(np.uint8))),
        scale=jnp.asarray(rng.random((out, k // g)) + 0.1, jnp.float32),
        zero_point=jnp.asarray(rng.integers(0, 16, (out, k // g)), jnp.float32),
        g_idx=jnp.asarray(g_idx),
        **kw,
    )
    kn = q.with_code_layout("kn")
    np.testing.assert_array_equal(np.asarray(kn.g_idx), np.argsort(g_idx, kind="stable"))
    np.testing.assert_array_equal(np.asarray(kn.dequantize()), np.asarray(q.dequantize()))
    np.testing.assert_array_equal(np.asarray(kn.codes()), np.asarray(q.codes()))
    back = kn.with_code_layout("plain")
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(q), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    uneven = q.replace(g_idx=jnp.asarray(np.sort(g_idx)[::-1] * 0))  # one group holds all
    assert not kn_eligible(uneven)


def test_kn_tables_read_rows_as_columns_of_the_transpose():
    """Rows of a 'kn' table (an embedding stored for the output projection's kernels)
    are read out of its stored transpose, never decoding the rest: the same values as
    the plain table's rows, for 4-bit with and without zero points (odd row count: a
    half-used last byte), FP8, NVFP4's two-level scales and a GPTQ act_order g_idx."""
    from jqx.core.qarray import kn_eligible

    t = jax.random.normal(jax.random.key(8), (51, 64))
    tables = [
        jqx.int4_weight_only(group_size=32).for_embedding().quantize_weight(t),
        jqx.weight_only("int4", granularity=jqx.per_group(16, axis=1)).quantize_weight(t),
        jqx.fp8_weight_only().for_embedding().quantize_weight(t),
        jqx.quantize_nvfp4(t),
    ]
    rng = np.random.default_rng(1)
    g_idx = np.empty(64, np.int32)
    g_idx[rng.permutation(64)] = np.arange(64) // 16
    tables.append(tables[1].replace(g_idx=jnp.asarray(g_idx)))
    ids = jnp.array([[50, 0, 7], [7, 49, 1]])
    for q in tables:
        assert kn_eligible(q), q.format
        kn = q.with_code_layout("kn")
        got = jax.jit(jqx.ops.take)(kn, ids)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(q.dequantize()[ids]))
        np.testing.assert_array_equal(
            np.asarray(kn.row_codes(ids[0])), np.asarray(q.qvalue[ids[0]])
        )

"""jqx.native: the AVX512-VNNI int8 GEMM (exact against int32 references), the
4-bit weight-only decode kernel (against f64), the build cache, and the
fallback when the kernels are unavailable."""

import dataclasses
import functools
import os
import subprocess
import sys
import textwrap
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _gelu_check import assert_gelu_tanh_within_bound, assert_gelu_within_bound
from hypothesis import given, settings
from hypothesis import strategies as st

import jqx
from jqx.kernels.cpu import native

needs_native = pytest.mark.skipif(
    not native.available(), reason=f"native int8 GEMM unavailable: {native.status()}"
)


def _ref(a, b):
    return np.asarray(a, np.int64) @ np.asarray(b, np.int64)


# Shapes: ragged rows (row blocks of 6, thread split by rows or by columns),
# K not a multiple of 4, N not a multiple of 16 (partial panels), tiny and
# MiniLM-like.
SHAPES = [
    (1, 1, 1),
    (2, 3, 5),
    (7, 9, 33),
    (13, 70, 100),
    (6, 64, 64),
    (100, 384, 1536),
    (25, 130, 67),
    (1024, 384, 384),
    (4099, 36, 80),
    (3, 4096, 64),
    (5, 2048, 520),  # one row block, enough work for 2 threads: they split the panels
    # <= 6 rows take the unpacked decode path: odd K (a last row paired with
    # zeros), several k chunks, N edges inside a 64-column block, column threads.
    (1, 4097, 4099),
    (2, 257, 65),
    (3, 513, 130),
    (4, 1031, 2050),
    (6, 700, 300),
]


@needs_native
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_exact_against_int64_reference(m, k, n):
    rng = np.random.default_rng(m * 7 + k * 3 + n)
    a = rng.integers(-128, 128, (m, k), dtype=np.int8)
    b = rng.integers(-128, 128, (k, n), dtype=np.int8)
    c = jax.jit(native.int8_matmul)(jnp.asarray(a), jnp.asarray(b))
    assert c.dtype == jnp.int32 and c.shape == (m, n)
    np.testing.assert_array_equal(np.asarray(c), _ref(a, b))


@needs_native
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_prepacked_weight_exact_against_int64_reference(m, k, n):
    """The weight packed ahead (pack_int8): the same exact sums, at every M (no decode
    path: up to 6 rows run the tiles with as many rows)."""
    rng = np.random.default_rng(m * 5 + k * 11 + n)
    a = rng.integers(-128, 128, (m, k), dtype=np.int8)
    b = rng.integers(-128, 128, (k, n), dtype=np.int8)
    bp = native.pack_int8(jnp.asarray(b))
    c = jax.jit(functools.partial(native.int8_matmul, n=n))(jnp.asarray(a), bp)
    np.testing.assert_array_equal(np.asarray(c), _ref(a, b))


# Around the AMX blocks: 16 and 32 rows (one and two row tiles), a last partial
# block, rows split over the threads in units of 32, one or two panels per tile
# pair, K a multiple of 64 or ending in a zero-padded step (4..60 bytes), K < 64.
AMX_SHAPES = [
    (16, 64, 16),
    (32, 128, 32),
    (17, 60, 5),
    (33, 100, 40),
    (47, 68, 47),
    (64, 4, 16),
    (96, 1536, 384),
    (160, 132, 33),
    (200, 576, 200),
]


@pytest.fixture
def amx_mode(request):
    """Runs the test with the AMX tiles on or off (``request.param``), restoring the
    setting after; skips the "on" case where the CPU has no AMX."""
    before = native.amx()
    if native.amx(request.param) != request.param:
        native.amx(before)
        pytest.skip("no AMX tiles on this CPU")
    yield request.param
    native.amx(before)


@needs_native
@pytest.mark.parametrize("amx_mode", [True, False], indirect=True, ids=["amx", "vnni"])
@pytest.mark.parametrize("m,k,n", AMX_SHAPES)
def test_amx_tiles_exact_and_identical_to_vnni(m, k, n, amx_mode):
    """Both units give the exact int32 sums (so the same bits), plain and packed B,
    and the fused W8A8 call gives the XLA path's result."""
    rng = np.random.default_rng(m * 13 + k * 5 + n)
    a = rng.integers(-128, 128, (m, k), dtype=np.int8)
    b = rng.integers(-128, 128, (k, n), dtype=np.int8)
    # A new jit per mode: the setting is read when the kernel runs, not traced.
    plain = native.int8_matmul(jnp.asarray(a), jnp.asarray(b))
    packed = native.int8_matmul(jnp.asarray(a), native.pack_int8(jnp.asarray(b)), n=n)
    np.testing.assert_array_equal(np.asarray(plain), _ref(a, b))
    np.testing.assert_array_equal(np.asarray(packed), _ref(a, b))
    x, w = _w8a8_case(m, k, n, seed=m + k + n, quantize=False)
    y, xla = _fused_and_xla(x, w, kernel="vnni_packed")
    np.testing.assert_array_equal(np.asarray(y), np.asarray(xla))
    # The fused calls write signed codes for the rows on the tiles (no column sums)
    # and offset ones for the others; the two-level split doubles the rows.
    for packed in (False, True):
        y, xla, _ = _two_level_and_xla(x, w, packed=packed)
        np.testing.assert_array_equal(np.asarray(y), np.asarray(xla))


@needs_native
def test_amx_switch():
    before = native.amx()
    try:
        assert native.amx(False) is False
        assert native.amx() is False
        assert native.amx(True) in (True, False)  # False where the CPU has no AMX
    finally:
        native.amx(before)
    with pytest.raises(TypeError, match="amx"):
        native.amx(1)


@settings(deadline=None, max_examples=25)
@given(
    seed=st.integers(0, 2**31 - 1),
    lead=st.sampled_from([(), (3,), (2, 2)]),
    k=st.integers(1, 40),
    n=st.integers(1, 40),
)
def test_pack_int8_layout_and_round_trip(seed, lead, k, n):
    """packed[..., q, kq, 4c + r] = w[..., 4kq + r, 16q + c], zero beyond K and N, and
    unpack_int8 inverts it (leading axes kept)."""
    rng = np.random.default_rng(seed)
    w = rng.integers(-128, 128, (*lead, k, n), dtype=np.int8)
    p = native.pack_int8(jnp.asarray(w))
    assert p.shape == (*lead, *native.packed_shape(k, n)) and p.dtype == jnp.int8
    want = np.zeros(p.shape, np.int8)
    for kk in range(k):
        for c in range(n):
            want[..., c // 16, kk // 4, 4 * (c % 16) + kk % 4] = w[..., kk, c]
    np.testing.assert_array_equal(np.asarray(p), want)
    np.testing.assert_array_equal(np.asarray(native.unpack_int8(p, (k, n))), w)


def test_pack_int8_bad_input():
    with pytest.raises(TypeError, match="int8 \\(K, N\\)"):
        native.pack_int8(jnp.ones((4, 4), jnp.float32))
    with pytest.raises(ValueError, match="packed must be int8"):
        native.unpack_int8(jnp.zeros((1, 2, 64), jnp.int8), (9, 16))
    p = native.pack_int8(jnp.ones((8, 20), jnp.int8))
    with pytest.raises(TypeError, match="packed_shape"):
        native.int8_matmul(jnp.ones((2, 8), jnp.int8), p)  # no n
    with pytest.raises(TypeError, match="packed_shape"):
        native.int8_matmul(jnp.ones((2, 8), jnp.int8), p, n=40)
    with pytest.raises(ValueError, match="a packed w must be"):
        native.w8a8_matmul_vnni(jnp.ones((2, 8)), p, jnp.ones((33,)))


@needs_native
def test_extreme_codes_do_not_overflow():
    # All -128 x -128 over K = 4096: 67,108,864 per output, far inside int32.
    for va, vb in [(-128, -128), (127, -128), (-128, 127), (127, 127)]:
        for m in (1, 4, 8):  # the unpacked decode path and the packed one
            a = jnp.full((m, 4096), va, jnp.int8)
            b = jnp.full((4096, 20), vb, jnp.int8)
            np.testing.assert_array_equal(
                np.asarray(native.int8_matmul(a, b)), np.full((m, 20), va * vb * 4096)
            )


@needs_native
@settings(deadline=None, max_examples=20)
@given(seed=st.integers(0, 2**31 - 1), m=st.sampled_from([1, 3, 5, 12, 37]))
def test_property_random_codes(seed, m):
    rng = np.random.default_rng(seed)
    a = rng.integers(-128, 128, (m, 48), dtype=np.int8)
    b = rng.integers(-128, 128, (48, 40), dtype=np.int8)
    np.testing.assert_array_equal(
        np.asarray(native.int8_matmul(jnp.asarray(a), jnp.asarray(b))), _ref(a, b)
    )


@needs_native
def test_under_vmap_loops():
    rng = np.random.default_rng(0)
    a = rng.integers(-128, 128, (3, 5, 8), dtype=np.int8)
    b = rng.integers(-128, 128, (8, 16), dtype=np.int8)
    c = jax.vmap(native.int8_matmul, in_axes=(0, None))(jnp.asarray(a), jnp.asarray(b))
    np.testing.assert_array_equal(np.asarray(c), np.stack([_ref(x, b) for x in a]))


def test_bad_input():
    a = jnp.zeros((4, 8), jnp.int8)
    with pytest.raises(TypeError, match=r"expected a \(M, K\) and b \(K, N\)"):
        native.int8_matmul(a, jnp.zeros((7, 3), jnp.int8))
    with pytest.raises(TypeError, match="expected int8 operands, got float32"):
        native.int8_matmul(a.astype(jnp.float32), jnp.zeros((8, 3), jnp.int8))


# --------------------------------------------------------------------------- w4


def _w4_case(m, k, n, g, fmt, zero, seed):
    """Random packed codes, table, scales (and zeros) and their f64 product."""
    from jqx.core import formats

    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 16, (k, n)).astype(np.uint8)
    padded = np.concatenate([codes, np.zeros((k, n % 2), np.uint8)], axis=1)
    packed = (padded[:, 0::2] | (padded[:, 1::2] << 4)).astype(np.uint8)
    table = np.asarray(formats.decode(jnp.arange(16, dtype=jnp.uint8), fmt, jnp.float32))
    s = rng.uniform(0.01, 2.0, (k // g, n)).astype(np.float32)
    z = rng.uniform(0.0, 15.0, (k // g, n)).astype(np.float32) if zero else None
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = table[codes].astype(np.float64)
    if zero:
        w = w - np.repeat(z, g, axis=0)
    w = w * np.repeat(s, g, axis=0)
    args = (jnp.asarray(x), jnp.asarray(packed), jnp.asarray(table), jnp.asarray(s))
    args += (None if z is None else jnp.asarray(z),)
    return args, x.astype(np.float64) @ w, np.abs(x).astype(np.float64) @ np.abs(w)


# M = 1..16 (register blocks of 8 rows); odd N (a padding nibble), N = 1, N edges inside a 64-column block;
# groups that are not powers of two and groups of more than one 16-row chunk;
# per-channel (g = K); enough columns for the threads to split them.
W4_SHAPES = [
    (1, 32, 1, 32, "uint4", True),
    (1, 256, 64, 128, "uint4", True),
    (3, 384, 1536, 32, "int4", False),
    (8, 130, 67, 13, "nf4", False),
    (2, 4096, 4099, 4096, "int4", False),
    (5, 64, 129, 64, "fp4_e2m1", True),
    (7, 96, 200, 48, "fp4_e3m0", False),
    (4, 1024, 2048, 128, "fp4_e1m2", True),
    (13, 200, 300, 40, "uint4", True),  # two register blocks of rows (8 + 5)
    (16, 512, 1000, 128, "int4", False),
    (1, 576, 961, 32, "uint4", True),  # a chunk per thread, the last one partial
]


@needs_native
@pytest.mark.parametrize("m,k,n,g,fmt,zero", W4_SHAPES)
def test_w4_matmul_against_f64(m, k, n, g, fmt, zero):
    args, ref, mag = _w4_case(m, k, n, g, fmt, zero, seed=m + k + n)
    y = jax.jit(native.w4_matmul, static_argnames=("n", "group_size"))(*args, n=n, group_size=g)
    assert y.dtype == jnp.float32 and y.shape == (m, n)
    # f32 sums of K terms: a few ulps of sum |x| |w| (the f64 reference).
    assert np.all(np.abs(np.asarray(y, np.float64) - ref) <= 1e-6 * mag + 1e-30)


@needs_native
@settings(deadline=None, max_examples=20)
@given(
    seed=st.integers(0, 2**31 - 1),
    m=st.integers(1, 16),
    n=st.integers(1, 150),
    g=st.sampled_from([8, 16, 24, 48]),
    zero=st.booleans(),
)
def test_w4_property(seed, m, n, g, zero):
    args, ref, mag = _w4_case(m, 96, n, g, "uint4", zero, seed)
    y = native.w4_matmul(*args, n=n, group_size=g)
    assert np.all(np.abs(np.asarray(y, np.float64) - ref) <= 1e-6 * mag + 1e-30)


@needs_native
def test_w4_bad_input():
    (x, p, t, s, z), _, _ = _w4_case(2, 64, 10, 32, "uint4", True, 0)
    with pytest.raises(TypeError, match="M <= 16"):
        native.w4_matmul(jnp.zeros((17, 64)), p, t, s, z, n=10, group_size=32)
    with pytest.raises(TypeError, match=r"x must be float32 \(M, K\).*\(1, 2, 64\)"):
        native.w4_matmul(jnp.zeros((1, 2, 64)), p, t, s, z, n=10, group_size=32)
    with pytest.raises(TypeError, match="x must be float32"):
        native.w4_matmul(x.astype(jnp.bfloat16), p, t, s, z, n=10, group_size=32)
    with pytest.raises(TypeError, match="group_size=24 must divide K=64"):
        native.w4_matmul(x, p, t, s, z, n=10, group_size=24)
    with pytest.raises(TypeError, match=r"packed must be uint8 \(64, 5\)"):
        native.w4_matmul(x, p[:, :4], t, s, z, n=10, group_size=32)
    with pytest.raises(TypeError, match=r"zero must be float32 \(2, 10\)"):
        native.w4_matmul(x, p, t, s, z[:1], n=10, group_size=32)
    with pytest.raises(TypeError, match="scale2 must be one float32.*or n=10"):
        native.w4_matmul(x, p, t, s, z, n=10, group_size=32, scale2=jnp.ones((2,)))
    with pytest.raises(TypeError, match="scale2 must be one float32"):
        native.w4_matmul(x, p, t, s, z, n=10, group_size=32, scale2=jnp.ones((1,), jnp.bfloat16))


def _fp8_case(m, k, n, g, dtype, seed):
    """Every finite code of ``dtype`` (subnormals, zeros, the largest) at random, scales
    per group; the f64 reference and sum |x| |w| per output."""
    rng = np.random.default_rng(seed)
    codes = jax.lax.bitcast_convert_type(
        jnp.asarray(rng.integers(0, 256, (k, n)), jnp.uint8), dtype
    )
    codes = jnp.where(jnp.isfinite(codes.astype(jnp.float32)), codes, jnp.zeros((), dtype))
    s = jnp.asarray(rng.random((k // g, n)) + 0.25, jnp.float32)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    w = np.asarray(codes.astype(jnp.float32), np.float64) * np.repeat(np.asarray(s), g, axis=0)
    xf = np.asarray(x, np.float64)
    return (x, codes, s), xf @ w, np.abs(xf) @ np.abs(w)


@needs_native
@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.float8_e5m2])
@pytest.mark.parametrize(
    "m,k,n,g",
    [(1, 576, 1536, 576), (5, 96, 100, 32), (16, 64, 70, 64), (9, 256, 17, 32), (2, 512, 333, 64)],
)
def test_fp8_matmul_against_f64(m, k, n, g, dtype):
    """FP8 weight-only: every finite code (subnormals included) widened exactly, f32
    sums within a few ulps of sum |x| |w|."""
    (x, c, s), ref, mag = _fp8_case(m, k, n, g, dtype, seed=m + k + n)
    y = jax.jit(native.fp8_matmul, static_argnames=("group_size",))(x, c, s, group_size=g)
    assert y.dtype == jnp.float32 and y.shape == (m, n)
    assert np.all(np.abs(np.asarray(y, np.float64) - ref) <= 1e-6 * mag + 1e-30)


@needs_native
@pytest.mark.parametrize("kernel", ["w4", "fp8"])
@pytest.mark.parametrize("m,k,n,g", [(1, 576, 1000, 32), (11, 64, 70, 32)])
def test_e8m0_scales_are_read_as_stored(kernel, m, k, n, g):
    """MX block scales (float8_e8m0fnu) go to the decode kernels as stored and are
    widened there: the result equals the float32 scales' bit for bit, including
    e = 0 (2^-127, a float32 subnormal) and e = 255 (NaN, which reaches its columns)."""
    rng = np.random.default_rng(k + n)
    e = rng.integers(117, 138, (k // g, n)).astype(np.uint8)
    e[0, :3] = [0, 255, 127]
    s8 = jax.lax.bitcast_convert_type(jnp.asarray(e), jnp.float8_e8m0fnu)
    if kernel == "w4":
        (x, p, t, _, _), _, _ = _w4_case(m, k, n, g, "fp4_e2m1", False, seed=n)

        def run(s):
            return native.w4_matmul(x, p, t, s, None, n=n, group_size=g)
    else:
        (x, c, _), _, _ = _fp8_case(m, k, n, g, jnp.float8_e4m3fn, seed=n)

        def run(s):
            return native.fp8_matmul(x, c, s, group_size=g)

    got = np.asarray(jax.jit(run)(s8))
    want = np.asarray(run(s8.astype(jnp.float32)))
    np.testing.assert_array_equal(got, want)
    assert np.isnan(got[:, 1]).all() and np.isfinite(got[:, 2]).all()


@needs_native
@pytest.mark.parametrize("m,k,n,g", [(1, 512, 128, 16), (11, 64, 70, 16), (16, 576, 200, 32)])
def test_e4m3_scales_and_scale2_are_read_as_stored(m, k, n, g):
    """NVFP4's block scales (float8_e4m3fn) times its per-tensor scale (``scale2``), in
    the 4-bit kernel: bit for bit the float32 scales ``astype(float32) * scale2`` (one
    rounding, as QArray.dequantize), over every byte value: subnormals, zeros, the
    largest (448) and the NaN codes 0x7F / 0xFF, which reach their columns."""
    rng = np.random.default_rng(k + n)
    b = rng.integers(0, 256, (k // g, n)).astype(np.uint8)
    b.reshape(-1)[: min(256, b.size)] = np.arange(256, dtype=np.uint8)[: min(256, b.size)]
    b[:, :2] = [0x7F, 0x38]  # a NaN column, a column of 1.0
    s8 = jax.lax.bitcast_convert_type(jnp.asarray(b), jnp.float8_e4m3fn)
    (x, p, t, _, _), _, _ = _w4_case(m, k, n, g, "fp4_e2m1", False, seed=n)
    s2 = jnp.asarray([0.37], jnp.float32)

    def run(s, s2=None):
        return native.w4_matmul(x, p, t, s, None, n=n, group_size=g, scale2=s2)

    got = np.asarray(jax.jit(run)(s8, s2))
    want = np.asarray(run(s8.astype(jnp.float32) * s2[0]))
    np.testing.assert_array_equal(got, want)
    assert np.isnan(got[:, 0]).all() and np.isfinite(got[:, 1]).all()
    # Without scale2, the block scales alone.
    np.testing.assert_array_equal(np.asarray(run(s8)), np.asarray(run(s8.astype(jnp.float32))))
    # One second-level scale per column (tensors of different scales stacked along N).
    cols = jnp.asarray(rng.random(n) + 0.5, jnp.float32)
    np.testing.assert_array_equal(
        np.asarray(jax.jit(run)(s8, cols)),
        np.asarray(run(s8.astype(jnp.float32) * cols[None, :])),
    )


@needs_native
@pytest.mark.parametrize("rows,k,n", [(1, 576, 192), (16, 1536, 576), (4, 256, 130)])
def test_nvfp4_route_reads_stored_scales_bit_identical_to_folded(rows, k, n):
    """jqx.ops on an NVFP4 weight at decode sizes hands the kernel its E4M3 block scales
    and per-tensor scale as stored (no float32 copy): the same bits as the folded
    float32 scales that every other path uses, within f32 rounding of x . dequantize."""
    rng = np.random.default_rng(rows + k + n)
    q = jqx.quantize_nvfp4(jnp.asarray(rng.standard_normal((k, n)) * 0.05, jnp.float32), axis=0)
    x = jnp.asarray(rng.standard_normal((rows, k)), jnp.float32)
    dn = (((1,), (0,)), ((), ()))
    assert jqx.ops.explain(x, q, dn) == "native.w4"
    jaxpr = str(jax.make_jaxpr(lambda x, q: jqx.ops.dot_general(x, q, dn))(x, q))
    assert "has_scale2', np.int64(1)" in jaxpr
    y = jax.jit(lambda x, q: jqx.ops.dot_general(x, q, dn))(x, q)
    folded = jax.jit(lambda x, q: jqx.ops.dot_general(x, jqx.core.qarray.fold_super_scale(q), dn))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(folded(x, q)))
    ref = np.asarray(x, np.float64) @ np.asarray(q.dequantize(), np.float64)
    bound = np.abs(np.asarray(x, np.float64)) @ np.abs(np.asarray(q.dequantize(), np.float64))
    assert (np.abs(np.asarray(y) - ref) <= 1e-5 * bound + 1e-6).all()


@needs_native
def test_nvfp4_route_with_an_in_scale_divides_x_first():
    """An NVFP4 weight with an ``in_scale`` (AWQ-style) on the kernel route that reads
    the stored scales: x is divided first, as on every other path."""
    rng = np.random.default_rng(3)
    k, n = 576, 192
    q = jqx.quantize_nvfp4(jnp.asarray(rng.standard_normal((k, n)) * 0.05, jnp.float32), axis=0)
    q = q.replace(in_scale=jnp.asarray(rng.random((k, 1)) + 0.5, jnp.float32))
    x = jnp.asarray(rng.standard_normal((2, k)), jnp.float32)
    dn = (((1,), (0,)), ((), ()))
    assert jqx.ops.explain(x, q, dn) == "native.w4"
    y = np.asarray(jax.jit(lambda x, q: jqx.ops.dot_general(x, q, dn))(x, q))
    w = np.asarray(q.dequantize(), np.float64)
    ref = np.asarray(x, np.float64) @ w
    assert (np.abs(y - ref) <= 1e-5 * (np.abs(np.asarray(x, np.float64)) @ np.abs(w)) + 1e-6).all()


@needs_native
@settings(deadline=None, max_examples=15)
@given(
    seed=st.integers(0, 2**31 - 1),
    m=st.integers(1, 16),
    n=st.integers(1, 150),
    g=st.sampled_from([16, 32, 96]),
    e4m3=st.booleans(),
)
def test_fp8_property(seed, m, n, g, e4m3):
    dtype = jnp.float8_e4m3fn if e4m3 else jnp.float8_e5m2
    (x, c, s), ref, mag = _fp8_case(m, 96, n, g, dtype, seed)
    y = native.fp8_matmul(x, c, s, group_size=g)
    assert np.all(np.abs(np.asarray(y, np.float64) - ref) <= 1e-6 * mag + 1e-30)


@needs_native
def test_fp8_matmul_keeps_nan_and_inf():
    """E4M3's NaN codes (0x7F, 0xFF) and E5M2's infinities reach the output as XLA's
    dot gives them: nothing becomes finite."""
    c = jnp.zeros((64, 16), jnp.uint8).at[3, 5].set(0x7F).at[4, 6].set(0xFF)
    y = native.fp8_matmul(
        jnp.ones((1, 64)), jax.lax.bitcast_convert_type(c, jnp.float8_e4m3fn),
        jnp.ones((1, 16)), group_size=64,
    )  # fmt: skip
    assert np.isnan(np.asarray(y)[0, [5, 6]]).all() and np.isfinite(np.asarray(y)[0, :5]).all()
    c = jnp.zeros((64, 16), jnp.uint8).at[3, 5].set(0x7C)  # E5M2 +inf
    y = native.fp8_matmul(
        jnp.ones((1, 64)), jax.lax.bitcast_convert_type(c, jnp.float8_e5m2),
        jnp.ones((1, 16)), group_size=64,
    )  # fmt: skip
    assert np.asarray(y)[0, 5] == np.inf


@needs_native
def test_fp8_bad_input():
    (x, c, s), _, _ = _fp8_case(2, 64, 10, 32, jnp.float8_e4m3fn, 0)
    with pytest.raises(TypeError, match="M <= 16"):
        native.fp8_matmul(jnp.zeros((17, 64)), c, s, group_size=32)
    with pytest.raises(TypeError, match="codes must be float8_e4m3fn or float8_e5m2"):
        native.fp8_matmul(x, c.astype(jnp.float32), s, group_size=32)
    with pytest.raises(TypeError, match="group_size=24 must divide K=64"):
        native.fp8_matmul(x, c, s, group_size=24)
    with pytest.raises(TypeError, match=r"scale must be float32 or float8_e8m0fnu \(2, 10\)"):
        native.fp8_matmul(x, c, s[:1], group_size=32)


def _run(code: str, env: dict) -> str:
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_disabled_by_env_and_ops_falls_back_to_xla():
    # JQX_NATIVE is read by jqx.ops' dispatcher (the one place that decides); the
    # kernel module itself only reports whether the kernels work.
    out = _run(
        """
        import jax, jax.numpy as jnp, numpy as np, jqx
        from jqx.kernels.cpu import native
        s = jqx.ops.native_status()
        print(s == "available", s)
        w = jax.random.normal(jax.random.key(0), (64, 32))
        x = jax.random.normal(jax.random.key(1), (2048, 64))
        q = jqx.quantize({"kernel": w}, jqx.int8_dynamic_activation_int8_weight())["kernel"]
        f = jax.jit(jqx.ops.dot_general, static_argnums=2)
        dn = (((1,), (0,)), ((), ()))
        assert native.TARGET not in str(jax.make_jaxpr(f, static_argnums=2)(x, q, dn))
        y = f(x, q, dn)
        print(float(jnp.max(jnp.abs(y - x @ w)) / jnp.max(jnp.abs(x @ w))) < 0.05)
        """,
        {"JQX_NATIVE": "0"},
    )
    assert out.split() == ["False", "disabled", "by", "JQX_NATIVE=0", "True"]


@needs_native
def test_build_is_cached_and_atomic(tmp_path):
    code = """
        import time; t = time.perf_counter()
        from jqx.kernels.cpu import native
        print(native.available(), round(time.perf_counter() - t, 1))
        """
    env = {"JQX_CACHE_DIR": str(tmp_path)}
    assert _run(code, env).split()[0] == "True"
    files = sorted(p.name for p in tmp_path.glob("*.so"))  # not the build locks
    assert len(files) == 1 and files[0].startswith("int8_gemm-") and files[0].endswith(".so")
    mtime = (tmp_path / files[0]).stat().st_mtime_ns
    assert _run(code, env).split()[0] == "True"  # second process: loads the cached build
    assert sorted(p.name for p in tmp_path.glob("*.so")) == files
    assert (tmp_path / files[0]).stat().st_mtime_ns == mtime


def test_every_kernel_source_and_header_ships_in_the_package():
    """The kernels are compiled on the user's machine from the installed package: a
    non-editable install must carry every .cc and every header they include (a
    header missing from package-data builds nothing, and jqx falls back to XLA)."""
    import fnmatch
    import pathlib
    import re

    tomllib = pytest.importorskip("tomllib")
    root = pathlib.Path(native.__file__).resolve().parents[3]
    pyproject = root / "pyproject.toml"
    if not pyproject.exists():
        pytest.skip("not a source checkout")
    patterns = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"][
        "jqx.kernels.cpu"
    ]
    src = pathlib.Path(native.__file__).parent
    needed = {p.name for p in src.glob("*.cc")}
    for cc in src.glob("*.cc"):
        needed |= set(re.findall(r'#include "([^"/]+)"', cc.read_text()))
    assert {"pool.h", "w8a8.h"} <= needed
    missing = [n for n in needed if not any(fnmatch.fnmatch(n, p) for p in patterns)]
    assert not missing, f"not in package-data {patterns}: {missing}"


def test_missing_compiler_is_reported_not_raised(tmp_path):
    out = _run(
        """
        from jqx.kernels.cpu import native
        print(native.available()); print(native.status())
        """,
        {"JQX_CACHE_DIR": str(tmp_path), "CXX": "/nonexistent/c++"},
    )
    ok, reason = out.splitlines()
    assert ok == "False" and "no C++ compiler" in reason
    assert list(tmp_path.iterdir()) == []


def test_failed_build_warns_once_and_is_reported(tmp_path):
    """A compiler that runs and fails (a broken toolchain or source) is said once, as a
    RuntimeWarning; status() keeps the message; the products run on XLA."""
    out = _run(
        """
        import warnings
        from jqx.kernels.cpu import native
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            print(native.available(), native.available())
        print(len(w)); print(w[0].message); print(native.status().splitlines()[0])
        """,
        {"JQX_CACHE_DIR": str(tmp_path), "CXX": "/bin/false"},
    )
    ok, count, message, reason = out.splitlines()
    assert ok == "False False" and count == "1"
    assert "int8_gemm.cc failed to build" in message and "JQX_NATIVE=0" in message
    assert reason == "compiling int8_gemm.cc failed:"


# ----------------------------------------------------------------- W8A8, quantization fused
# native.w8a8_matmul (conv_int8.cc's AVX2 library) and native.w8a8_matmul_vnni (the
# AVX512-VNNI GEMM's library): the activation quantization inside the kernel,
# bit-identical to jqx.ops' XLA W8A8 path (int32 dot) for finite inputs.

needs_conv = pytest.mark.skipif(
    not native.conv_available(), reason=f"native AVX2 kernels unavailable: {native.conv_status()}"
)
FUSED = [
    pytest.param("avx2", marks=needs_conv),
    pytest.param(
        "vnni",
        marks=pytest.mark.skipif(
            not native.available(), reason=f"native int8 GEMM: {native.status()}"
        ),
    ),
    # The VNNI call with the weight packed ahead (native.pack_int8).
    pytest.param(
        "vnni_packed",
        marks=pytest.mark.skipif(
            not native.available(), reason=f"native int8 GEMM: {native.status()}"
        ),
    ),
]


def _vnni_packed(x, w, ws, act="per_token"):
    return native.w8a8_matmul_vnni(x, native.pack_int8(w), ws, act=act)


def _fused_kernel(name):
    return {
        "avx2": native.w8a8_matmul,
        "vnni": native.w8a8_matmul_vnni,
        "vnni_packed": _vnni_packed,
    }[name]


DN2 = (((1,), (0,)), ((), ()))

# M = 1, rows not a multiple of the 6-row tile, K odd / not a multiple of 4 or 32,
# N not a multiple of 16, and MiniLM's shapes (several chunks on the pool).
W8A8_SHAPES = [
    (1, 1, 1),
    (1, 7, 5),
    (2, 33, 17),
    (7, 130, 31),
    (13, 384, 100),
    (64, 97, 48),
    (300, 65, 40),
    (1024, 384, 384),
    (257, 1536, 384),
    (1, 576, 1000),  # decode sizes: the threads split the panels
    (16, 130, 333),
]


def _w8a8_case(m, k, n, seed, quantize=True):
    rng = np.random.default_rng(seed)
    # Row magnitudes spread over 1e-3..1e3, some rows all zero (scale 1, codes 0).
    x = rng.normal(size=(m, k)) * 10.0 ** rng.uniform(-3, 3, size=(m, 1))
    x[rng.random(m) < 0.2] = 0.0
    w = jnp.asarray(rng.normal(size=(k, n)), jnp.float32)
    if quantize:
        w = jqx.int8_dynamic_activation_int8_weight().quantize_weight(w)
    return jnp.asarray(x, jnp.float32), w


def _xla_w8a8(x, q, dn=DN2):
    """jqx.ops' XLA W8A8 path on the exact int32 dot."""
    with jqx.ops.policy(w8a8_bf16_min_rows=1 << 40, pad_single_row=False):
        return jqx.ops.dot_general(x, q, dn, backend="xla")


@functools.partial(jax.jit, static_argnames=("reference", "kernel"))
def _fused_and_xla(x, w, reference=False, kernel="avx2"):
    """The fused kernel, jqx.ops' XLA path and (with `reference`) the plain-jnp
    reference on the same quantized weight: one compiled program per shape, where
    eager JAX would compile each of dozens of ops for each new shape."""
    q = jqx.int8_dynamic_activation_int8_weight().quantize_weight(w)
    ws = q.scale.astype(jnp.float32).reshape(-1)
    out = (_fused_kernel(kernel)(x, q.qvalue, ws), _xla_w8a8(x, q))
    return out + (native.w8a8_matmul_reference(x, q.qvalue, ws),) if reference else out


@pytest.mark.parametrize("kernel", FUSED)
@pytest.mark.parametrize("m,k,n", W8A8_SHAPES)
def test_w8a8_fused_bit_identical_to_xla_path(m, k, n, kernel):
    x, w = _w8a8_case(m, k, n, seed=m * 31 + k * 7 + n, quantize=False)
    y, xla, ref = _fused_and_xla(x, w, reference=True, kernel=kernel)
    assert y.dtype == jnp.float32 and y.shape == (m, n)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(xla))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(ref))


@pytest.mark.parametrize("kernel", FUSED)
@pytest.mark.parametrize("act", ["per_tensor", "static"])
def test_w8a8_fused_per_tensor_and_static_scales(act, kernel):
    x, _ = _w8a8_case(37, 130, 33, seed=5)
    w = jax.random.normal(jax.random.key(2), (130, 33))
    if act == "static":
        recipe = jqx.int8_dynamic_activation_int8_weight(act_granularity="per_tensor")
        q = recipe.quantize_weight(w)
        q = q.replace(
            act=dataclasses.replace(q.act, kind="static"), act_scale=jnp.asarray(0.037, jnp.float32)
        )
        act_arg = jnp.asarray([0.037], jnp.float32)
    else:
        q = jqx.int8_dynamic_activation_int8_weight(act_granularity="per_tensor").quantize_weight(w)
        act_arg = "per_tensor"
    ws = q.scale.astype(jnp.float32).reshape(-1)
    y = _fused_kernel(kernel)(x, q.qvalue, ws, act=act_arg)
    ref = native.w8a8_matmul_reference(x, q.qvalue, ws, act=act_arg)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(ref))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(_xla_w8a8(x, q)))


@needs_conv
def test_w8a8_fused_through_jqx_ops():
    """The dispatcher runs W8A8 int8 on a fused kernel: the VNNI one where the AVX512
    GEMM runs, else the AVX2 one; 3-D activations contracted on the last and on a
    middle axis."""
    x, q = _w8a8_case(96, 130, 40, seed=3)
    x3 = x.reshape(4, 24, 130)
    dn_last, dn_mid = (((2,), (0,)), ((), ())), (((1,), (0,)), ((), ()))
    with jqx.ops.policy(platform="cpu", native_min_work=0):
        want = "native.w8a8_vnni" if native.available() else "native.w8a8_fused"
        assert jqx.ops.explain(x3, q, dn_last) == want
        y_last = jax.jit(lambda a, b: jqx.ops.dot_general(a, b, dn_last))(x3, q)
        y_mid = jqx.ops.dot_general(jnp.swapaxes(x3, 1, 2), q, dn_mid)
    np.testing.assert_array_equal(np.asarray(y_last), np.asarray(_xla_w8a8(x3, q, dn_last)))
    np.testing.assert_array_equal(np.asarray(y_mid), np.asarray(y_last))


@pytest.mark.parametrize("kernel", FUSED)
@settings(deadline=None, max_examples=15)
@given(
    seed=st.integers(0, 2**31 - 1),
    m=st.sampled_from([1, 5, 6, 7, 49, 200]),
    k=st.integers(1, 200),
    n=st.integers(1, 70),
)
def test_w8a8_fused_property(kernel, seed, m, k, n):
    # Every example has a new shape: one jitted program each, not dozens of eager ops.
    y, xla = _fused_and_xla(*_w8a8_case(m, k, n, seed, quantize=False), kernel=kernel)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(xla))


def _non_finite_rows(m, k):
    """Rows holding a NaN, an inf, a -inf, both, and finite rows around them."""
    x = np.array(_w8a8_case(m, k, 1, seed=m + k)[0])
    x[1, k // 2] = np.nan
    x[2, 0] = np.inf
    x[3, k - 1] = -np.inf
    x[4, 0], x[4, k - 1] = np.inf, np.nan
    return jnp.asarray(x)


@pytest.mark.parametrize("kernel", FUSED)
@pytest.mark.parametrize("act", ["per_token", "per_tensor", "static"])
@pytest.mark.parametrize("m", [6, 40])
def test_w8a8_fused_keeps_nan_and_inf_as_the_xla_path(kernel, act, m):
    """A row holding NaN or inf gets scale inf (numerics.nan_max), so a NaN output row
    (per tensor: all rows), as on XLA's path; a NaN's code is 0, as XLA converts it.
    The kernels, and XLA's own max at these shapes, once dropped a NaN: such rows
    came out finite. Under a static scale a row holding NaN gets a NaN scale
    (numerics.keep_nan_rows); inf saturates at the code range, as on XLA's path."""
    x = _non_finite_rows(m, 130)
    w = jax.random.normal(jax.random.key(4), (130, 33))
    if act == "static":
        q = jqx.int8_dynamic_activation_int8_weight(act_granularity="per_tensor").quantize_weight(w)
        q = q.replace(
            act=dataclasses.replace(q.act, kind="static"), act_scale=jnp.asarray(0.037, jnp.float32)
        )
        act_arg = jnp.asarray([0.037], jnp.float32)
    else:
        q = jqx.int8_dynamic_activation_int8_weight(act_granularity=act).quantize_weight(w)
        act_arg = act
    ws = q.scale.astype(jnp.float32).reshape(-1)
    y = np.asarray(_fused_kernel(kernel)(x, q.qvalue, ws, act=act_arg))
    np.testing.assert_array_equal(y, np.asarray(_xla_w8a8(x, q)))
    np.testing.assert_array_equal(
        y, np.asarray(native.w8a8_matmul_reference(x, q.qvalue, ws, act=act_arg))
    )
    assert np.isnan(y[1]).all() and np.isnan(y[4]).all()
    assert np.isfinite(y[0]).all() == (act != "per_tensor")
    if act == "static":
        assert np.isfinite(y[2:4]).all() and np.isfinite(y[5:]).all()


# ------------------------------------------------------- int8 weight-only, two-level split
# native.two_level_matmul: x split into two int8 levels inside the VNNI GEMM call,
# bit-identical to jqx.ops' XLA path (xla.two_level_int8).

TWO_LEVEL = [
    pytest.param(False, marks=needs_native),
    pytest.param(True, id="packed", marks=needs_native),
]


def _xla_two_level(x, q, dn=DN2):
    with jqx.ops.policy(platform="cpu", two_level_max_rows=1 << 40, two_level_min_weight=0):
        assert jqx.ops.explain(x, q, dn, backend="xla") == "xla.two_level_int8"
        return jqx.ops.dot_general(x, q, dn, backend="xla")


_two_level_kernel = jax.jit(native.two_level_matmul)
_two_level_reference = jax.jit(native.two_level_matmul_reference)
_two_level_xla = jax.jit(_xla_two_level)


def _two_level_and_xla(x, w, packed=False):
    """The kernel, jqx.ops' XLA path and the plain-jnp reference, each compiled on its
    own, as the dispatcher runs one in place of another: XLA's rounding of the final
    ``sum1 * s1 + sum2 * s2`` (which product it fuses into an FMA) depends on the
    program around it."""
    q = jqx.int8_weight_only().quantize_weight(w)
    ws = q.scale.astype(jnp.float32).reshape(-1)
    codes = native.pack_int8(q.qvalue) if packed else q.qvalue
    return (
        _two_level_kernel(x, codes, ws),
        _two_level_xla(x, q),
        _two_level_reference(x, q.qvalue, ws),
    )


@pytest.mark.parametrize("packed", TWO_LEVEL)
@pytest.mark.parametrize("m,k,n", [*W8A8_SHAPES, (1, 384, 384), (1, 32, 32), (2, 8, 16)])
def test_two_level_bit_identical_to_xla_path(m, k, n, packed):
    """One row and several: XLA fuses the final add with a different product for a
    single row (its scales are scalars), and the kernel rounds as it does."""
    x, w = _w8a8_case(m, k, n, seed=m * 17 + k * 3 + n, quantize=False)
    y, xla, ref = _two_level_and_xla(x, w, packed=packed)
    assert y.dtype == jnp.float32 and y.shape == (m, n)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(xla))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(ref))


@needs_native
@pytest.mark.parametrize("m,k,n", [(1, 384, 384), (300, 130, 40)])
def test_two_level_error_against_float64(m, k, n):
    """|y - x . (codes * ws)| <= max|x_row| / 32511 * sum_k |codes * ws| (the residual's
    bound) plus float32 rounding of the sums."""
    x, w = _w8a8_case(m, k, n, seed=11, quantize=False)
    q = jqx.int8_weight_only().quantize_weight(w)
    ws = np.asarray(q.scale, np.float64).reshape(-1)
    wd = np.asarray(q.qvalue, np.float64) * ws
    y = np.asarray(native.two_level_matmul(x, q.qvalue, q.scale.reshape(-1)), np.float64)
    xd = np.asarray(x, np.float64)
    exact = xd @ wd
    amax = np.max(np.abs(xd), axis=1, keepdims=True)
    bound = amax / 32511 * np.sum(np.abs(wd), axis=0) + 1e-6 * (np.abs(xd) @ np.abs(wd)) + 1e-30
    assert np.all(np.abs(y - exact) <= bound)


@needs_native
@settings(deadline=None, max_examples=15)
@given(
    seed=st.integers(0, 2**31 - 1),
    m=st.sampled_from([1, 2, 5, 6, 7, 49, 200]),
    k=st.integers(1, 200),
    n=st.integers(1, 70),
    packed=st.booleans(),
)
def test_two_level_property(seed, m, k, n, packed):
    y, xla, _ = _two_level_and_xla(*_w8a8_case(m, k, n, seed, quantize=False), packed=packed)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(xla))


@needs_native
@pytest.mark.parametrize("m", [6, 40])
def test_two_level_keeps_nan_and_inf_as_the_xla_path(m):
    x = _non_finite_rows(m, 130)
    q = jqx.int8_weight_only().quantize_weight(jax.random.normal(jax.random.key(5), (130, 33)))
    y = np.asarray(native.two_level_matmul(x, q.qvalue, q.scale.reshape(-1)))
    np.testing.assert_array_equal(y, np.asarray(_xla_two_level(x, q)))
    assert np.isnan(y[1:5]).all() and np.isfinite(y[0]).all()


@needs_native
def test_two_level_huge_scales():
    """Rows near float32's limit: both levels' scales above 2^100 divide in two steps
    (numerics.div_by_scale), as on XLA's path."""
    x, w = _w8a8_case(7, 64, 20, seed=3, quantize=False)
    x = x.at[0].multiply(1e30).at[1].set(1e35).at[2].multiply(1e-30)
    y, xla, _ = _two_level_and_xla(x, w)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(xla))
    assert np.isfinite(np.asarray(y)).all()


@needs_native
def test_two_level_through_jqx_ops_and_empty_reduction():
    """The dispatcher's native int8 weight-only product is the fused call; 3-D
    activations contracted on the last and on a middle axis; K = 0 gives zeros."""
    x, w = _w8a8_case(96, 130, 40, seed=3, quantize=False)
    q = jqx.int8_weight_only().quantize_weight(w)
    x3 = x.reshape(4, 24, 130)
    dn_last, dn_mid = (((2,), (0,)), ((), ())), (((1,), (0,)), ((), ()))
    with jqx.ops.policy(platform="cpu", native_min_work=0):
        assert jqx.ops.explain(x3, q, dn_last) == "native.two_level_vnni"
        y_last = jax.jit(lambda a, b: jqx.ops.dot_general(a, b, dn_last))(x3, q)
        y_mid = jqx.ops.dot_general(jnp.swapaxes(x3, 1, 2), q, dn_mid)
    np.testing.assert_array_equal(np.asarray(y_last), np.asarray(_xla_two_level(x3, q, dn_last)))
    np.testing.assert_array_equal(np.asarray(y_mid), np.asarray(y_last))
    ws = jnp.arange(5, dtype=jnp.float32)
    for w0 in (jnp.ones((0, 5), jnp.int8), native.pack_int8(jnp.ones((0, 5), jnp.int8))):
        y = native.two_level_matmul(jnp.ones((3, 0), jnp.float32), w0, ws)
        np.testing.assert_array_equal(np.asarray(y), np.zeros((3, 5), np.float32))


def test_two_level_bad_input():
    for fn in (native.two_level_matmul, native.two_level_matmul_reference):
        _check_operand_errors(fn)
    x, ws = jnp.ones((3, 8)), jnp.ones((4,))
    with pytest.raises(ValueError, match="packed w must be int8"):
        native.two_level_matmul(x, jnp.ones((1, 3, 64), jnp.int8), ws)


@pytest.mark.skipif(not native.available(), reason=f"native int8 GEMM: {native.status()}")
def test_calls_on_xla_pool_concurrently_give_the_same_bits():
    """Calls of more than 16 rows hand their helper chunks to XLA's own thread pool
    (pool.h, XlaPoolScope). Independent products inside one program (XLA may run them
    side by side) and the same program from several Python threads at once give the
    bits of one call at a time; so do the smaller calls on jqx's own workers."""
    cases = [_w8a8_case(m, 384, 384, seed=m) for m in (128, 300, 16, 1)]

    def _codes(x):
        return jnp.clip(jnp.round(x), -128, 127).astype(jnp.int8)

    xs = [x for x, _ in cases]
    ws = [(native.pack_int8(q.qvalue), q.scale.astype(jnp.float32).reshape(-1)) for _, q in cases]

    @jax.jit
    def many(xs):
        outs = [native.w8a8_matmul_vnni(x, wp, s) for x, (wp, s) in zip(xs, ws, strict=True)]
        outs.append(native.int8_matmul(_codes(xs[0]), cases[0][1].qvalue))
        return outs

    want = [
        np.asarray(native.w8a8_matmul_vnni(x, wp, s)) for x, (wp, s) in zip(xs, ws, strict=True)
    ]
    want.append(np.asarray(native.int8_matmul(_codes(xs[0]), cases[0][1].qvalue)))
    errors = []

    def worker():
        try:
            for _ in range(5):
                got = many(xs)
                errors.extend(
                    i
                    for i, (g, w) in enumerate(zip(got, want, strict=True))
                    if not np.array_equal(g, w)
                )
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


@pytest.mark.skipif(not native.available(), reason=f"native int8 GEMM: {native.status()}")
def test_w8a8_vnni_empty_reduction():
    x, w = jnp.ones((3, 0), jnp.float32), jnp.ones((0, 5), jnp.int8)
    ws = jnp.arange(5, dtype=jnp.float32)
    for act in ("per_token", "per_tensor", jnp.asarray([0.5], jnp.float32)):
        for ww in (w, native.pack_int8(w)):
            y = native.w8a8_matmul_vnni(x, ww, ws, act=act)
            np.testing.assert_array_equal(np.asarray(y), np.zeros((3, 5), np.float32))


@pytest.mark.skipif(not native.available(), reason=f"native int8 GEMM: {native.status()}")
@pytest.mark.parametrize("amx_mode", [True, False], indirect=True, ids=["amx", "vnni"])
@pytest.mark.parametrize("m,k,n", [(1, 64, 20), (37, 96, 33), (300, 384, 200), (4, 0, 17)])
def test_w8a8_and_two_level_epilogue(m, k, n, amx_mode):
    """The bias and GELU as each rescaled output is stored (epilogue.h): the bias is
    XLA's add on the call's own result, bit for bit; the GELU within its bound; W8A8
    (every activation mode) and two-level, plain and packed weights, K = 0."""
    rng = np.random.default_rng(m + 7 * k + n)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    w = jnp.asarray(rng.integers(-127, 128, (k, n)), jnp.int8)
    ws = jnp.asarray(rng.random(n) * 0.02, jnp.float32)
    bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
    calls = [
        functools.partial(native.w8a8_matmul_vnni, act=act)
        for act in ("per_token", "per_tensor", jnp.asarray([0.05], jnp.float32))
    ]
    calls.append(native.two_level_matmul)
    for fn in calls:
        for ww in (w, native.pack_int8(w)):
            y = np.asarray(fn(x, ww, ws))
            f = y + np.asarray(bias)
            np.testing.assert_array_equal(np.asarray(fn(x, ww, ws, bias=bias)), f)
            assert_gelu_within_bound(f, fn(x, ww, ws, bias=bias, activation="gelu"))
            assert_gelu_within_bound(y, fn(x, ww, ws, activation="gelu"))
            assert_gelu_tanh_within_bound(f, fn(x, ww, ws, bias=bias, activation="gelu_tanh"))
            relu = np.asarray(jax.jit(jax.nn.relu)(f))
            np.testing.assert_array_equal(
                np.asarray(fn(x, ww, ws, bias=bias, activation="relu")), relu
            )


@pytest.mark.skipif(not native.available(), reason=f"native int8 GEMM: {native.status()}")
def test_w8a8_epilogue_bad_input_names_the_argument():
    x, w, ws = jnp.ones((3, 8)), jnp.ones((8, 4), jnp.int8), jnp.ones((4,))
    for fn in (native.w8a8_matmul_vnni, native.two_level_matmul):
        name = fn.__name__
        with pytest.raises(ValueError, match=rf"{name}: bias must be \(N,\) = \(4,\)"):
            fn(x, w, ws, bias=jnp.ones((5,)))
        with pytest.raises(ValueError, match=rf"{name}: bias must be a float32 array"):
            fn(x, w, ws, bias=jnp.ones((4,), jnp.float16))
        with pytest.raises(ValueError, match=rf"{name}: activation must be one of"):
            fn(x, w, ws, activation="tanh")


def _check_operand_errors(fn):
    """The dense fused calls' operand errors: each names the operand and the fix."""
    x, w, ws = jnp.ones((3, 8)), jnp.ones((8, 4), jnp.int8), jnp.ones((4,))
    with pytest.raises(ValueError, match="x must be float32"):
        fn(x.astype(jnp.bfloat16), w, ws)
    with pytest.raises(ValueError, match="w must be int8"):
        fn(x, w[:7], ws)
    with pytest.raises(ValueError, match="w_scale must be float32"):
        fn(x, w, ws.reshape(1, 4))


def test_w8a8_bad_input():
    x, w, ws = jnp.ones((3, 8)), jnp.ones((8, 4), jnp.int8), jnp.ones((4,))
    for fn in (native.w8a8_matmul, native.w8a8_matmul_vnni, native.w8a8_matmul_reference):
        _check_operand_errors(fn)
        with pytest.raises(ValueError, match="act='per_row'"):
            fn(x, w, ws, act="per_row")


@pytest.mark.skipif(
    not (native.gguf_available() and native.conv_available()),
    reason=f"native AVX2 kernels unavailable: {native.gguf_status()}",
)
def test_one_pool_shared_and_its_thread_count_respected():
    """The three libraries run on one pool per process, of $JQX_NUM_THREADS threads;
    the fused W8A8 result does not depend on the count."""
    code = """
        import ctypes, hashlib, numpy as np, jax.numpy as jnp
        from jqx.kernels.cpu import native
        libs = [native._GGUF, native._CONV] + ([native._INT8] if native.available() else [])
        assert native.gguf_available() and native.conv_available()
        handles = set()
        for lib in libs:
            lib.handle.jqx_pool_handle.restype = ctypes.c_void_p
            handles.add(lib.handle.jqx_pool_handle())
        r = np.random.default_rng(0)
        x = jnp.asarray(r.normal(size=(300, 130)), jnp.float32)
        w = jnp.asarray(r.integers(-127, 128, (130, 70)), jnp.int8)
        y = np.asarray(native.w8a8_matmul(x, w, jnp.ones((70,), jnp.float32)))
        print(native.pool_threads(), native.gguf_num_threads(), len(handles),
              hashlib.sha256(y.tobytes()).hexdigest()[:16])
        """
    outs = [_run(code, {"JQX_NUM_THREADS": t}).split() for t in ("3", "1")]
    assert outs[0][:3] == ["3", "3", "1"]
    assert outs[1][:3] == ["1", "1", "1"]
    assert outs[0][3] == outs[1][3]


def test_build_key_covers_the_shared_header():
    """Editing pool.h must rebuild every library: it is part of each one's cache key."""
    header = (native._CONV.src.parent / "pool.h").read_bytes()
    for lib in (native._INT8, native._GGUF, native._CONV):
        assert header in lib.source_bytes()


# ----------------------------------------------------------------- the float32 GEMM
# native.f32_matmul (f32_gemm.h): one fused multiply-add chain per output over k, from 0.


def _round_f32(x) -> np.float32:
    """The float32 nearest to the rational ``x`` (ties to even), computed exactly."""
    from fractions import Fraction  # noqa: PLC0415

    x = Fraction(x)
    if x == 0:
        return np.float32(0.0)
    sign, x = (-1 if x < 0 else 1), abs(x)
    e = x.numerator.bit_length() - x.denominator.bit_length()  # 2^e <= x < 2^(e + 2)
    while Fraction(2) ** e > x:
        e -= 1
    while Fraction(2) ** (e + 1) <= x:
        e += 1
    q = max(e - 23, -149)  # the spacing of float32s around x (subnormals included)
    m = x / Fraction(2) ** q
    r = m.numerator // m.denominator
    rem = m - r
    if rem > Fraction(1, 2) or (rem == Fraction(1, 2) and r % 2 == 1):
        r += 1
    return np.float32(sign * float(r) * 2.0**q)


def _fma_chain(a, b) -> np.ndarray:
    """C[m, n] = fma(a[m, K-1], b[K-1, n], ... fma(a[m, 0], b[0, n], 0)), each fma rounded
    once, exactly: the order the kernel promises."""
    from fractions import Fraction  # noqa: PLC0415

    m, k = a.shape
    n = b.shape[1]
    fa = [[Fraction(float(v)) for v in row] for row in a]
    fb = [[Fraction(float(v)) for v in row] for row in b]
    out = np.zeros((m, n), np.float32)
    for i in range(m):
        for j in range(n):
            acc = np.float32(0.0)
            for t in range(k):
                acc = _round_f32(fa[i][t] * fb[t][j] + Fraction(float(acc)))
            out[i, j] = acc
    return out


# Rows: a partial register block (14 + 3), one block, the panel split; columns: a half
# panel, masks in both halves; K: two k blocks (kF32Kc = 768) with the accumulators
# stored and reloaded; 260 rows: B packed up front (kF32PackRows = 256).
F32_EXACT = [(1, 1, 1), (3, 7, 5), (17, 33, 35), (14, 40, 64), (2, 1600, 3), (260, 9, 17)]


@needs_native
@pytest.mark.parametrize("m,k,n", F32_EXACT)
def test_f32_matmul_is_one_fma_chain_per_output_bit_for_bit(m, k, n):
    rng = np.random.default_rng(m * 31 + k * 7 + n)
    # Values of many magnitudes: every rounding of the chain matters.
    a = (rng.standard_normal((m, k)) * 2.0 ** rng.integers(-8, 8, (m, k))).astype(np.float32)
    b = (rng.standard_normal((k, n)) * 2.0 ** rng.integers(-8, 8, (k, n))).astype(np.float32)
    got = np.asarray(jax.jit(native.f32_matmul)(a, b))
    np.testing.assert_array_equal(got, _fma_chain(a, b))


@needs_native
@settings(deadline=None, max_examples=25)
@given(
    m=st.integers(1, 300),
    k=st.integers(1, 1700),
    n=st.integers(1, 200),
    seed=st.integers(0, 2**31 - 1),
)
def test_f32_matmul_property_within_the_chain_bound(m, k, n, seed):
    """|C - AB| <= gamma_K sum_k |a b| against float64, any shape (edges, k blocks,
    packed or in place, either thread split)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    got = np.asarray(native.f32_matmul(jnp.asarray(a), jnp.asarray(b)), np.float64)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    u = 2.0**-24
    bound = k * u / (1 - k * u) * (np.abs(a64) @ np.abs(b64))
    assert np.all(np.abs(got - a64 @ b64) <= bound)


@needs_native
def test_f32_matmul_nan_inf_zero_sizes_and_rows_of_any_rank():
    a = np.ones((20, 8), np.float32)
    b = np.ones((8, 40), np.float32)
    a[3, 2], b[5, 39] = np.nan, np.inf
    got = np.asarray(native.f32_matmul(jnp.asarray(a), jnp.asarray(b)))
    want = a @ b
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(got[~np.isnan(want)], want[~np.isnan(want)])
    assert native.f32_matmul(jnp.zeros((0, 4)), jnp.zeros((4, 3))).shape == (0, 3)
    np.testing.assert_array_equal(
        np.asarray(native.f32_matmul(jnp.zeros((2, 0)), jnp.zeros((0, 3)))), np.zeros((2, 3))
    )
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 70, 50)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((50, 30)), jnp.float32)
    got = native.f32_matmul(x, w)
    assert got.shape == (2, 3, 70, 30)
    np.testing.assert_array_equal(
        np.asarray(got).reshape(-1, 30), native.f32_matmul(x.reshape(-1, 50), w)
    )


@needs_native
def test_f32_matmul_under_vmap_is_one_call_and_broadcasts():
    rng = np.random.default_rng(2)
    a = jnp.asarray(rng.standard_normal((3, 40, 50)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((3, 50, 70)), jnp.float32)
    f = native.f32_matmul
    cases = [
        (jax.vmap(f, (0, None)), (a, b[0]), lambda: [f(a[i], b[0]) for i in range(3)]),
        (jax.vmap(f, (None, 0)), (a[0], b), lambda: [f(a[0], b[i]) for i in range(3)]),
        (jax.vmap(f), (a, b), lambda: [f(a[i], b[i]) for i in range(3)]),
    ]
    for g, args, each in cases:
        assert str(jax.make_jaxpr(g)(*args)).count("ffi_call") == 1
        np.testing.assert_array_equal(np.asarray(g(*args)), np.stack(each()))
    nested = jax.vmap(jax.vmap(f, (0, None)), (None, 0))(a, b)  # (j, i, 40, 70)
    np.testing.assert_array_equal(np.asarray(nested[2, 1]), np.asarray(f(a[1], b[2])))


@needs_native
def test_f32_matmul_independent_of_thread_count(tmp_path):
    script = textwrap.dedent(
        """
        import numpy as np, jax.numpy as jnp, sys
        from jqx.kernels.cpu import native
        rng = np.random.default_rng(0)
        out = []
        for m, k, n in ((4099, 384, 100), (100, 900, 1000), (20, 50, 3000)):
            a = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
            b = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
            out.append(np.asarray(native.f32_matmul(a, b)).ravel())
        np.save(sys.argv[1], np.concatenate(out))
        """
    )
    results = []
    for threads in ("1", "2", "3"):
        path = tmp_path / f"f32_{threads}.npy"
        env = {**os.environ, "JQX_NUM_THREADS": threads}
        subprocess.run([sys.executable, "-c", script, str(path)], check=True, env=env)
        results.append(np.load(path))
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0], results[2])


def test_f32_matmul_bad_input_names_the_argument():
    with pytest.raises(ValueError, match=r"f32_matmul: a must be a float32 array, got int32"):
        native.f32_matmul(jnp.ones((2, 3), jnp.int32), jnp.ones((3, 4)))
    with pytest.raises(ValueError, match=r"f32_matmul: b must be a float32 array, got list"):
        native.f32_matmul(jnp.ones((2, 3)), [[1.0]])
    with pytest.raises(ValueError, match=r"a \(2, 3\) and b \(4, 5\) do not fit"):
        native.f32_matmul(jnp.ones((2, 3)), jnp.ones((4, 5)))
    with pytest.raises(ValueError, match=r"a \(3,\) and b \(3, 5\) do not fit"):
        native.f32_matmul(jnp.ones((3,)), jnp.ones((3, 5)))


# The epilogue (epilogue.h): a bias, and jax.nn.gelu(approximate=False)'s trace, on each
# product while its block is in cache. The bias add is XLA's (one rounding) bit for bit;
# the GELU within the bound tests/_gelu_check.py states.


@needs_native
@pytest.mark.parametrize("m,k,n", [*F32_EXACT, (300, 800, 70), (5, 1700, 1100)])
def test_f32_matmul_bias_is_the_add_bit_for_bit_and_gelu_within_bound(m, k, n):
    rng = np.random.default_rng(m + 3 * k + 5 * n)
    a = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
    c = np.asarray(native.f32_matmul(a, b))
    f = c + np.asarray(bias)  # numpy's float32 add: one rounding
    np.testing.assert_array_equal(np.asarray(jax.jit(native.f32_matmul)(a, b, bias)), f)
    assert_gelu_within_bound(f, native.f32_matmul(a, b, bias, "gelu"))
    assert_gelu_within_bound(c, native.f32_matmul(a, b, activation="gelu"))
    assert_gelu_tanh_within_bound(f, native.f32_matmul(a, b, bias, "gelu_tanh"))
    relu = np.asarray(jax.jit(jax.nn.relu)(f))  # XLA's max(f, 0): bit for bit
    np.testing.assert_array_equal(np.asarray(native.f32_matmul(a, b, bias, "relu")), relu)


@needs_native
@settings(deadline=None, max_examples=15)
@given(
    m=st.integers(1, 300),
    k=st.integers(0, 1700),
    n=st.integers(1, 200),
    scale=st.sampled_from([1e-3, 1.0, 8.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_f32_matmul_epilogue_property(m, k, n, scale, seed):
    """Any shape (edges, k blocks, packed or in place, K = 0) and scale: the bias is the
    add, the GELU within its bound, of the product without an epilogue."""
    rng = np.random.default_rng(seed)
    a = jnp.asarray(rng.standard_normal((m, k)) * scale, jnp.float32)
    b = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(n) * scale, jnp.float32)
    f = np.asarray(native.f32_matmul(a, b)) + np.asarray(bias)
    np.testing.assert_array_equal(np.asarray(native.f32_matmul(a, b, bias)), f)
    assert_gelu_within_bound(f, native.f32_matmul(a, b, bias, "gelu"))
    assert_gelu_tanh_within_bound(f, native.f32_matmul(a, b, bias, "gelu_tanh"))


@needs_native
def test_f32_matmul_gelu_over_a_sweep_and_special_values():
    """Pre-activations over [-14, 14] (every branch of erfc: |x| < 1, < 2, the tail, its
    underflow) and NaN, infinities, signed zeros, subnormals and the largest floats, in
    37 columns (both halves of a panel, masked)."""
    big = np.finfo(np.float32).max
    special = [0.0, -0.0, np.inf, -np.inf, np.nan, 1e-30, -1e-30, 1e-40, -1e-40, big, -big]
    x = np.concatenate([np.linspace(-14, 14, 100_001), special]).astype(np.float32)
    a, b = jnp.asarray(x[:, None]), jnp.ones((1, 37), jnp.float32)
    c = np.asarray(native.f32_matmul(a, b))  # x itself (fma(x, 1, 0): -0 is +0)
    got = np.asarray(native.f32_matmul(a, b, activation="gelu"))
    for j in (0, 15, 16, 36):
        assert_gelu_within_bound(c[:, j], got[:, j])
    np.testing.assert_array_equal(got, np.repeat(got[:, :1], 37, axis=1))
    assert got[np.where(x == np.inf)[0][0], 0] == np.inf  # (0.5 inf) * erfc(-inf) = inf
    assert np.isnan(got[np.where(x == -np.inf)[0][0], 0])  # (-inf) * 0, as in jax
    # The tanh form: tanh's branches (|x| < 0.625, the exp form, +-1 far out).
    got = np.asarray(native.f32_matmul(a, b, activation="gelu_tanh"))
    for j in (0, 15, 16, 36):
        assert_gelu_tanh_within_bound(c[:, j], got[:, j])
    np.testing.assert_array_equal(got, np.repeat(got[:, :1], 37, axis=1))
    tanh_form = np.asarray(jax.nn.gelu(jnp.asarray(c[:, 0])))  # XLA's: the same at the ends
    for v in (np.inf, -np.inf, big, -big):
        i = np.where(x == v)[0][0]
        np.testing.assert_array_equal(got[i, 0], tanh_form[i])
    # ReLU: XLA's max(x, 0) bit for bit, signed zeros and NaN's sign included.
    x2 = np.concatenate([x, [-np.nan]]).astype(np.float32)
    c2 = np.asarray(native.f32_matmul(jnp.asarray(x2[:, None]), b))
    got = np.asarray(native.f32_matmul(jnp.asarray(x2[:, None]), b, activation="relu"))
    want = np.asarray(jax.jit(jax.nn.relu)(c2))
    np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))


@needs_native
def test_f32_matmul_epilogue_with_k_zero_and_under_vmap():
    bias = jnp.asarray([1.0, -2.0, 0.5], jnp.float32)
    np.testing.assert_array_equal(
        np.asarray(native.f32_matmul(jnp.zeros((2, 0)), jnp.zeros((0, 3)), bias)),
        np.tile(np.asarray(bias), (2, 1)),
    )
    got = native.f32_matmul(jnp.zeros((2, 0)), jnp.zeros((0, 3)), bias, "gelu")
    assert_gelu_within_bound(np.tile(np.asarray(bias), (2, 1)), got)
    rng = np.random.default_rng(3)
    a = jnp.asarray(rng.standard_normal((3, 40, 50)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((3, 50, 70)), jnp.float32)
    e = jnp.asarray(rng.standard_normal((3, 70)), jnp.float32)

    def f(a, b, e):
        return native.f32_matmul(a, b, e, "gelu")

    cases = [
        (jax.vmap(f, (None, None, 0)), (a[0], b[0], e), [f(a[0], b[0], e[i]) for i in range(3)]),
        (jax.vmap(f, (0, None, 0)), (a, b[0], e), [f(a[i], b[0], e[i]) for i in range(3)]),
        (jax.vmap(f), (a, b, e), [f(a[i], b[i], e[i]) for i in range(3)]),
        (jax.vmap(f, (0, None, None)), (a, b[0], e[0]), [f(a[i], b[0], e[0]) for i in range(3)]),
    ]
    for g, args, each in cases:
        assert str(jax.make_jaxpr(g)(*args)).count("ffi_call") == 1
        np.testing.assert_array_equal(np.asarray(g(*args)), np.stack(each))


def test_f32_matmul_epilogue_bad_input_names_the_argument():
    a, b = jnp.ones((2, 3)), jnp.ones((3, 4))
    with pytest.raises(ValueError, match=r"f32_matmul: bias must be a float32 array, got int32"):
        native.f32_matmul(a, b, jnp.ones((4,), jnp.int32))
    with pytest.raises(ValueError, match=r"bias must be \(N,\) = \(4,\).*got \(1, 4\)"):
        native.f32_matmul(a, b, jnp.ones((1, 4)))
    with pytest.raises(ValueError, match=r"activation must be one of .*'relu'.*got 'silu'"):
        native.f32_matmul(a, b, activation="silu")


# --------------------------------------------------------------------------- w8a8_mlp


def _mlp_two_calls(x, p1, s1, p2, s2, act, b1, activation, b2):
    """native.w8a8_mlp's definition: the two single-layer kernel calls."""
    if act == "two_level":
        h = native.two_level_matmul(x, p1, s1, bias=b1, activation=activation)
        return native.two_level_matmul(h, p2, s2, bias=b2)
    a1, a2 = (act, act) if isinstance(act, str) else act
    h = native.w8a8_matmul_vnni(x, p1, s1, act=a1, bias=b1, activation=activation)
    return native.w8a8_matmul_vnni(h, p2, s2, act=a2, bias=b2)


def _mlp_operands(rng, m, k, f, n, scale=1.0, pack=True):
    x = jnp.asarray(rng.standard_normal((m, k)) * scale, jnp.float32)
    w1 = jnp.asarray(rng.integers(-127, 128, (k, f)), jnp.int8)
    w2 = jnp.asarray(rng.integers(-127, 128, (f, n)), jnp.int8)
    s1 = jnp.asarray(rng.random(f) * 0.02 / np.sqrt(k), jnp.float32)
    s2 = jnp.asarray(rng.random(n) * 0.02 / np.sqrt(f), jnp.float32)
    b1 = jnp.asarray(rng.standard_normal(f), jnp.float32)
    b2 = jnp.asarray(rng.standard_normal(n), jnp.float32)
    if pack:
        w1, w2 = native.pack_int8(w1), native.pack_int8(w2)
    return x, w1, s1, w2, s2, b1, b2


_MLP_ACTS = ["per_token", "two_level", "static"]


def _assert_mlp_epilogues(fused, two_calls, b1, b2):
    """``fused(bias1, activation, bias2)`` equals ``two_calls(...)`` bit for bit for
    every activation, with and without the biases."""
    for activation in (None, "gelu", "gelu_tanh", "relu"):
        for e1, e2 in ((b1, b2), (None, None)):
            np.testing.assert_array_equal(
                np.asarray(fused(e1, activation, e2)), np.asarray(two_calls(e1, activation, e2))
            )


def _mlp_act(name):
    if name == "static":
        return (jnp.asarray([0.02], jnp.float32), jnp.asarray([0.01], jnp.float32))
    return name


@needs_native
@pytest.mark.parametrize("amx_mode", [True, False], indirect=True, ids=["amx", "vnni"])
@pytest.mark.parametrize(
    "m,k,f,n", [(1, 2, 1, 2), (5, 7, 33, 17), (97, 64, 130, 50), (300, 384, 1536, 384)]
)
def test_w8a8_mlp_equals_the_two_calls(m, k, f, n, amx_mode):
    """Both layers in one call give the two single-layer calls' bits: every activation
    mode (per row, two-level, static), every epilogue, with and without biases, edge
    panels and a partial last chunk."""
    rng = np.random.default_rng(m + 3 * k + 5 * f + n)
    x, p1, s1, p2, s2, b1, b2 = _mlp_operands(rng, m, k, f, n)
    for name in _MLP_ACTS:
        act = _mlp_act(name)
        _assert_mlp_epilogues(
            lambda e1, a, e2, act=act: native.w8a8_mlp(
                x, p1, s1, p2, s2, act=act, bias1=e1, activation=a, bias2=e2
            ),
            lambda e1, a, e2, act=act: _mlp_two_calls(x, p1, s1, p2, s2, act, e1, a, e2),
            b1,
            b2,
        )
    # Plain (K, N) codes, packed in the call: the same bits.
    _, w1, _, w2, _, _, _ = _mlp_operands(
        np.random.default_rng(m + 3 * k + 5 * f + n), m, k, f, n, pack=False
    )
    for name in _MLP_ACTS:
        act = _mlp_act(name)
        want = native.w8a8_mlp(x, p1, s1, p2, s2, act=act, bias1=b1, activation="gelu")
        for a, b in ((w1, p2), (p1, w2), (w1, w2)):
            got = native.w8a8_mlp(x, a, s1, b, s2, act=act, bias1=b1, activation="gelu")
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@needs_native
@settings(deadline=None, max_examples=12)
@given(
    m=st.integers(1, 400),
    k=st.integers(1, 300),
    f=st.integers(1, 300),
    n=st.integers(1, 100),
    act=st.sampled_from(_MLP_ACTS),
    activation=st.sampled_from([None, "gelu", "relu"]),
    scale=st.sampled_from([1e-3, 1.0, 50.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_w8a8_mlp_property(m, k, f, n, act, activation, scale, seed):
    """Any shapes and scale: the two calls' bits, and within the float reference's
    bound (test_ops' mlp tests bound jqx.ops.mlp against float32 math)."""
    rng = np.random.default_rng(seed)
    x, p1, s1, p2, s2, b1, b2 = _mlp_operands(rng, m, k, f, n, scale)
    a = _mlp_act(act)
    y = native.w8a8_mlp(x, p1, s1, p2, s2, act=a, bias1=b1, activation=activation, bias2=b2)
    want = _mlp_two_calls(x, p1, s1, p2, s2, a, b1, activation, b2)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(want))


@needs_native
def test_w8a8_mlp_special_values_and_vmap():
    """NaN and inf rows reach the output as the two calls give them (a static scale
    keeps a NaN row NaN); under vmap each batch element is one call."""
    rng = np.random.default_rng(0)
    x, p1, s1, p2, s2, b1, b2 = _mlp_operands(rng, 20, 16, 40, 8)
    x = x.at[3, 2].set(jnp.nan).at[7, 0].set(jnp.inf).at[9].set(0.0)
    for name in _MLP_ACTS:
        act = _mlp_act(name)
        y = native.w8a8_mlp(x, p1, s1, p2, s2, act=act, bias1=b1, activation="gelu", bias2=b2)
        want = _mlp_two_calls(x, p1, s1, p2, s2, act, b1, "gelu", b2)
        np.testing.assert_array_equal(np.asarray(y), np.asarray(want))
    xs = jnp.stack([x, 2 * x]).at[:, 3].set(1.0).at[:, 7].set(1.0)

    def one(v):
        return native.w8a8_mlp(v, p1, s1, p2, s2, bias1=b1, activation="relu", bias2=b2)

    got = jax.vmap(one)(xs)
    for i in range(2):
        np.testing.assert_array_equal(np.asarray(got[i]), np.asarray(one(xs[i])))


@needs_native
def test_w8a8_mlp_bad_input_names_the_argument():
    rng = np.random.default_rng(0)
    x, p1, s1, p2, s2, b1, b2 = _mlp_operands(rng, 3, 8, 16, 4)
    call = functools.partial(native.w8a8_mlp, x, p1, s1, p2, s2)
    with pytest.raises(ValueError, match="w8a8_mlp: x must be a float32 array"):
        native.w8a8_mlp(x.astype(jnp.bfloat16), p1, s1, p2, s2)
    with pytest.raises(ValueError, match=r"w8a8_mlp: w must be int8 \(K, N\).*layer 1"):
        native.w8a8_mlp(x, jnp.ones((9, 16), jnp.int8), s1, p2, s2)
    with pytest.raises(ValueError, match=r"a packed w must be int8 packed_shape\(K, N\).*layer 2"):
        native.w8a8_mlp(x, p1, s1, native.pack_int8(jnp.ones((12, 4), jnp.int8)), s2)
    with pytest.raises(ValueError, match="w8a8_mlp: w_scale must be float32.*w1_scale"):
        native.w8a8_mlp(x, p1, s1.astype(jnp.float16), p2, s2)
    with pytest.raises(ValueError, match="act='per_tensor' must be 'per_token', 'two_level'"):
        call(act="per_tensor")
    with pytest.raises(ValueError, match="act=3 must be 'per_token', 'two_level' or a pair"):
        call(act=3)
    with pytest.raises(ValueError, match=r"w8a8_mlp: bias must be \(N,\) = \(16,\)"):
        call(bias1=b2)
    with pytest.raises(ValueError, match=r"w8a8_mlp: bias must be \(N,\) = \(4,\)"):
        call(bias2=b1)
    with pytest.raises(ValueError, match="w8a8_mlp: activation must be one of"):
        call(activation="tanh")
    with pytest.raises(ValueError, match="K=0 and F=16 must be positive"):
        native.w8a8_mlp(jnp.ones((3, 0)), native.pack_int8(jnp.ones((0, 16), jnp.int8)), s1, p2, s2)


# --------------------------------------------------------------------------- f32_mlp


def _f32_mlp_operands(rng, m, k, f, n, scale=1.0):
    def arr(*shape, s=1.0):
        return jnp.asarray(rng.standard_normal(shape) * s, jnp.float32)

    return arr(m, k, s=scale), arr(k, f), arr(f, n), arr(f), arr(n)


@needs_native
@pytest.mark.parametrize(
    "m,k,f,n",
    [
        (1, 2, 1, 2),
        (5, 7, 33, 17),
        (97, 64, 130, 50),
        (300, 384, 1536, 384),
        (70, 0, 20, 5),
        (60, 800, 40, 1100),
    ],
)
def test_f32_mlp_equals_two_gemm_calls(m, k, f, n):
    """Both float32 layers in one call give two f32_matmul calls' bits: every epilogue,
    with and without biases, edge panels and blocks, k blocks (K, F > 768), K = 0."""
    x, w1, w2, b1, b2 = _f32_mlp_operands(np.random.default_rng(m + k + f + n), m, k, f, n)
    _assert_mlp_epilogues(
        lambda e1, a, e2: native.f32_mlp(x, w1, w2, bias1=e1, activation=a, bias2=e2),
        lambda e1, a, e2: native.f32_matmul(native.f32_matmul(x, w1, e1, a), w2, e2),
        b1,
        b2,
    )


@needs_native
@settings(deadline=None, max_examples=10)
@given(
    m=st.integers(1, 300),
    k=st.integers(0, 900),
    f=st.integers(1, 300),
    n=st.integers(1, 100),
    activation=st.sampled_from([None, "gelu", "relu"]),
    scale=st.sampled_from([1e-3, 1.0, 30.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_f32_mlp_property(m, k, f, n, activation, scale, seed):
    """Any shapes and scale: the two GEMM calls' bits, and within the float32 GEMM's
    bound (f32_matmul's tests) of the float64 MLP: |y - y64| <= gamma_F sum_f |h_f
    w2[f, n]| + sum_f |w2[f, n]| * slope * (gamma_K sum_k |x_k w1[k, f]| + the
    activation's few ulps)."""
    x, w1, w2, b1, b2 = _f32_mlp_operands(np.random.default_rng(seed), m, k, f, n, scale)
    y = native.f32_mlp(x, w1, w2, bias1=b1, activation=activation, bias2=b2)
    want = native.f32_matmul(native.f32_matmul(x, w1, b1, activation), w2, b2)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(want))
    x64, w164, w264 = (np.asarray(a, np.float64) for a in (x, w1, w2))
    pre = x64 @ w164 + np.asarray(b1, np.float64)
    act = {
        None: lambda v: v,
        "relu": lambda v: np.maximum(v, 0),
        "gelu": lambda v: np.asarray(jax.nn.gelu(jnp.asarray(v), approximate=False), np.float64),
    }[activation]
    h = act(pre)
    ref = h @ w264 + np.asarray(b2, np.float64)
    u = 2.0**-24

    def gamma(kk):
        return kk * u / (1 - kk * u)

    # The first layer's error, through the activation (slope <= 1.13), plus its ulps.
    e1 = gamma(k) * (np.abs(x64) @ np.abs(w164)) + 2 * u * np.abs(pre)
    e1 = 1.13 * e1 + 16 * u * np.abs(h) + 1e-37
    bound = gamma(f + 1) * (np.abs(h) + e1) @ np.abs(w264) + e1 @ np.abs(w264)
    bound = bound + u * np.abs(ref) + 1e-30
    assert np.all(np.abs(np.asarray(y, np.float64) - ref) <= bound)


@needs_native
def test_f32_mlp_vmap_and_bad_input():
    x, w1, w2, b1, b2 = _f32_mlp_operands(np.random.default_rng(1), 9, 8, 16, 4)
    xs = jnp.stack([x, -2 * x])
    got = jax.vmap(lambda v: native.f32_mlp(v, w1, w2, bias1=b1, activation="gelu"))(xs)
    for i in range(2):
        want = native.f32_mlp(xs[i], w1, w2, bias1=b1, activation="gelu")
        np.testing.assert_array_equal(np.asarray(got[i]), np.asarray(want))
    with pytest.raises(ValueError, match="f32_mlp: w1 must be a float32 array"):
        native.f32_mlp(x, w1.astype(jnp.bfloat16), w2)
    with pytest.raises(ValueError, match=r"f32_mlp: x \(9, 8\), w1 \(16, 4\) and w2"):
        native.f32_mlp(x, w2, w2)
    with pytest.raises(ValueError, match=r"f32_mlp: w2 \(8, 16\) must be \(F, N\) for w1's F=16"):
        native.f32_mlp(x, w1, w1)
    with pytest.raises(ValueError, match="and F > 0"):
        native.f32_mlp(x, w1[:, :0], w2[:0])
    with pytest.raises(ValueError, match=r"f32_mlp: bias must be \(N,\) = \(16,\)"):
        native.f32_mlp(x, w1, w2, bias1=b2)
    with pytest.raises(ValueError, match="f32_mlp: activation must be one of"):
        native.f32_mlp(x, w1, w2, activation="silu")

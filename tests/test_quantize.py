"""Quantize math: property tests over format x scheme x granularity, golden
tests of the seed formulas, the torchao convention, fake_quant, activations,
and every bad input of the issue's section 6."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jqx
from jqx.core import formats as F
from jqx.core import numerics

SHAPE = (8, 16)

# (format, scheme, symmetric_range)
CONFIGS = [
    ("int8", "absmax", False),
    ("int8", "absmax", True),
    ("int8", "zero_point", False),
    ("uint8", "absmax", False),
    ("uint8", "zero_point", False),
    ("int4", "absmax", False),
    ("int4", "absmax", True),
    ("int4", "zero_point", False),
    ("uint4", "zero_point", False),
    ("fp8_e4m3", "absmax", False),
    ("fp8_e5m2", "absmax", False),
    ("fp4_e2m1", "absmax", False),
    ("fp4_e1m2", "absmax", False),
    ("fp4_e3m0", "absmax", False),
    ("nf4", "absmax", False),
]
GRANS = {
    "tensor": jqx.per_tensor(),
    "channel-1": jqx.per_channel(-1),
    "channel0": jqx.per_channel(0),
    "group4ax0": jqx.per_group(4, axis=0),
    "group8ax1": jqx.per_group(8, axis=-1),
    "block4x8": jqx.per_block((4, 8)),
}

magnitude = st.one_of(
    st.just(0.0),
    st.floats(0.0625, 1e3, width=32),
    st.floats(-1e3, -0.0625, width=32),
)
arrays = hnp.arrays(np.float32, SHAPE, elements=magnitude)


def _full(q, a):
    """Per-block array -> logical shape."""
    return np.asarray(q.blocked(jnp.zeros(q.shape, jnp.float32)) + q.expand(a)).reshape(q.shape)


def _nearest_even(y: np.ndarray, f) -> np.ndarray:
    """Brute-force reference: nearest grid value in float64, ties to the even code."""
    v = np.array(f.values, np.float64)
    codes = np.array(f.codes)
    d = np.abs(y.astype(np.float64).ravel()[:, None] - v[None, :])
    cand = d == d.min(axis=1, keepdims=True)
    score = cand * (2 + (codes[None, :] % 2 == 0))
    return v[np.argmax(score, axis=1)].reshape(y.shape)


def _check_properties(x, fmt, scheme, sym, gran):
    f = F.get(fmt)
    if not f.signed and scheme == "absmax":
        x = np.abs(x)  # unsigned absmax covers [0, max] only
    x = x.copy()
    x[0, 0] = 0.0  # the block holding it includes zero: zero must reconstruct exactly
    q = jqx.quantize_array(
        jnp.asarray(x), fmt, scheme=scheme, granularity=gran, symmetric_range=sym
    )
    assert q.scale.shape == tuple(s // b for s, b in zip(SHAPE, q.block, strict=True))
    S = _full(q, q.scale)
    Z = _full(q, q.zero_point) if q.zero_point is not None else 0.0
    v = np.asarray(q.values(), np.float64)
    xh = np.asarray(q.dequantize(), np.float64)
    y = x / S.astype(np.float32)  # float32 division, as the library does it
    if f.kind == "int":
        lo = f.qmin_symmetric if sym else f.qmin
        assert v.min() >= lo and v.max() <= f.qmax  # codes within [qmin, qmax]
        ref = np.clip(np.round(y) + Z, lo, f.qmax)
        # XLA may divide as x * (1/S): one ulp apart, which can only flip an exact tie
        near_tie = np.abs(np.abs(y - np.trunc(y)) - 0.5) < 1e-5 * np.maximum(1.0, np.abs(y))
        assert np.all((v == ref) | near_tie)
        bound = S / 2
    else:
        assert np.isin(v, f.values).all()
        yc = np.clip(y, -f.max, f.max)
        # half the local grid gap at x/S, times S
        g = np.array(f.values)
        hi = np.searchsorted(g, yc, side="left").clip(1, len(g) - 1)
        gap = g[hi] - g[hi - 1]
        near_tie = np.abs(np.abs(yc - g[hi - 1]) - gap / 2) < 1e-5 * np.maximum(1.0, np.abs(yc))
        assert np.all((v == _nearest_even(yc, f)) | near_tie)
        bound = gap / 2 * S
    err = np.abs(xh - x)
    assert np.all(err <= bound * (1 + 1e-5) + 1e-6 * np.abs(x)), float((err - bound).max())
    assert xh[0, 0] == 0.0
    # idempotence: quantizing x_hat gives the same codes
    q2 = jqx.quantize_array(
        q.dequantize(), fmt, scheme=scheme, granularity=gran, symmetric_range=sym
    )
    # A block that x_hat made constant is stored as code +-1 with S = |c| (exact
    # reconstruction); there the values, not the codes, are the fixed point.
    xhb = q.blocked(jnp.asarray(xh, jnp.float32))
    red = tuple(range(1, xhb.ndim, 2))
    const = _full(q, (jnp.max(xhb, red) == jnp.min(xhb, red)).astype(jnp.float32)) > 0
    v2 = np.asarray(q2.values())
    assert np.all((v2 == v) | const)
    np.testing.assert_array_equal(np.asarray(q2.dequantize())[const], xh[const].astype(np.float32))
    S2 = _full(q2, q2.scale)
    # When min/S lands on an exact .5 the seed rounding can leave one end code
    # unused, so re-quantizing may shrink the scale by one step of qmax - qmin.
    rtol = 1e-5 + (1 / (f.qmax - f.qmin) if scheme == "zero_point" else 0.0)
    np.testing.assert_allclose(S2[~const], S[~const], rtol=rtol)
    symmetric_grid = set(f.values) == {-a for a in f.values}  # not NF4 (8 positive, 7 negative)
    if scheme == "absmax" and f.signed and symmetric_grid:  # sign symmetry
        qn = jqx.quantize_array(-jnp.asarray(x), fmt, granularity=gran, symmetric_range=sym)
        np.testing.assert_array_equal(np.asarray(qn.values()), -v)
        np.testing.assert_array_equal(np.asarray(qn.scale), np.asarray(q.scale))


@pytest.mark.parametrize("gran", list(GRANS))
@pytest.mark.parametrize("fmt,scheme,sym", CONFIGS)
@settings(max_examples=5)
@given(x=arrays)
def test_properties(fmt, scheme, sym, gran, x):
    _check_properties(x, fmt, scheme, sym, GRANS[gran])


ODD = (5, 7)


@pytest.mark.parametrize("fmt", ["int4", "uint4", "fp4_e2m1", "fp4_e3m0", "nf4"])
@pytest.mark.parametrize("gran", [jqx.per_tensor(), jqx.per_channel(0)])
def test_odd_last_axis_packs_exactly(fmt, gran):
    x = jnp.asarray(np.random.default_rng(3).normal(size=ODD).astype(np.float32))
    scheme = "zero_point" if fmt == "uint4" else "absmax"
    q = jqx.quantize_array(x, fmt, scheme=scheme, granularity=gran)
    assert q.qvalue.shape == (5, 4) and q.qvalue.dtype == jnp.uint8
    ref = (
        jqx.formats.encode(
            (x / _full(q, q.scale)) + (0 if q.zero_point is None else _full(q, q.zero_point)), fmt
        )
        if fmt != "uint4"
        else None
    )
    if ref is not None:
        np.testing.assert_array_equal(np.asarray(q.codes()), np.asarray(ref))
    S = _full(q, q.scale)
    g = np.diff(np.array(F.get(fmt).values)).max()
    assert np.all(np.abs(np.asarray(q.dequantize()) - np.asarray(x)) <= g / 2 * S * (1 + 1e-5))
    # the padding nibble is zero and the size counts half a byte per code, rounded up per row
    assert int(np.asarray(q.qvalue)[:, -1].max()) >> 4 == 0
    n_zp = 0 if q.zero_point is None else q.zero_point.size
    assert q.nbytes == 5 * 4 + (q.scale.size + n_zp) * 4


@pytest.mark.parametrize("fmt,scheme,sym", CONFIGS)
def test_jit_equals_eager(fmt, scheme, sym):
    x = jnp.asarray(np.random.default_rng(0).normal(size=SHAPE).astype(np.float32))
    kw = dict(scheme=scheme, granularity=jqx.per_group(4, axis=0), symmetric_range=sym)
    eager = jqx.quantize_array(x, fmt, **kw)
    jitted = jax.jit(lambda a: jqx.quantize_array(a, fmt, **kw))(x)
    chex.assert_trees_all_equal(jitted, eager)
    chex.assert_trees_all_equal(jax.jit(lambda q: q.dequantize())(eager), eager.dequantize())
    S = _full(eager, eager.scale)
    assert np.all(np.abs(np.asarray(eager.dequantize() - x)) <= S * F.get(fmt).max)


@pytest.mark.parametrize("fmt", ["bf16", "fp16", "fp32"])
def test_wide_floats_are_a_saturating_cast(fmt):
    x = jnp.array([[1.0, -2.5, 1e-3, 70000.0, -1e6, 3.0e38]], jnp.float32)
    q = jqx.quantize_array(x, fmt, granularity=jqx.per_channel(-1))
    f = F.get(fmt)
    assert q.qvalue.dtype == jnp.dtype(f.dtype) and q.scale.shape == (1, 1)
    assert float(q.scale[0, 0]) == 1.0
    ref = np.clip(np.asarray(x), -f.max, f.max).astype(f.dtype).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(q.dequantize()), ref)
    assert np.isfinite(np.asarray(q.dequantize())).all()


# ------------------------------------------------------------------ granularity


@pytest.mark.parametrize(
    "gran,scale_shape",
    [
        (jqx.per_tensor(), (1, 1)),
        (jqx.per_channel(-1), (1, 16)),
        (jqx.per_channel(0), (8, 1)),
        (jqx.per_token(), (8, 1)),
        (jqx.per_group(4, axis=0), (2, 16)),
        (jqx.per_group(8, axis=-1), (8, 2)),
        (jqx.per_group(None, axis=0), (1, 16)),
        (jqx.per_block((4, 8)), (2, 2)),
    ],
)
def test_each_block_gets_its_own_absmax_scale(gran, scale_shape):
    x = np.random.default_rng(1).normal(size=SHAPE).astype(np.float32)
    q = jqx.quantize_array(jnp.asarray(x), "int8", granularity=gran)
    assert q.scale.shape == scale_shape
    bs = q.block
    blocks = x.reshape(scale_shape[0], bs[0], scale_shape[1], bs[1])
    ref = np.abs(blocks).max(axis=(1, 3)) / 127.0
    np.testing.assert_allclose(np.asarray(q.scale), ref, rtol=1e-6)


def test_stacked_layers_keep_their_own_scales():
    x = np.random.default_rng(2).normal(size=(3, 8, 4)).astype(np.float32)
    x[1] *= 100.0
    q = jqx.quantize_array(jnp.asarray(x), "int8", granularity=jqx.per_group(4, axis=-2))
    assert q.scale.shape == (3, 2, 4) and q.block == (1, 4, 1)
    np.testing.assert_allclose(
        np.asarray(q.scale), np.abs(x.reshape(3, 2, 4, 4)).max(axis=2) / 127.0, rtol=1e-6
    )


def test_per_channel_with_several_axes():
    x = np.random.default_rng(2).normal(size=(2, 3, 4)).astype(np.float32)
    q = jqx.quantize_array(jnp.asarray(x), "int8", granularity=jqx.per_channel((0, 2)))
    assert q.scale.shape == (2, 1, 4)
    np.testing.assert_allclose(
        np.asarray(q.scale), np.abs(x).max(axis=1, keepdims=True) / 127, 1e-6
    )


# ------------------------------------------------------------------ golden tests


def test_golden_absmax_int8_half_to_even():
    # S = 127/127 = 1; 63.5 -> 64 and 64.5 -> 64 (ties to even), 0.5 -> 0, -2.5 -> -2
    x = jnp.array([-127.0, 63.5, 64.5, 0.5, -2.5, 1.49], jnp.float32)
    q = jqx.quantize_array(x, "int8")
    assert float(q.scale[0]) == 1.0
    assert q.codes().tolist() == [-127, 64, 64, 0, -2, 1]
    assert q.qvalue.dtype == jnp.int8


def test_golden_absmax_int8_docstring_tensor():
    # S = 2/127; -1/S = -63.5 -> -64; 0.5/S = 31.75 -> 32; 0.25/S = 15.875 -> 16
    q = jqx.quantize_array(jnp.array([[-1.0, 0.5], [0.25, 2.0]]), "int8")
    assert q.codes().tolist() == [[-64, 32], [16, 127]]
    np.testing.assert_allclose(float(q.scale[0, 0]), 2.0 / 127.0, rtol=1e-7)


def test_golden_zero_point_uint4():
    # S = (4 - -1)/15 = 1/3; Z = round(0 - (-1)/S) = 3; q = round(x/S) + Z
    x = jnp.array([-1.0, 0.0, 1.0, 4.0], jnp.float32)
    q = jqx.quantize_array(x, "uint4", scheme="zero_point")
    np.testing.assert_allclose(float(q.scale[0]), 1 / 3, rtol=1e-6)
    assert float(q.zero_point[0]) == 3.0
    assert q.codes().tolist() == [0, 3, 6, 15]
    np.testing.assert_allclose(np.asarray(q.dequantize()), np.asarray(x), atol=1e-6)


def test_golden_zero_point_int8():
    # S = 2/255; Z = round(-128 + 0.5*127.5) = round(-64.25) = -64
    # q(-0.5) = round(-63.75) - 64 = -128; q(1.5) = round(191.25) - 64 = 127;
    # q(0.3) = round(38.25) - 64 = -26; x_hat = (q - Z) * S
    x = jnp.array([-0.5, 1.5, 0.3], jnp.float32)
    q = jqx.quantize_array(x, "int8", scheme="zero_point")
    assert float(q.zero_point[0]) == -64.0
    assert q.codes().tolist() == [-128, 127, -26]
    np.testing.assert_allclose(
        np.asarray(q.dequantize()), np.array([-64, 191, 38]) * 2 / 255, rtol=1e-6
    )


def test_golden_float_formats():
    x = jnp.array([448.0, 1.0, -3.3, 0.0, 0.01], jnp.float32)
    # e4m3: S = 1; 3.3 -> 3.25 (step 0.25 in [2, 4)); 0.01 -> 0.009765625 (2^-10*5)
    q = jqx.quantize_array(x, "fp8_e4m3")
    assert float(q.scale[0]) == 1.0
    assert q.values().tolist() == [448.0, 1.0, -3.25, 0.0, 0.009765625]
    assert q.qvalue.dtype == jnp.float8_e4m3fn
    # e3m0, S = 1: 3 ties 2|4 -> 2 (even code); 6 ties 4|8 -> 8; -12 -> -8; 0.1 -> 0
    q = jqx.quantize_array(jnp.array([16.0, 3.0, 6.0, -12.0, 0.1]), "e3m0")
    assert q.values().tolist() == [16.0, 2.0, 8.0, -8.0, 0.0]
    # e1m2, S = 1: 1.25 ties 1|1.5 -> 1 (code 2); 3.3 -> 3.5
    q = jqx.quantize_array(jnp.array([3.5, 1.25, 3.3, -0.2]), "e1m2")
    assert q.values().tolist() == [3.5, 1.0, 3.5, 0.0]
    # nf4, S = 1: 0.5 -> 0.4407... (code 12), nearer than 0.5626
    q = jqx.quantize_array(jnp.array([1.0, 0.0, -1.0, 0.5]), "nf4")
    assert q.codes().tolist() == [15, 7, 0, 12]
    # e2m1 with S = 12/6 = 2: 5 -> 2.5 ties 2|3 -> 2 -> x_hat 4; -1 -> -0.5 exactly;
    # 0.5 -> 0.25 ties 0|0.5 -> 0
    q = jqx.quantize_array(jnp.array([12.0, 5.0, -1.0, 0.5]), "e2m1")
    assert float(q.scale[0]) == 2.0
    assert q.dequantize().tolist() == [12.0, 4.0, -1.0, 0.0]


# ------------------------------------------------------------------ torchao convention


def test_torchao_symmetric_int8_scale_is_absmax_over_127_5():
    x = jnp.array([-1.0, 0.5, 1.0, -0.3], jnp.float32)
    q = jqx.quantize_array(x, "int8", convention="torchao")
    np.testing.assert_allclose(float(q.scale[0]), 1 / 127.5, rtol=1e-7)
    # +-1/S = +-127.49998 in float32 (not the exact tie 127.5); 0.5/S = 63.75 -> 64;
    # -0.3/S = -38.25 -> -38; codes may use the full [-128, 127]
    s = np.float32(q.scale[0])
    ref = np.clip(np.round(np.asarray(x) / s), -128, 127)
    assert q.codes().tolist() == ref.tolist() == [-127, 64, 127, -38]
    d = np.asarray(q.dequantize())
    assert np.all(np.abs(d - np.asarray(x)) <= float(q.scale[0]) / 2 + 1e-7)
    # the default uses 127, so +-max reconstruct exactly and symmetrically
    qd = jqx.quantize_array(x, "int8")
    assert qd.codes().tolist() == [-127, 64, 127, -38]
    np.testing.assert_array_equal(np.asarray(qd.dequantize())[[0, 2]], [-1.0, 1.0])


def test_torchao_asymmetric_range_includes_zero():
    x = jnp.array([1.0, 2.0, 4.0], jnp.float32)
    t = jqx.quantize_array(x, "uint8", scheme="zero_point", convention="torchao")
    # range widened to [0, 4]: S = 4/255, Z = 0, zero is a code
    np.testing.assert_allclose(float(t.scale[0]), 4 / 255, rtol=1e-6)
    assert float(t.zero_point[0]) == 0.0
    assert np.all(np.abs(np.asarray(t.dequantize() - x)) <= float(t.scale[0]) / 2 + 1e-6)
    # default: S = 3/255, Z = round(0 - 1/S) = -85, outside [0, 255]:
    # finer steps, but 0 is not representable
    d = jqx.quantize_array(x, "uint8", scheme="zero_point")
    np.testing.assert_allclose(float(d.scale[0]), 3 / 255, rtol=1e-6)
    assert float(d.zero_point[0]) == -85.0
    assert float(d.scale[0]) < float(t.scale[0])


@settings(max_examples=10)
@given(x=arrays)
def test_torchao_zero_point_always_within_code_range(x):
    q = jqx.quantize_array(
        jnp.asarray(x),
        "int8",
        scheme="zero_point",
        convention="torchao",
        granularity=jqx.per_channel(0),
    )
    z = np.asarray(q.zero_point)
    assert np.all((z >= -128) & (z <= 127) & (z == np.round(z)))
    S = _full(q, q.scale)
    assert np.all(np.abs(np.asarray(q.dequantize()) - x) <= S / 2 * (1 + 1e-5) + 1e-6 * np.abs(x))


# ------------------------------------------------------------------ scale dtype


def test_bf16_scale_is_rounded_up_so_max_fits():
    x = jnp.asarray(np.random.default_rng(5).normal(size=SHAPE).astype(np.float32))
    q = jqx.quantize_array(x, "int8", granularity=jqx.per_channel(-1), scale_dtype=jnp.bfloat16)
    assert q.scale.dtype == jnp.bfloat16
    S = _full(q, q.scale.astype(jnp.float32))
    assert np.all(S >= np.abs(np.asarray(x)).max(axis=0) / 127)
    assert np.all(np.abs(np.asarray(q.dequantize() - x)) <= S / 2 * (1 + 1e-5))


# ------------------------------------------------------------------ fake quant


@pytest.mark.parametrize(
    "fmt,scheme",
    [("int8", "absmax"), ("uint4", "zero_point"), ("nf4", "absmax"), ("bf16", "absmax")],
)
def test_fake_quant_value_and_straight_through_gradient(fmt, scheme):
    x = jnp.asarray(np.random.default_rng(6).normal(size=SHAPE).astype(np.float32))
    gran = jqx.per_group(4, axis=0)
    y = jqx.fake_quant(x, fmt, scheme=scheme, granularity=gran)
    ref = jqx.quantize_array(x, fmt, scheme=scheme, granularity=gran).dequantize()
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-6, atol=1e-7)
    g = jax.grad(lambda a: jnp.sum(jqx.fake_quant(a, fmt, scheme=scheme, granularity=gran) * 3.0))(
        x
    )
    np.testing.assert_array_equal(np.asarray(g), np.full(SHAPE, 3.0, np.float32))
    yj = jax.jit(lambda a: jqx.fake_quant(a, fmt, scheme=scheme, granularity=gran))(x)
    np.testing.assert_array_equal(np.asarray(yj), np.asarray(y))


# ------------------------------------------------------------------ activations


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3"])
def test_dynamic_per_token_activation_quantizer_under_jit(fmt):
    x = np.random.default_rng(7).normal(size=(2, 3, 16)).astype(np.float32)
    x[0, 1] = 0.0  # an all-zero token gets scale 1
    codes, scale = jax.jit(lambda a: jqx.quantize_activation(a, fmt))(jnp.asarray(x))
    f = F.get(fmt)
    assert codes.dtype == jnp.dtype(f.dtype) and codes.shape == x.shape
    assert scale.shape == (2, 3, 1)
    assert float(scale[0, 1, 0]) == 1.0
    np.testing.assert_allclose(
        np.asarray(scale[1]), np.abs(x[1]).max(-1, keepdims=True) / f.max, rtol=1e-6
    )
    v = np.asarray(codes.astype(jnp.float32))
    err = np.abs(v * np.asarray(scale) - x)
    # int8: S/2; fp8 e4m3 with 3 mantissa bits: relative 2^-4, and the subnormal step
    bound = np.asarray(scale) * (0.5 if fmt == "int8" else np.maximum(np.abs(v) / 16, 2.0**-10))
    assert np.all(err <= bound * (1 + 1e-5))


def test_static_activation_scale_and_per_tensor():
    x = jnp.array([[1.0, -2.0], [0.5, 0.25]], jnp.float32)
    codes, s = jqx.quantize_activation(x, granularity="per_tensor")
    assert s.shape == (1, 1) and codes.tolist() == [[64, -127], [32, 16]]
    codes, s = jqx.quantize_activation(x, scale=jnp.float32(0.01))
    assert codes.tolist() == [[100, -128], [50, 25]]  # saturates at the int8 range


# ------------------------------------------------------------------ bad input (section 6)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_names_the_path(bad):
    x = np.ones(SHAPE, np.float32)
    x[3, 4] = bad
    with pytest.raises(ValueError, match="params/dense/kernel contains NaN or Inf"):
        jqx.quantize_array(jnp.asarray(x), "int8", path="params/dense/kernel")
    with pytest.raises(ValueError, match="the input array contains NaN or Inf.*nan_to_num"):
        jqx.quantize_array(jnp.asarray(x), "nf4")


@pytest.mark.parametrize(
    "fmt,scheme", [(f, s) for f, s, sym in CONFIGS if not sym] + [("uint8", "absmax")]
)
@pytest.mark.parametrize("value", [0.0, 3.7, -0.125, 1e-30, 5e5])
def test_constant_and_all_zero_blocks_reconstruct_exactly(fmt, scheme, value):
    x = jnp.full(SHAPE, value, jnp.float32)
    if F.get(fmt).signed or scheme == "zero_point" or value >= 0:
        q = jqx.quantize_array(x, fmt, scheme=scheme, granularity=jqx.per_group(4, axis=0))
        assert np.isfinite(np.asarray(q.scale)).all() and np.all(np.asarray(q.scale) > 0)
        np.testing.assert_array_equal(np.asarray(q.dequantize()), np.asarray(x))


def test_mixed_constant_and_varying_blocks():
    x = np.random.default_rng(8).normal(size=SHAPE).astype(np.float32)
    x[:4] = 0.0
    x[4:, :3] = 2.5
    q = jqx.quantize_array(jnp.asarray(x), "int4", scheme="absmax", granularity=jqx.per_group(4, 0))
    np.testing.assert_array_equal(np.asarray(q.dequantize())[:4], 0.0)
    np.testing.assert_array_equal(np.asarray(q.scale)[0], 1.0)


def test_extreme_magnitudes_give_finite_scales():
    x = jnp.array([[-3.0e38, 3.0e38, 0.0, 1.0]], jnp.float32)
    q = jqx.quantize_array(x, "int8", scheme="zero_point")
    assert np.isfinite(np.asarray(q.scale)).all()
    err = np.abs(np.asarray(q.dequantize(), np.float64) - np.asarray(x, np.float64))
    assert np.all(err <= float(q.scale[0, 0]) / 2 * (1 + 1e-5))
    # a block of tiny values: the scale stays a normal float32, no division by zero
    t = jnp.array([1.2e-38, -2.0e-38, 3.0e-38], jnp.float32)
    q = jqx.quantize_array(t, "int8")
    assert float(q.scale[0]) >= np.finfo(np.float32).tiny
    assert np.all(np.abs(np.asarray(q.dequantize() - t)) <= float(q.scale[0]) / 2)


# Every weight format with a scale (bf16/fp16/fp32 are plain casts), with its scheme(s).
SCALED = [(n, "absmax") for n in F.names() if not F.get(n).is_wide_float and F.get(n).signed]
SCALED += [(n, "zero_point") for n in F.names() if F.get(n).kind == "int"]
_TINY32 = float(np.finfo(np.float32).tiny)
_MAX32 = float(np.finfo(np.float32).max)


@pytest.mark.parametrize("fmt,scheme", SCALED)
@given(
    log_mag=st.floats(np.log2(_TINY32), np.log2(_MAX32), allow_nan=False),
    seed=st.integers(0, 2**31 - 1),
)
@example(log_mag=float(np.log2(_MAX32)), seed=0)  # the ends, always
@example(log_mag=126.5, seed=1)  # 1 / scale is subnormal for most formats
@example(log_mag=float(np.log2(_TINY32)), seed=2)
def test_any_float32_magnitude_quantizes_within_half_a_step(fmt, scheme, log_mag, seed):
    # A scale near float32's limit used to divide everything to 0 on XLA:CPU.
    f = F.get(fmt)
    mag = min(float(2.0**log_mag), _MAX32)
    u = np.random.default_rng(seed).uniform(-1.0, 1.0, SHAPE)
    u[0] = 1.0  # every group of 4 along axis 0 reaches mag somewhere
    x = np.float32(u * mag)
    q = jqx.quantize_array(jnp.asarray(x), fmt, scheme=scheme, granularity=jqx.per_group(4, 0))
    xh = np.asarray(q.dequantize(), np.float64)
    assert np.isfinite(xh).all(), (fmt, mag)
    blocks = np.abs(x.astype(np.float64)).reshape(2, 4, 16)
    amax = np.repeat(blocks.max(axis=1, keepdims=True), 4, axis=1).reshape(SHAPE)
    gap = float(np.max(np.diff(np.asarray(f.values, np.float64))))
    qmin, qmax = jqx.core.numerics.code_range(f)
    if scheme == "zero_point":
        # half a step from rounding, half from the rounded zero point
        step = np.maximum(2 * amax / (qmax - qmin), _TINY32)
    else:
        step = np.maximum(amax / qmax, _TINY32) * gap / 2
    bound = step * (1 + 1e-5) + amax * 1e-6 + _TINY32  # float32 rounding; flushed subnormals
    err = np.abs(xh - x.astype(np.float64))
    assert np.all(err <= bound), (fmt, mag, float((err / bound).max()))
    assert np.all(np.abs(xh[0]) > 0), (fmt, mag)  # never all zeros


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3", "nf4"])
def test_weights_near_the_float32_limit_are_not_zeroed(fmt):
    w = jnp.full((8, 4), 1e38, jnp.float32).at[0, 1].set(-3e38)
    q = jqx.quantize({"kernel": w}, jqx.RTN(format=fmt))["kernel"]
    np.testing.assert_allclose(np.asarray(q.dequantize()), np.asarray(w), rtol=0.1)


# Under jit a NaN/Inf cannot raise: its block's scale is NaN, and checkify raises.
NOT_FINITE = [
    ("int8", None),
    ("int4", jqx.per_group(4, 0)),
    ("fp8_e4m3", None),
    ("nf4", jqx.per_group(4, 0)),
    ("uint4", jqx.per_group(4, 0)),
    ("bf16", None),
]


@pytest.mark.parametrize("fmt,gran", NOT_FINITE)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_under_jit_makes_its_block_nan(fmt, gran, bad):
    x = np.ones(SHAPE, np.float32)
    x[1, 2] = bad
    scheme = "zero_point" if fmt == "uint4" else "absmax"
    q = jax.jit(lambda w: jqx.quantize_array(w, fmt, scheme=scheme, granularity=gran))(x)
    xh = np.asarray(q.dequantize())
    if gran is None:
        assert np.isnan(xh).all()
    else:  # only the group of 4 rows holding it along axis 0, in its column
        assert np.isnan(xh[:4, 2]).all()
        np.testing.assert_array_equal(np.delete(xh[:4], 2, axis=1), 1.0)
        np.testing.assert_array_equal(xh[4:], 1.0)
    # every matmul output that reads the block is NaN
    y = np.asarray(jax.jit(jqx.quantized(lambda w, a: a @ w))(q, jnp.ones((2, 8), jnp.float32)))
    assert np.isnan(y[:, 2]).all()


@pytest.mark.parametrize("shape", [(384, 384), (384, 1536)])
@pytest.mark.parametrize(
    "recipe",
    [
        jqx.int8_weight_only(),
        jqx.int4_weight_only(group_size=32),
        jqx.int8_dynamic_activation_int8_weight(),
    ],
)
def test_nan_found_where_xla_cpu_max_drops_it(shape, recipe):
    """XLA:CPU's max reduction drops a NaN at real layer sizes (openxla/xla#21461):
    before numerics.nan_max these weights quantized without an error and the NaN
    dequantized to 0 or 1."""
    x = np.ones(shape, np.float32)
    x[5, 3] = np.nan
    params = {"d": {"kernel": jnp.asarray(x)}}
    with pytest.raises(ValueError, match="d/kernel contains NaN or Inf"):
        jqx.quantize(params, recipe, prepack=False)
    q = jax.jit(lambda p: jqx.quantize(p, recipe, prepack=False))(params)
    assert np.isnan(np.asarray(q["d"]["kernel"].dequantize())[5, 3])


@pytest.mark.parametrize("m,k", [(1, 7), (40, 130), (16, 384)])
def test_dynamic_activation_scale_of_a_row_with_nan_is_inf(m, k):
    """A row holding NaN gets scale inf (XLA:CPU's max alone would drop the NaN at
    the larger shapes): its codes are 0 and everything it multiplies is NaN."""
    x = np.ones((m, k), np.float32)
    x[m - 1, k // 2] = np.nan
    codes, s = jax.jit(jqx.quantize_activation)(jnp.asarray(x))
    assert np.isinf(np.asarray(s)[m - 1]).all() and np.isfinite(np.asarray(s)[: m - 1]).all()
    assert (np.asarray(codes)[m - 1] == 0).all()
    q = jqx.int8_dynamic_activation_int8_weight().quantize_weight(jnp.ones((k, 16)))
    y = np.asarray(jax.jit(jqx.quantized(lambda w, a: a @ w))(q, jnp.asarray(x)))
    assert np.isnan(y[m - 1]).all() and np.isfinite(y[: m - 1]).all()


def test_nan_max_and_nan_min():
    x = jnp.asarray(np.where(np.arange(40 * 130).reshape(40, 130) == 7, np.nan, 1.0), jnp.float32)
    assert jax.jit(lambda a: numerics.nan_max(a, axis=1))(x)[0] == np.inf
    assert jax.jit(lambda a: numerics.nan_min(a, axis=1))(x)[0] == -np.inf
    np.testing.assert_array_equal(np.asarray(numerics.nan_max(x, axis=1))[1:], 1.0)
    assert float(numerics.nan_max(jnp.array([-np.inf, -1.0]))) == -1.0


@settings(deadline=None, max_examples=40)
@given(
    x=hnp.arrays(
        np.float32,
        (3, 37),
        elements=st.floats(-(2.0**100), 2.0**100, width=32, allow_nan=False, allow_infinity=False),
    )
)
def test_two_level_scales_make_the_split_exact(x):
    """s1 >= max|x| / 127 with 16 significant bits, s2 = s1 / 256; q1 * s1 and the
    residual are exact, and the split's error is at most s2. (Tiny magnitudes are
    zeroed: XLA:CPU flushes subnormal scales.)"""
    x = np.where(np.abs(x) < 2.0**-60, 0.0, x).astype(np.float32)
    s1, s2 = (np.asarray(a) for a in numerics.two_level_scales(jnp.asarray(x), -1))
    bits = s1.view(np.uint32)
    assert (bits & 0xFF == 0).all()
    amax = np.max(np.abs(x), axis=-1, keepdims=True).astype(np.float64)
    np.testing.assert_array_equal(s2, s1 / 256)
    assert (s1 >= np.where(amax == 0, 1.0, amax / 127 * (1 - 2**-22))).all()
    assert (s1 <= np.where(amax == 0, 1.0, amax / 127 * (1 + 2**-14))).all()
    q1, _ = jqx.quantize_activation(jnp.asarray(x), scale=jnp.asarray(s1))
    q1 = np.asarray(q1, np.float64)
    r = x - (q1 * s1).astype(np.float32)
    np.testing.assert_array_equal(r.astype(np.float64), x.astype(np.float64) - q1 * s1)
    q2, _ = jqx.quantize_activation(jnp.asarray(r), scale=jnp.asarray(s2))
    err = np.abs(x.astype(np.float64) - q1 * s1 - np.asarray(q2, np.float64) * s2)
    assert (err <= s2 * (1 + 1e-6)).all()


@pytest.mark.parametrize("fmt,gran", NOT_FINITE)
def test_checkify_turns_nan_under_jit_into_the_eager_error(fmt, gran):
    from jax.experimental import checkify

    x = np.ones(SHAPE, np.float32)
    x[1, 2] = np.nan
    scheme = "zero_point" if fmt == "uint4" else "absmax"

    def quant(w):
        return jqx.quantize_array(w, fmt, scheme=scheme, granularity=gran, path="a/kernel")

    with pytest.raises(ValueError) as eager:
        quant(jnp.asarray(x))
    f = checkify.checkify(jax.jit(quant), errors=checkify.user_checks)
    err, _ = f(x)
    with pytest.raises(checkify.JaxRuntimeError, match="a/kernel contains NaN or Inf"):
        err.throw()
    assert str(eager.value) in err.get()
    err, _ = f(np.ones(SHAPE, np.float32))
    assert err.get() is None


def test_checkify_names_the_leaf_path_of_a_pytree_under_jit():
    from jax.experimental import checkify

    params = {"dense": {"kernel": jnp.ones(SHAPE).at[0, 0].set(jnp.inf)}}
    recipe = jqx.int4_weight_only(group_size=4)
    with pytest.raises(ValueError, match="dense/kernel contains NaN or Inf"):
        jqx.quantize(params, recipe)
    f = checkify.checkify(jax.jit(lambda p: jqx.quantize(p, recipe)), errors=checkify.user_checks)
    err, q = f(params)
    assert "dense/kernel contains NaN or Inf" in err.get()
    assert np.isnan(np.asarray(q["dense"]["kernel"].scale)[0, 0])
    # plain jit keeps running (the check is dropped): the NaN scale is the signal
    q = jax.jit(lambda p: jqx.quantize(p, recipe))(params)
    assert np.isnan(np.asarray(q["dense"]["kernel"].scale)[0, 0])


@pytest.mark.parametrize("shape", [(0, 4), (4, 0), (0,)])
@pytest.mark.parametrize("recipe", [jqx.int8_weight_only(), jqx.int4_weight_only(group_size=32)])
def test_empty_kernel_says_there_is_nothing_to_quantize(shape, recipe):
    params = {"d": {"kernel": jnp.ones(shape)}}
    with pytest.raises(ValueError, match=r"d/kernel has shape .*size 0.*nothing to quantize") as e:
        jqx.quantize(params, recipe, filter_fn=lambda path, leaf: True)
    assert "filter_fn" in str(e.value) and "divisor" not in str(e.value)


def test_group_size_not_dividing_names_axis_size_and_valid_sizes():
    x = jnp.ones((384, 8), jnp.float32)
    with pytest.raises(ValueError) as e:
        jqx.quantize_array(
            x, "int4", granularity=jqx.per_group(100, axis=-2), path="params/dense/kernel"
        )
    msg = str(e.value)
    assert "group_size=100 does not divide axis 0 of params/dense/kernel (size 384)" in msg
    assert "32, 64, 96, 128" in msg and "group_size=None" in msg
    with pytest.raises(
        ValueError, match=r"group_size=4 does not divide axis 1 \(size 7\).*such as 1, 7"
    ):
        jqx.quantize_array(jnp.ones((2, 7)), "int8", granularity=jqx.per_group(4, axis=1))


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(fmt="int9"), r"format='int9' is not a known format.*Valid names: int8, uint8"),
        (dict(scheme="minmax"), r"scheme='minmax' is not supported; use 'absmax' or 'zero_point'"),
        (dict(convention="bnb"), r"convention='bnb' is not supported; use 'jqx' or 'torchao'"),
        (
            dict(scale_dtype="int8"),
            r"scale_dtype='int8' is not supported; use one of float32, bfloat16",
        ),
        (
            dict(fmt="nf4", scheme="zero_point"),
            r"zero_point' needs an integer format, got format='nf4'",
        ),
        (dict(granularity=jqx.per_channel(2)), r"axis=2 is out of range.*use an axis in \[-2, 1\]"),
        (dict(granularity=jqx.per_block((3, 3))), r"block=\(3, 3\): 3 does not divide axis 0"),
        (dict(granularity=jqx.per_block((4,))), r"block=\(4,\) has 1 dims but the array has shape"),
        (dict(granularity="per_tensor"), r"granularity='per_tensor' is not a jqx.Granularity"),
    ],
)
def test_bad_arguments_list_what_is_accepted(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        jqx.quantize_array(jnp.ones(SHAPE), **kw)


def test_bad_granularity_constructors():
    with pytest.raises(
        ValueError, match=r"group_size=0 must be a positive int \(e.g. 32, 64, 128\) or None"
    ):
        jqx.per_group(0)
    with pytest.raises(
        ValueError, match=r"kind='rows' is not supported; use one of tensor, channel"
    ):
        jqx.Granularity("rows")


def test_non_float_input_is_a_type_error():
    with pytest.raises(
        TypeError, match=r"got dtype=int32 at layer/kernel.*\{'layer/kernel': None\}"
    ):
        jqx.quantize_array(jnp.ones((4, 4), jnp.int32), "int8", path="layer/kernel")
    with pytest.raises(TypeError, match=r"got dtype=int32\. Cast it to a float dtype"):
        jqx.quantize_array(jnp.ones((4, 4), jnp.int32), "int8")


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), zero_block=st.booleans())
def test_quantize_activation_blocks_rounds_like_llama_cpp(seed, zero_block):
    from jqx.core.numerics import quantize_activation_blocks

    x = np.random.default_rng(seed).normal(size=(3, 64)).astype(np.float32)
    if zero_block:
        x[1, 32:] = 0.0
    codes, d = quantize_activation_blocks(jnp.asarray(x), 32)
    xb = x.reshape(3, 2, 32)
    amax = np.abs(xb).max(-1)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    want = np.round(xb * inv[..., None]).reshape(3, 64)  # numpy rounds half to even
    np.testing.assert_array_equal(np.asarray(codes), want)
    np.testing.assert_array_equal(np.asarray(d), (amax / np.float32(127)).astype(np.float16))
    # reconstruction within half a step, plus each code times the float16 rounding of d
    c = np.asarray(codes, np.float32).reshape(3, 2, 32)
    d16 = np.asarray(d, np.float32)[..., None]
    step = (amax / 127)[..., None]
    bound = 0.5 * step + np.abs(c) * np.abs(d16 - step) + 1e-6
    assert (np.abs(c * d16 - xb) <= bound).all()


def _sylvester(n: int) -> np.ndarray:
    """The orthonormal Sylvester Hadamard matrix of order n (a power of two), float64."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


@settings(max_examples=30, deadline=None)
@given(
    d=st.sampled_from([1, 2, 6, 8, 24, 64, 96, 128]),
    seed=st.integers(0, 2**16),
)
def test_hadamard_rotate_is_orthogonal_and_its_own_inverse(d, seed):
    """Block-diagonal Hadamard rotation (blocks of the largest power of two dividing d):
    it keeps dot products and norms, applying it twice gives the input back, and it
    equals the dense matrix product (float64 reference)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, d)).astype(np.float32) * rng.uniform(0.01, 100)
    y = rng.standard_normal((3, d)).astype(np.float32)
    rx, ry = numerics.hadamard_rotate(jnp.asarray(x)), numerics.hadamard_rotate(jnp.asarray(y))
    b = numerics.hadamard_block(d)
    assert b & (b - 1) == 0 and d % b == 0 and (d // b) % 2 == 1
    h = np.kron(np.eye(d // b), _sylvester(b))
    np.testing.assert_allclose(h @ h.T, np.eye(d), atol=1e-6)
    u = 2.0**-23
    scale = np.abs(x).max() * np.sqrt(b)
    np.testing.assert_allclose(rx, x.astype(np.float64) @ h, atol=2 * b * u * scale)
    back = numerics.hadamard_rotate(rx)
    np.testing.assert_allclose(back, x, atol=4 * b * u * scale)
    dots = np.sum(np.asarray(rx, np.float64) * np.asarray(ry, np.float64), axis=-1)
    want = np.sum(x.astype(np.float64) * y, axis=-1)
    np.testing.assert_allclose(dots, want, atol=4 * b * u * scale * np.abs(y).max() * d)
    chex.assert_trees_all_close(
        jnp.linalg.norm(rx, axis=-1), jnp.linalg.norm(jnp.asarray(x), axis=-1), rtol=1e-5
    )


def test_hadamard_bad_input_names_the_argument():
    with pytest.raises(ValueError, match=r"n=0 must be a positive int"):
        numerics.hadamard_block(0)
    # an odd length has no rotation: the input comes back unchanged
    x = jnp.arange(5.0)
    assert numerics.hadamard_rotate(x) is x

"""Number formats: registry facts from ml_dtypes, exact value sets, rounding."""

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jqx.core import formats as F

ALL = [
    "int8",
    "uint8",
    "int4",
    "uint4",
    "fp8_e4m3",
    "fp8_e5m2",
    "fp4_e2m1",
    "fp6_e2m3",  # the microscaling issue's FP6 elements
    "fp6_e3m2",
    "fp4_e1m2",
    "fp4_e3m0",
    "nf4",
    "bf16",
    "fp16",
    "fp32",
]
SMALL = [n for n in ALL if F.get(n).bits <= 8]
ML_FLOAT = {
    "fp8_e4m3": ml_dtypes.float8_e4m3fn,
    "fp8_e5m2": ml_dtypes.float8_e5m2,
    "fp4_e2m1": ml_dtypes.float4_e2m1fn,
    "bf16": ml_dtypes.bfloat16,
    "fp16": np.float16,
    "fp32": np.float32,
}
ML_INT = {"int8": np.int8, "uint8": np.uint8, "int4": ml_dtypes.int4, "uint4": ml_dtypes.uint4}


def test_registry_has_every_format_of_the_issue():
    assert F.names() == ALL


@pytest.mark.parametrize(
    "alias,name",
    [
        ("e4m3", "fp8_e4m3"),
        ("float8_e4m3fn", "fp8_e4m3"),
        ("E5M2", "fp8_e5m2"),
        ("float4_e2m1fn", "fp4_e2m1"),
        ("e1m2", "fp4_e1m2"),
        ("e3m0", "fp4_e3m0"),
        ("bfloat16", "bf16"),
        ("NF4", "nf4"),
        ("s8", "int8"),
    ],
)
def test_aliases(alias, name):
    assert F.get(alias).name == name
    assert F.get(F.get(alias)) is F.get(name)


def test_typo_lists_valid_names():
    with pytest.raises(ValueError, match="format='fp8_e4m4' is not a known format") as e:
        F.get("fp8_e4m4")
    msg = str(e.value)
    assert "Did you mean" in msg and "'fp8_e4m3'" in msg
    for n in ALL:
        assert n in msg


def test_non_string_format_is_a_type_error():
    with pytest.raises(TypeError, match="format must be a str or jqx.formats.Format, got int"):
        F.get(8)


@pytest.mark.parametrize("name", list(ML_FLOAT))
def test_float_limits_come_from_ml_dtypes_finfo(name):
    f, info = F.get(name), ml_dtypes.finfo(ML_FLOAT[name])
    assert f.bits == info.bits
    assert (f.exponent_bits, f.mantissa_bits) == (info.nexp, info.nmant)
    assert f.max == float(info.max) and f.qmin == -float(info.max)
    assert f.smallest_normal == float(info.smallest_normal)
    assert f.smallest_subnormal == float(info.smallest_subnormal)
    assert f.eps == float(info.eps)
    assert f.bias == 1 - info.minexp


@pytest.mark.parametrize("name", list(ML_INT))
def test_int_limits_come_from_ml_dtypes_iinfo(name):
    f, info = F.get(name), ml_dtypes.iinfo(ML_INT[name])
    assert (f.qmin, f.qmax, f.bits) == (info.min, info.max, info.bits)
    assert f.values == tuple(float(v) for v in range(info.min, info.max + 1))


def test_int_formats_expose_both_encodings():
    # two's complement [-2^(n-1), 2^(n-1)-1] and sign-magnitude [-2^(n-1)+1, 2^(n-1)-1]
    assert (F.get("int8").qmin, F.get("int8").qmin_symmetric, F.get("int8").qmax) == (
        -128,
        -127,
        127,
    )
    assert (F.get("int4").qmin, F.get("int4").qmin_symmetric, F.get("int4").qmax) == (-8, -7, 7)
    assert F.get("uint4").qmin_symmetric == 0


@pytest.mark.parametrize("name", [n for n in ML_FLOAT if F.get(n).bits <= 8])
def test_values_of_ml_dtypes_floats_are_all_finite_codes(name):
    dt = ML_FLOAT[name]
    raw = np.arange(2 ** F.get(name).bits, dtype=np.uint8).view(dt).astype(np.float64)
    expect = sorted({float(v) + 0.0 for v in raw if np.isfinite(v)})
    assert list(F.get(name).values) == expect


@pytest.mark.parametrize(
    "name,count,has_inf,has_nan",
    [("fp8_e4m3", 253, False, True), ("fp8_e5m2", 247, True, True), ("fp4_e2m1", 15, False, False)],
)
def test_special_values(name, count, has_inf, has_nan):
    f = F.get(name)
    assert len(f.values) == count
    assert (f.has_inf, f.has_nan) == (has_inf, has_nan)


def test_e1m2_value_set_from_its_bit_split():
    # bias 2^(1-1)-1 = 0; exponent field 0 is subnormal: m/4 * 2^(1-0); else (1+m/4) * 2^(1-0)
    f = F.get("e1m2")
    pos = [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5]
    assert list(f.values) == sorted({-v for v in pos} | set(pos))
    assert (f.bias, f.max, f.smallest_subnormal, f.smallest_normal) == (0, 3.5, 0.5, 2.0)
    assert f.has_subnormals and not f.has_inf and not f.has_nan
    assert f.decode_table[:8] == tuple(pos)
    assert f.decode_table[8:] == tuple(-v for v in pos)


def test_e3m0_value_set_from_its_bit_split():
    # bias 2^(3-1)-1 = 3; no mantissa, so exponent field 0 is zero only: no subnormals
    f = F.get("e3m0")
    pos = [0.0] + [2.0 ** (e - 3) for e in range(1, 8)]
    assert pos == [0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0]
    assert list(f.values) == sorted({-v for v in pos} | set(pos))
    assert (f.bias, f.max, f.smallest_normal, f.smallest_subnormal) == (3, 16.0, 0.25, 0.25)
    assert not f.has_subnormals and not f.has_inf and not f.has_nan


def test_minifloat_derivation_matches_ml_dtypes_e2m1():
    # The same derivation that builds E1M2/E3M0 reproduces ml_dtypes' own E2M1.
    ref = np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float64)
    np.testing.assert_array_equal(F.minifloat_values(2, 1, 1), ref)


def test_nf4_table():
    f = F.get("nf4")
    assert len(f.values) == 16 and f.values[0] == -1.0 and f.values[-1] == 1.0
    assert 0.0 in f.values and f.max == 1.0 and list(f.codes) == list(range(16))


@pytest.mark.parametrize("name", SMALL)
def test_values_sorted_distinct_and_codes_decode_to_them(name):
    f = F.get(name)
    v = np.array(f.values)
    assert np.all(np.diff(v) > 0)
    assert len(f.codes) == len(f.values) == len(set(f.codes))
    raw = np.array(f.codes)
    # float formats store their own dtype: the code is its bit pattern
    stored = raw.astype(np.uint8).view(f.dtype) if f.kind == "float" else raw.astype(f.dtype)
    dec = F.decode(jnp.asarray(stored), f)
    np.testing.assert_array_equal(np.asarray(dec), v.astype(np.float32))
    # encode is the inverse on the grid
    enc = F.encode(jnp.asarray(v, jnp.float32), f)
    np.testing.assert_array_equal(np.asarray(F.decode(enc, f)), v.astype(np.float32))


def _dense_grid(f) -> np.ndarray:
    """Every value, every midpoint (exact ties), the float32 neighbours of each
    midpoint, and a dense linspace over [-max, max]."""
    v = np.array(f.values, np.float64)
    mid = ((v[1:] + v[:-1]) / 2).astype(np.float32)
    return np.concatenate(
        [
            v.astype(np.float32),
            mid,
            np.nextafter(mid, np.float32(np.inf)),
            np.nextafter(mid, np.float32(-np.inf)),
            np.linspace(-f.max, f.max, 100_001, dtype=np.float32),
        ]
    )


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2", "fp4_e2m1"])
def test_cast_equals_ml_dtypes_on_dense_grid_with_ties(name):
    f = F.get(name)
    x = _dense_grid(f)
    ref = x.astype(ML_FLOAT[name]).astype(np.float32)
    got = np.asarray(F.round_to_format(jnp.asarray(x), f))
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_wide_cast_equals_ml_dtypes(name):
    f = F.get(name)
    x = np.random.default_rng(0).standard_normal(4096).astype(np.float32) * 1000.0
    # XLA:CPU flushes float32 subnormals to zero, so bf16 subnormals are left out.
    x = np.concatenate([x, np.float32([f.max, -f.max, f.smallest_normal, 0.0])])
    got = np.asarray(F.round_to_format(jnp.asarray(x), f))
    np.testing.assert_array_equal(got, x.astype(ML_FLOAT[name]).astype(np.float32))


def _nearest_even_reference(x: np.ndarray, f) -> np.ndarray:
    """Brute force: nearest value in exact (float64) arithmetic, ties to the even code."""
    v = np.array(f.values, np.float64)
    codes = np.array(f.codes)
    d = np.abs(x.astype(np.float64)[:, None] - v[None, :])
    best = d.min(axis=1, keepdims=True)
    cand = d == best
    # among tied candidates prefer an even code
    score = cand * (2 + (codes[None, :] % 2 == 0))
    return v[np.argmax(score, axis=1)]


@pytest.mark.parametrize("name", ["fp4_e1m2", "fp4_e3m0", "nf4", "fp4_e2m1"])
def test_table_rounding_is_nearest_ties_to_even(name):
    f = F.get(name)
    x = _dense_grid(f)[:: 7 if len(f.values) > 100 else 1]
    got = np.asarray(F.round_to_format(jnp.asarray(x), f))
    np.testing.assert_array_equal(got, _nearest_even_reference(x, f).astype(np.float32))


def test_e2m1_ties_hand_checked():
    x = jnp.array([2.5, -5.0, 0.25, 0.75, 1.25, 3.5], jnp.float32)
    # 2.5 -> 2 (code 4 even, not 3 code 5); -5 -> -4; 0.25 -> 0; 0.75 -> 1 (code 2);
    # 1.25 -> 1 (code 2 even, not 1.5 code 3); 3.5 -> 4 (code 6 even)
    assert F.round_to_format(x, "e2m1").tolist() == [2.0, -4.0, 0.0, 1.0, 1.0, 4.0]


@pytest.mark.parametrize("name", SMALL + ["bf16", "fp16"])
def test_saturates_never_inf_or_nan(name):
    f = F.get(name)
    f32max = float(np.finfo(np.float32).max)
    above = min(f.max * 1.5, f32max)
    big = jnp.array([above, -above, f32max, -f32max], jnp.float32)
    got = np.asarray(F.round_to_format(big, f))
    lo = f.qmin if f.kind == "int" else -f.max
    np.testing.assert_array_equal(got, np.float32([f.max, lo, f.max, lo]))
    assert np.isfinite(got).all()


finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)


@pytest.mark.parametrize("name", [n for n in SMALL if F.get(n).kind != "int"])
@given(xs=st.lists(finite, min_size=16, max_size=16))
def test_rounding_error_at_most_half_local_gap(name, xs):
    f = F.get(name)
    v = np.array(f.values, np.float64)
    x = np.clip(np.array(xs, np.float32), -f.max, f.max)
    got = np.asarray(F.round_to_format(jnp.asarray(x), f), np.float64)
    assert np.isin(got, v).all()
    hi = np.searchsorted(v, x, side="left").clip(1, len(v) - 1)
    half_gap = (v[hi] - v[hi - 1]) / 2
    assert np.all(np.abs(got - x) <= half_gap)


def test_encode_jit_equals_eager():
    x = jnp.asarray(np.random.default_rng(1).uniform(-8, 8, 257).astype(np.float32))
    for name in SMALL:
        chex.assert_trees_all_equal(jax.jit(F.encode, static_argnums=1)(x, name), F.encode(x, name))


def test_int_encode_rounds_half_to_even_and_clamps():
    x = jnp.array([0.5, 1.5, 2.5, -0.5, -1.5, 200.0, -200.0], jnp.float32)
    assert F.decode(F.encode(x, "int8"), "int8").tolist() == [0, 2, 2, 0, -2, 127, -128]
    assert F.decode(F.encode(x, "int4"), "int4").tolist() == [0, 2, 2, 0, -2, 7, -8]
    assert F.decode(F.encode(x, "uint4"), "uint4").tolist() == [0, 2, 2, 0, 0, 15, 0]
    # int4 codes are two's-complement nibbles in a uint8
    assert F.encode(jnp.array([-1.0, -8.0, 7.0]), "int4").tolist() == [15, 8, 7]


@pytest.mark.parametrize(
    "name,layout",
    [
        ("int8", "S IIIIIII"),
        ("uint4", "IIII"),
        ("fp8_e4m3", "S EEEE MMM"),
        ("fp4_e3m0", "S EEE"),
        ("nf4", "IIII (table index)"),
        ("fp32", "S E8 M23"),
    ],
)
def test_layout(name, layout):
    assert F.get(name).layout() == layout


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2", "fp4_e2m1"])
@given(xs=st.lists(finite, min_size=32, max_size=32), k=st.integers(-12, 8))
def test_cast_equals_ml_dtypes_for_random_in_range_inputs(name, xs, k):
    f = F.get(name)
    x = np.clip(np.float32(xs) * np.float32(2.0**k), -f.max, f.max).astype(np.float32)
    ref = x.astype(ML_FLOAT[name]).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(F.round_to_format(jnp.asarray(x), f)), ref)

"""MX (E8M0 block scales) and NVFP4: numerics against a float reference, bit-exactness
against the compressed-tensors encoders (golden files from tests/golden/mx/make_golden.py),
storage size, NaN/Inf policy, bad input, and the recipes through jqx.quantized."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jqx
from jqx.core import mx
from jqx.core.qarray import unpack_4bit

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "mx")


def _u8(a) -> np.ndarray:
    return np.asarray(jax.lax.bitcast_convert_type(jnp.asarray(a), jnp.uint8))


# --------------------------------------------------------------------------- float reference

_NP_DTYPES = {
    "fp8_e4m3": ml_dtypes.float8_e4m3fn,
    "fp8_e5m2": ml_dtypes.float8_e5m2,
    "fp6_e2m3": ml_dtypes.float6_e2m3fn,
    "fp6_e3m2": ml_dtypes.float6_e3m2fn,
    "fp4_e2m1": ml_dtypes.float4_e2m1fn,
}


def _reference(x: np.ndarray, fmt: str) -> np.ndarray:
    """The OCP spec in float64 numpy: scale 2^(floor(log2 amax) - emax), elements
    rounded to nearest even (ml_dtypes' cast) after saturating."""
    f = jqx.formats.get(fmt)
    xb = x.astype(np.float64).reshape(x.shape[0], -1, 32)
    amax = np.abs(xb).max(-1, keepdims=True)
    emax = 0 if f.kind == "int" else int(np.floor(np.log2(f.max)))
    with np.errstate(divide="ignore"):
        e = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1))) - emax, -127)
    e = np.clip(e, -127, 127)
    y = xb / 2.0**e
    if f.kind == "int":
        v = np.clip(np.round(y * 64), -127, 127) / 64
    else:
        v = np.clip(y, -f.max, f.max).astype(_NP_DTYPES[fmt]).astype(np.float64)
    return (v * 2.0**e).reshape(x.shape)


@pytest.mark.parametrize("fmt", mx.MX_ELEMENTS)
@settings(max_examples=6, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    log_scale=st.floats(-30, 30),
)
def test_mx_matches_float_reference(fmt, seed, log_scale):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((4, 64)) * 2.0**log_scale).astype(np.float32)
    x[1, :32] = 0.0  # a block of zeros
    q = mx.quantize_mx(x, fmt)
    ref = _reference(x, fmt)
    np.testing.assert_array_equal(np.asarray(q.dequantize(), np.float64), ref)
    # The bound the format promises: half a step of the top binade, or saturation.
    err = np.abs(np.asarray(q.dequantize()) - x)
    assert np.all(err <= np.abs(x).reshape(4, 2, 32).max(-1).repeat(32, -1).reshape(4, 64))


def test_scale_modes():
    amax = jnp.array([7.9, 6.0, 1.8, 0.0])
    assert mx.mx_scale_bits(amax, "fp4_e2m1", "floor").tolist() == [127, 127, 125, 0]
    assert mx.mx_scale_bits(amax, "fp4_e2m1", "ceil").tolist() == [128, 128, 126, 0]
    assert mx.mx_scale_bits(amax, "fp4_e2m1", "even").tolist() == [128, 127, 126, 0]
    assert mx.mx_scale_bits(amax, "fp4_e2m1", "rceil").tolist() == [128, 127, 126, 0]
    assert mx.mx_scale_bits(amax, "fp4_e2m1", "ct").tolist() == [128, 127, 126, 0]
    # MXFP8: compressed-tensors rounds with E2M1's mantissa width, torchao's EVEN with E4M3's.
    assert mx.mx_scale_bits(jnp.array([1.8]), "fp8_e4m3", "even").tolist() == [119]
    assert mx.mx_scale_bits(jnp.array([1.8]), "fp8_e4m3", "ct").tolist() == [120]


def test_fake_quant_equals_dequantize():
    x = jax.random.normal(jax.random.key(0), (3, 64)) * 5
    for fmt in mx.MX_ELEMENTS:
        np.testing.assert_array_equal(mx.fake_quant_mx(x, fmt), mx.quantize_mx(x, fmt).dequantize())


# --------------------------------------------------------------------------- golden files


def _codes(packed: np.ndarray, n: int) -> np.ndarray:
    return np.asarray(unpack_4bit(jnp.asarray(packed), n))


def test_mxfp4_bit_exact_with_compressed_tensors():
    d = np.load(os.path.join(GOLDEN, "mxfp4.npz"))
    q = mx.quantize_mx(d["w"], "fp4_e2m1", scale_mode="ct")
    np.testing.assert_array_equal(_u8(q.scale), d["weight_scale"])
    np.testing.assert_array_equal(np.asarray(q.qvalue), d["weight_packed"])


def test_mxfp8_bit_exact_with_compressed_tensors():
    d = np.load(os.path.join(GOLDEN, "mxfp8.npz"))
    q = mx.quantize_mx(d["w"], "fp8_e4m3", scale_mode="ct")
    np.testing.assert_array_equal(_u8(q.scale), d["weight_scale"])
    np.testing.assert_array_equal(_u8(q.qvalue), d["weight"])


@pytest.mark.parametrize("name", ["nvfp4", "nvfp4_rows"])
def test_nvfp4_bit_exact_with_compressed_tensors(name):
    d = np.load(os.path.join(GOLDEN, f"{name}.npz"))
    q = mx.quantize_nvfp4(d["w"])
    np.testing.assert_array_equal(_u8(q.scale), d["weight_scale"])
    np.testing.assert_array_equal(np.asarray(q.qvalue), d["weight_packed"])
    # jqx stores 1 / global_scale: one float32 rounding from the stored value.
    np.testing.assert_allclose(
        1 / np.asarray(q.super_scale).ravel(), d["weight_global_scale"], rtol=3e-7
    )
    # compressed-tensors' dequantization: codes * (scale / global_scale)
    table = np.array(jqx.formats.get("fp4_e2m1").decode_table, np.float32)
    v = table[_codes(d["weight_packed"], d["w"].shape[1])]
    s = d["weight_scale"].view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    ref = v * np.repeat(s / d["weight_global_scale"], 16, axis=1)
    np.testing.assert_allclose(np.asarray(q.dequantize()), ref, rtol=3e-7, atol=0)


# --------------------------------------------------------------------------- storage


def test_nbytes():
    x = jax.random.normal(jax.random.key(1), (64, 128))
    assert mx.quantize_mx(x, "fp4_e2m1").nbytes * 8 / x.size == 4.25
    assert mx.quantize_mx(x, "fp8_e4m3").nbytes * 8 / x.size == 8.25
    q = mx.quantize_nvfp4(x)
    assert (q.nbytes - 4) * 8 / x.size == 4.5
    assert q.scale.dtype == jnp.float8_e4m3fn and q.super_scale.dtype == jnp.float32


# --------------------------------------------------------------------------- NaN / Inf, bad input


def test_nan_inf_policy():
    x = np.ones((2, 64), np.float32)
    x[0, 3] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        mx.quantize_mx(x, "fp4_e2m1", path="w")
    with pytest.raises(ValueError, match="NaN or Inf"):
        mx.quantize_nvfp4(x)
    # Under jit the block's scale is E8M0's NaN (255): NaN reaches that block only.
    q = jax.jit(lambda a: mx._quantize_mx_core(a, "fp4_e2m1", 1, 32, "floor", None, "float32"))(
        jnp.asarray(x)
    )[0]
    assert _u8(q.scale)[0, 0] == 255
    d = np.asarray(q.dequantize())
    assert np.isnan(d[0, :32]).all() and np.isfinite(d[0, 32:]).all() and np.isfinite(d[1]).all()


def test_saturation_never_nan():
    x = np.array([[3.4e38, -3.4e38] + [1.0] * 30], np.float32)
    for fmt in mx.MX_ELEMENTS:
        assert np.isfinite(np.asarray(mx.quantize_mx(x, fmt).dequantize())).all()
    # A calibrated per-tensor amax far below the weight's pushes block scales past
    # E4M3's max: they saturate at 448 (and the elements at 6), never NaN.
    q = mx.quantize_nvfp4(np.full((1, 16), 100.0, np.float32), global_amax=1e-3)
    assert float(q.scale.astype(jnp.float32).max()) == 448.0
    assert np.isfinite(np.asarray(q.dequantize())).all()


def test_bad_input_errors():
    with pytest.raises(ValueError, match="not a multiple of the block 32"):
        mx.quantize_mx(np.ones((2, 48), np.float32), "fp4_e2m1", path="dense/kernel")
    with pytest.raises(ValueError, match="has no MX form"):
        mx.quantize_mx(np.ones((2, 32), np.float32), "nf4")
    with pytest.raises(ValueError, match="scale_mode"):
        jqx.mxfp4_weight_only(scale_mode="nearest")
    with pytest.raises(ValueError, match="layout='nvfp4' stores FP4"):
        jqx.MX(element="fp8_e4m3", layout="nvfp4")


# --------------------------------------------------------------------------- recipes


@pytest.mark.parametrize(
    "recipe, bound",
    [
        (jqx.mxfp4_weight_only(), 0.15),
        (jqx.mxfp8_weight_only(), 0.05),
        (jqx.nvfp4_weight_only(), 0.15),
        (jqx.mx_weight_only("int8"), 0.02),
        (jqx.mx_dynamic_activation_mx_weight("fp4_e2m1"), 0.25),
        (jqx.mx_dynamic_activation_mx_weight("fp8_e4m3"), 0.06),
    ],
    ids=lambda r: getattr(r, "name", ""),
)
def test_recipes_through_quantized(recipe, bound):
    params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (64, 48))}}
    x = jax.random.normal(jax.random.key(1), (5, 64))

    def f(p, x):
        return x @ p["dense"]["kernel"]

    qp = jqx.quantize(params, recipe)
    w = qp["dense"]["kernel"]
    assert isinstance(w, jqx.QArray) and w.block[0] == recipe.block_size
    y = jax.jit(jqx.quantized(f))(qp, x)
    ref = f(params, x)
    assert float(jnp.max(jnp.abs(y - ref)) / jnp.max(jnp.abs(ref))) < bound
    # The emulated block-scaled dot equals its definition (MX values, float32 dot).
    xh = x if recipe.act is None else mx.fake_quant_mx(x, recipe.act_format)
    expect = jnp.dot(xh, w.dequantize(), precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_allclose(np.asarray(y), np.asarray(expect), rtol=1e-5, atol=1e-5)

"""HQQ: never worse than its round-to-nearest start, the accuracy goal, recipes, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jqx
from jqx.core.numerics import encode_int
from jqx.recipes import grid as _grid
from jqx.recipes.hqq import HQQ, hqq_optimize, hqq_quantize, lp_objective, shrink_lp

SHAPE = (256, 64)  # (groups, group_size): one fixed shape for the property test


@given(
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([1e-3, 0.02, 1.0, 30.0]),
    heavy=st.booleans(),
    bits=st.sampled_from([3, 4]),
)
def test_lp_objective_never_worse_than_rtn_start(seed, scale, heavy, bits):
    key = jax.random.key(seed)
    w = (jax.random.t(key, 3.0, SHAPE) if heavy else jax.random.normal(key, SHAPE)) * scale
    grid = _grid.int_grid(bits, False)
    q, s, z, r = hqq_optimize(w, grid, HQQ(bits=bits, round_zero=True, keep_best=True))
    s0, z0 = _grid.group_params(w, grid, axis=1)
    r0 = _grid.dequant(encode_int(w, s0, z0, qmin=grid.qmin, qmax=grid.qmax), s0, z0)
    obj, obj0 = lp_objective(w - r, 0.7), lp_objective(w - r0, 0.7)
    assert bool(jnp.all(obj <= obj0)), float(jnp.max(obj - obj0))
    # codes, scale and zero reproduce the returned reconstruction
    np.testing.assert_allclose(np.asarray((q - z) * s), np.asarray(r), rtol=1e-6, atol=1e-6 * scale)
    assert float(q.min()) >= 0 and float(q.max()) <= grid.qmax


def _hqq_library(w, bits, iters=20, beta=10.0, p=0.7):
    """A numpy port of the hqq library's default (hqq 0.2.8: Quantizer.quantize with
    round_zero=False, optimize_weights_proximal_legacy): groups are rows of w."""
    w = np.asarray(w, np.float64)
    qmax = 2**bits - 1
    mn, mx = w.min(1, keepdims=True), w.max(1, keepdims=True)
    s = (mx - mn) / qmax
    z = -mn / s
    best = np.inf
    for _ in range(iters):
        q = np.clip(np.round(w / s + z), 0, qmax)
        r = (q - z) * s
        e = w - r
        we = np.sign(e) * np.maximum(np.abs(e) - np.abs(e) ** (p - 1) / beta, 0)
        z = np.mean(q - (w - we) / s, axis=1, keepdims=True)
        err = np.mean(np.abs(e))
        if err < best:
            best = err
        else:
            break
    q = np.clip(np.round(w / s + z), 0, qmax)
    return z, (q - z) * s


@given(seed=st.integers(0, 2**31 - 1), bits=st.sampled_from([2, 3, 4, 8]))
def test_default_is_the_hqq_library_optimiser(seed, bits):
    w = jax.random.t(jax.random.key(seed), 4.0, SHAPE) * 0.02
    grid = _grid.int_grid(bits, False)
    z_ref, r_ref = _hqq_library(w, bits)
    _, _, z, r = hqq_optimize(w, grid, HQQ(bits=bits, kappa=1.0))
    # float32 against float64: a code may flip where w / s + z sits on a .5 boundary,
    # which moves that group's zero point by 1 / group size.
    np.testing.assert_allclose(np.asarray(z), z_ref, rtol=1e-5, atol=2.0 / SHAPE[1])
    flips = np.mean(np.abs(np.asarray(r, np.float64) - r_ref) > 1e-6)
    assert flips < 1e-3, flips
    # The paper's beta schedule (kappa=1.01, the default) lands within a hair of it.
    _, _, _, rk = hqq_optimize(w, grid, HQQ(bits=bits))
    e_lib, e_k = np.mean((np.asarray(w) - r_ref) ** 2), float(jnp.mean((w - rk) ** 2))
    assert e_k <= e_lib * 1.01


@pytest.mark.parametrize("bits", [3, 4])
def test_float_zero_start_ends_below_the_rounded_start(bits):
    # The observation: starting from rounded zero points ends with a larger
    # weight error (benchmarks/hqq_vs_library.py compares both with the hqq library).
    w = jax.random.normal(jax.random.key(2), (1024, 64)) * 0.02
    grid = _grid.int_grid(bits, False)
    _, _, _, r = hqq_optimize(w, grid, HQQ(bits=bits))
    _, _, _, rr = hqq_optimize(w, grid, HQQ(bits=bits, round_zero=True))
    assert float(jnp.mean((w - r) ** 2)) < float(jnp.mean((w - rr) ** 2))


def test_zero_iterations_with_round_zero_is_rtn():
    w = jax.random.normal(jax.random.key(0), (128, 32)) * 0.02
    q = hqq_quantize(w, HQQ(group_size=64, iters=0, round_zero=True))
    r = jqx.quantize_array(w, "uint4", scheme="zero_point", granularity=jqx.per_group(64))
    np.testing.assert_array_equal(np.asarray(q.codes()), np.asarray(r.codes()))
    np.testing.assert_array_equal(np.asarray(q.dequantize()), np.asarray(r.dequantize()))


@pytest.mark.parametrize("dist", ["normal", "student_t"])
def test_goal_reconstruction_error_vs_rtn(dist):
    """Issue goal: HQQ 4-bit g64 error at least 4% below RTN on the same grid.

    Measured (1024x512, LLM-like scale 0.02): squared error 0.920x (normal),
    0.921x (Student-t, 4 dof); mean |error| 0.950x; with optimize_scale 0.876x.
    """
    key = jax.random.key(0)
    shape = (1024, 512)
    w = (
        jax.random.normal(key, shape) if dist == "normal" else jax.random.t(key, 4.0, shape)
    ) * 0.02
    r = jqx.quantize_array(w, "uint4", scheme="zero_point", granularity=jqx.per_group(64))
    h = jqx.quantize({"kernel": w}, jqx.hqq(bits=4, group_size=64))["kernel"]
    e_r = float(jnp.sum((w - r.dequantize()) ** 2))
    e_h = float(jnp.sum((w - h.dequantize()) ** 2))
    assert e_h <= 0.96 * e_r, e_h / e_r
    hs = hqq_quantize(w, HQQ(group_size=64, optimize_scale=True))
    assert float(jnp.sum((w - hs.dequantize()) ** 2)) < e_h


def test_int4_weight_only_use_hqq_and_stacked_axes():
    w = jax.random.normal(jax.random.key(1), (2, 128, 32)) * 0.02
    params = {"layers": {"kernel": w}}
    q = jqx.quantize(params, jqx.int4_weight_only(group_size=64, use_hqq=True))["layers"]["kernel"]
    assert q.format == "uint4" and q.block == (1, 64, 1) and q.scale.shape == (2, 2, 32)
    # each stacked layer is its own set of groups
    q0 = hqq_quantize(w[0], HQQ(group_size=64))
    np.testing.assert_allclose(
        np.asarray(q.dequantize()[0]), np.asarray(q0.dequantize()), atol=1e-7
    )
    err = jnp.abs(q.dequantize() - w)
    assert float(jnp.max(err)) <= float(jnp.max(q.scale)) * 1.5
    # groups along the last axis
    q_last = hqq_quantize(w[0], HQQ(group_size=16, axis=-1))
    assert q_last.block == (1, 16) and q_last.scale.shape == (128, 2)
    assert float(jnp.mean(jnp.abs(q_last.dequantize() - w[0]))) < 0.005
    q8 = hqq_quantize(w[0], HQQ(bits=8, group_size=64))
    assert q8.format == "uint8" and float(jnp.max(jnp.abs(q8.dequantize() - w[0]))) < 1e-3


def test_shrink_operator():
    x = jnp.array([-2.0, -0.01, 0.0, 0.01, 2.0])
    got = shrink_lp(x, 10.0, 1.0)
    np.testing.assert_allclose(np.asarray(got), [-1.9, 0.0, 0.0, 0.0, 1.9], atol=1e-6)
    got = shrink_lp(x, 10.0, 0.7)
    with np.errstate(divide="ignore"):
        expect = np.sign(x) * np.maximum(np.abs(x) - np.abs(np.asarray(x)) ** -0.3 / 10.0, 0.0)
    np.testing.assert_allclose(np.asarray(got), np.nan_to_num(expect), atol=1e-6)


def test_bad_input():
    with pytest.raises(ValueError, match=r"bits=5 .*\(2, 3, 4, 8\)"):
        jqx.hqq(bits=5)
    with pytest.raises(ValueError, match="lp_norm"):
        jqx.hqq(lp_norm=1.5)
    with pytest.raises(ValueError, match="group_size=48 does not divide"):
        hqq_quantize(jnp.ones((64, 8)), HQQ(group_size=48))
    with pytest.raises(ValueError, match="axis=2 is out of range"):
        hqq_quantize(jnp.ones((64, 8)), HQQ(axis=2))
    with pytest.raises(ValueError, match="NaN"):
        hqq_quantize(jnp.full((64, 8), jnp.nan), HQQ())

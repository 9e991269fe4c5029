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
    q, s, z, r = hqq_optimize(w, grid, HQQ(bits=bits))
    s0, z0 = _grid.group_params(w, grid, axis=1)
    r0 = _grid.dequant(encode_int(w, s0, z0, qmin=grid.qmin, qmax=grid.qmax), s0, z0)
    obj, obj0 = lp_objective(w - r, 0.7), lp_objective(w - r0, 0.7)
    assert bool(jnp.all(obj <= obj0)), float(jnp.max(obj - obj0))
    # codes, scale and zero reproduce the returned reconstruction
    np.testing.assert_allclose(np.asarray((q - z) * s), np.asarray(r), rtol=1e-6, atol=1e-6 * scale)
    assert float(q.min()) >= 0 and float(q.max()) <= grid.qmax


def test_zero_iterations_is_rtn():
    w = jax.random.normal(jax.random.key(0), (128, 32)) * 0.02
    q = hqq_quantize(w, HQQ(group_size=64, iters=0))
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

"""SmoothQuant: exact identity before quantization, the scale formula, W8A8 accuracy, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jqx
from jqx.calibration.stats import StatsAccumulator
from jqx.recipes.smoothquant import smoothquant_quantize, smoothquant_scales

K, N, M = 256, 64, 256


def _layer(seed=0):
    """Activations with 6 outlier channels (x30), as in the SmoothQuant paper's picture."""
    ks = jax.random.split(jax.random.key(seed), 3)
    w = jax.random.normal(ks[0], (K, N)) * 0.05
    x = jax.random.normal(ks[1], (M, K))
    idx = jax.random.choice(ks[2], K, (6,), replace=False)
    return w, x.at[:, idx].multiply(30.0)


def _w8a8(x, q):
    """Reference W8A8: x / in_scale, per-token int8, int8 weights, both scales."""
    if q.in_scale is not None:
        x = x / q.in_scale[:, 0]
    xc, xs = jqx.quantize_activation(x, "int8", "per_token")
    acc = jax.lax.dot_general(
        xc, q.qvalue, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32
    )
    return acc.astype(jnp.float32) * xs * q.scale.reshape(1, -1)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.85, 1.0])
def test_exact_identity_before_quantization(alpha):
    w, x = _layer()
    s = smoothquant_scales(jnp.max(jnp.abs(x), axis=0), w, alpha)
    y = jnp.matmul(x, w, precision="highest")
    y_s = jnp.matmul(x / s, w * s[:, None], precision="highest")
    np.testing.assert_allclose(np.asarray(y_s), np.asarray(y), rtol=1e-5, atol=1e-5)


def test_scale_formula():
    w, x = _layer(1)
    amax = jnp.max(jnp.abs(x), axis=0)
    s = smoothquant_scales(amax, w, 0.5)
    ref = np.sqrt(np.asarray(amax)) / np.sqrt(np.max(np.abs(np.asarray(w)), axis=1))
    np.testing.assert_allclose(np.asarray(s), ref, rtol=1e-5)
    # dead input channel / zero weight row: s = 1
    s0 = smoothquant_scales(amax.at[3].set(0.0), w.at[7].set(0.0), 0.5)
    assert float(s0[3]) == 1.0 and float(s0[7]) == 1.0


def test_w8a8_accuracy_better_than_plain():
    """Measured: plain W8A8 2.6%, SmoothQuant(0.5) W8A8 0.85% relative output error."""
    w, x = _layer(2)
    y = x @ w
    rel = lambda a: float(jnp.linalg.norm(a - y) / jnp.linalg.norm(y))  # noqa: E731
    plain = jqx.quantize({"kernel": w}, jqx.int8_dynamic_activation_int8_weight(), prepack=False)[
        "kernel"
    ]
    sq = smoothquant_quantize(w, jnp.max(jnp.abs(x), axis=0), 0.5)
    assert sq.act == plain.act and sq.format == "int8" and sq.in_scale.shape == (K, 1)
    # dequantize() undoes the smoothing: each element within half a step of
    # the smoothed grid, divided back by s
    bound = 0.5 * sq.scale.reshape(1, -1) / sq.in_scale
    assert bool(jnp.all(jnp.abs(sq.dequantize() - w) <= bound * (1 + 1e-5) + 1e-7))
    e_plain, e_sq = rel(_w8a8(x, plain)), rel(_w8a8(x, sq))
    assert e_sq < 0.5 * e_plain and e_sq < 0.02, (e_sq, e_plain)


def test_recipe_with_stats_and_calibrate():
    w, x = _layer(3)
    r = jqx.smoothquant(alpha=0.5)
    assert r.needs_calibration and r.stats_needed == ("absmax",) and r.act.kind == "dynamic"
    acc = StatsAccumulator(K, r.stats_needed)
    acc.update(x)
    q = r.quantize_weight(w, path="k", stats=acc.result("k"))
    ref = smoothquant_quantize(w, jnp.max(jnp.abs(x), axis=0), 0.5)
    np.testing.assert_array_equal(np.asarray(q.qvalue), np.asarray(ref.qvalue))
    qc = jqx.calibrate(
        lambda p, xb: xb @ p["kernel"], {"kernel": w}, [x[:128], x[128:]], r, progress=False
    )["kernel"]
    np.testing.assert_allclose(np.asarray(qc.in_scale), np.asarray(ref.in_scale), rtol=1e-6)


def test_bad_input():
    w, x = _layer()
    with pytest.raises(ValueError, match=r"absmax has shape \(128,\).*K=256"):
        smoothquant_scales(jnp.ones(128), w)
    with pytest.raises(ValueError, match="alpha=1.5"):
        jqx.smoothquant(alpha=1.5)
    with pytest.raises(ValueError, match="'absmax'"):
        jqx.smoothquant().quantize_weight(w, path="k", stats=None)

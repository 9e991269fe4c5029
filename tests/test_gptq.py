"""GPTQ: known answers, a direct port of the reference loop, the accuracy goal, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jqx
from jqx.calibration.stats import StatsAccumulator
from jqx.recipes.gptq import GPTQ, gptq_hessian, gptq_quantize
from jqx.recipes.grid import int_grid, rtn_quantize


def _layer(k=256, n=64, m=1024, seed=0, outliers="scattered"):
    """A layer whose inputs are correlated (low-rank mixing plus noise) with 8
    outlier channels (10x), either spread over the input axis or the first 8."""
    ks = jax.random.split(jax.random.key(seed), 4)
    w = jax.random.normal(ks[0], (k, n)) * 0.05
    z = jax.random.normal(ks[1], (m, 64))
    a = jax.random.normal(ks[2], (64, k))
    x = z @ a / 8 + 0.3 * jax.random.normal(ks[3], (m, k))
    if outliers == "scattered":
        idx = jax.random.choice(jax.random.fold_in(ks[0], 1), k, (8,), replace=False)
    else:
        idx = jnp.arange(8)
    x = x.at[:, idx].multiply(10.0)
    return w, x


def _out_err(x, w, q):
    d = x @ w - x @ q.dequantize()
    return float(jnp.sum(d * d))


@pytest.mark.parametrize("sym", [False, True])
def test_identity_hessian_equals_rtn(sym):
    w = jax.random.normal(jax.random.key(1), (64, 32))
    q = gptq_quantize(w, jnp.eye(64), GPTQ(bits=4, group_size=16, sym=sym, block_size=32))
    fmt, scheme = ("int4", "absmax") if sym else ("uint4", "zero_point")
    r = jqx.quantize_array(w, fmt, scheme=scheme, granularity=jqx.per_group(16))
    assert q.format == r.format and q.block == r.block
    np.testing.assert_array_equal(np.asarray(q.codes()), np.asarray(r.codes()))
    np.testing.assert_array_equal(np.asarray(q.scale), np.asarray(r.scale))
    np.testing.assert_allclose(
        np.asarray(q.dequantize()), np.asarray(r.dequantize()), rtol=0, atol=0
    )


@pytest.mark.parametrize("bits", [4, 8])
def test_rtn_baseline_equals_quantize_array(bits):
    w = jax.random.normal(jax.random.key(2), (64, 32))
    r = rtn_quantize(w, bits, 32)
    ref = jqx.quantize_array(
        w, "uint4" if bits == 4 else "uint8", scheme="zero_point", granularity=jqx.per_group(32)
    )
    np.testing.assert_array_equal(np.asarray(r.codes()), np.asarray(ref.codes()))


def _reference_gptq(w, h, bits, g, damp, act_order, static_groups):
    """A direct float64 port of the reference loop (Frantar et al.'s gptq.py,
    one column at a time, no lazy batches) in (K, N) layout."""
    grid = int_grid(bits, False)
    wt = np.array(w, np.float64).T.copy()  # (N, K): rows = outputs, columns = inputs
    h = np.array(h, np.float64).copy()
    k = h.shape[0]
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    wt[:, dead] = 0

    def params(block):
        mx, mn = block.max(1), block.min(1)
        s = (mx - mn) / (grid.qmax - grid.qmin)
        s = np.where(s == 0, np.where(np.abs(mx) > 0, np.abs(mx), 1.0), s)
        return s, np.round(grid.qmin - mn / s)

    groups = [params(wt[:, i : i + g]) for i in range(0, k, g)] if static_groups else None
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    wt, h = wt[:, perm], h[perm][:, perm]
    h = h + damp * np.mean(np.diag(h)) * np.eye(k)
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    q = np.zeros_like(wt)
    s = z = None
    for i in range(k):
        if static_groups:
            s, z = groups[perm[i] // g]
        elif i % g == 0:
            s, z = params(wt[:, i : i + g])
        col = wt[:, i]
        c = np.clip(np.round(col / s) + z, grid.qmin, grid.qmax)
        deq = (c - z) * s
        q[:, i] = deq
        e = (col - deq) / u[i, i]
        wt[:, i:] -= np.outer(e, u[i, i:])
    return q[:, np.argsort(perm)].T


@pytest.mark.parametrize(
    "act_order,static_groups,block",
    [
        (False, False, 16),
        (False, False, 64),
        (True, True, 16),
        (False, True, 32),
        (True, False, 16),
        (True, False, 64),
    ],
)
def test_matches_unblocked_reference(act_order, static_groups, block):
    w, x = _layer(k=64, n=16, m=256, seed=3)
    h = gptq_hessian(x.T @ x, x.shape[0])
    cfg = GPTQ(
        bits=4, group_size=16, act_order=act_order, static_groups=static_groups, block_size=block
    )
    got = np.asarray(gptq_quantize(w, h, cfg).dequantize())
    ref = _reference_gptq(w, h, 4, 16, 0.01, act_order, static_groups)
    # float32 vs float64: a rare rounding flip is allowed, nothing more.
    same = np.isclose(got, ref, rtol=1e-4, atol=1e-6)
    assert same.mean() > 0.99, same.mean()
    xn = np.asarray(x, np.float64)
    e_got = np.sum((xn @ (np.asarray(w) - got)) ** 2)
    e_ref = np.sum((xn @ (np.asarray(w) - ref)) ** 2)
    assert abs(e_got - e_ref) <= 0.02 * e_ref


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_goal_error_vs_rtn_and_act_order(seed):
    """Issue goal: 4-bit g128 output error <= 0.25x RTN with the same grid;
    act_order strictly better.

    Measured ratios (seeds 0/1/2), outlier channels spread over K: plain
    0.198/0.279/0.269, act_order 0.136/0.149/0.143, act_order+static_groups
    0.116/0.124/0.124. With the outliers among the first inputs plain GPTQ is
    already 0.137/0.123/0.138 (act_order 0.132/0.119/0.133). Plain GPTQ misses 0.25 when outliers come late (their errors
    cannot be pushed onto later inputs); act_order is what meets the goal.
    """
    res = {}
    for layout in ("scattered", "front"):
        w, x = _layer(seed=seed, outliers=layout)
        h = gptq_hessian(x.T @ x, x.shape[0])
        e_rtn = _out_err(x, w, rtn_quantize(w, 4, 128))
        for name, cfg in [
            ("plain", GPTQ(bits=4, group_size=128)),
            ("ao", GPTQ(bits=4, group_size=128, act_order=True)),
            ("ao_static", GPTQ(bits=4, group_size=128, act_order=True, static_groups=True)),
        ]:
            res[layout, name] = _out_err(x, w, gptq_quantize(w, h, cfg)) / e_rtn
    assert res["front", "plain"] <= 0.25, res
    assert res["scattered", "plain"] <= 0.3, res
    for layout in ("scattered", "front"):
        assert res[layout, "ao"] <= 0.25 and res[layout, "ao_static"] <= 0.25, res
        assert res[layout, "ao"] < res[layout, "plain"], res
        assert res[layout, "ao_static"] < res[layout, "plain"], res


def test_three_bit_codes_and_accuracy():
    w, x = _layer(k=64, n=16, m=256, seed=4)
    h = gptq_hessian(x.T @ x, x.shape[0])
    q = gptq_quantize(w, h, GPTQ(bits=3, group_size=16))
    assert q.format == "uint4" and int(q.codes().max()) <= 7
    r = rtn_quantize(w, 3, 16)
    assert int(r.codes().max()) <= 7
    assert _out_err(x, w, q) < 0.75 * _out_err(x, w, r)  # measured 0.66
    qs = gptq_quantize(w, h, GPTQ(bits=3, group_size=16, sym=True))
    c = np.asarray(qs.values())
    assert qs.format == "int4" and c.min() >= -4 and c.max() <= 3
    q2 = gptq_quantize(w, h, GPTQ(bits=2, group_size=16))
    assert int(q2.codes().max()) <= 3


def test_per_channel_and_padding_block():
    """group_size=None, K not a multiple of block_size (padded internally)."""
    w, x = _layer(k=96, n=32, m=256, seed=5)
    h = gptq_hessian(x.T @ x, x.shape[0])
    q = gptq_quantize(w, h, GPTQ(bits=4, group_size=None, block_size=64))
    assert q.block == (96, 1) and q.scale.shape == (1, 32)
    q2 = gptq_quantize(w, h, GPTQ(bits=4, group_size=None, block_size=96))
    np.testing.assert_allclose(np.asarray(q.dequantize()), np.asarray(q2.dequantize()), atol=1e-5)
    assert _out_err(x, w, q) < _out_err(x, w, rtn_quantize(w, 4, None))


def test_dead_inputs():
    w, x = _layer(k=64, n=16, m=256, seed=6)
    x = x.at[:, 5].set(0.0)
    h = gptq_hessian(x.T @ x, x.shape[0])
    q = gptq_quantize(w, h, GPTQ(bits=4, group_size=16))
    d = np.asarray(q.dequantize())
    assert np.all(np.isfinite(d)) and np.all(d[5] == 0.0)


def test_recipe_from_streamed_stats_and_calibrate():
    w, x = _layer(k=64, n=16, m=256, seed=7)
    acc = StatsAccumulator(64, jqx.gptq().stats_needed)
    acc.update(x[:100])
    acc.update(x[100:])
    r = jqx.gptq(bits=4, group_size=16)
    assert r.needs_calibration and r.sequential and r.stats_needed == ("xtx",)
    q = r.quantize_weight(w, path="k", stats=acc.result("k"))
    q_direct = gptq_quantize(w, gptq_hessian(x.T @ x, 256), GPTQ(group_size=16))
    np.testing.assert_allclose(
        np.asarray(q.dequantize()), np.asarray(q_direct.dequantize()), atol=1e-5
    )
    with pytest.raises(ValueError, match="calibrat"):
        jqx.quantize({"kernel": w}, r)
    params = {"kernel": w}
    qc = jqx.calibrate(
        lambda p, xb: xb @ p["kernel"], params, [x[:128], x[128:]], r, progress=False
    )["kernel"]
    np.testing.assert_allclose(
        np.asarray(qc.dequantize()), np.asarray(q_direct.dequantize()), atol=1e-5
    )


def test_bad_input():
    w = jnp.ones((64, 16))
    with pytest.raises(ValueError, match=r"Hessian has shape \(32, 32\).*K=64"):
        gptq_quantize(w, jnp.eye(32), GPTQ(group_size=16))
    x = jax.random.normal(jax.random.key(0), (8, 64))  # rank 8 < 64: singular
    with pytest.raises(ValueError, match="not positive definite.*damp"):
        gptq_quantize(
            jax.random.normal(jax.random.key(1), (64, 16)),
            x.T @ x,
            GPTQ(group_size=16, damp=0.0),
        )
    with pytest.raises(ValueError, match=r"bits=5 .*\(2, 3, 4, 8\)"):
        jqx.gptq(bits=5)
    with pytest.raises(ValueError, match="group_size=24 does not divide"):
        gptq_quantize(w, jnp.eye(64), GPTQ(group_size=24))
    with pytest.raises(NotImplementedError, match="only 2-D kernels"):
        gptq_quantize(jnp.ones((2, 64, 16)), jnp.eye(64))
    with pytest.raises(ValueError, match="damp"):
        jqx.gptq(damp=-1.0)
    acc = StatsAccumulator(64, ("xtx",))
    with pytest.raises(ValueError, match="feature size"):
        acc.update(jnp.ones((4, 32)))
    with pytest.raises(ValueError, match="'xtx'"):
        jqx.gptq().quantize_weight(w, path="k", stats=None)


def test_rolled_and_unrolled_block_loops_agree(monkeypatch):
    """Large K runs the block loop as lax.fori_loop with a masked lazy update;
    small K unrolls it. Both give the same result (shape (80, 24) is unique to
    this test, so each path compiles fresh)."""
    import jqx.recipes.gptq as gptq_mod

    w, x = _layer(k=80, n=24, m=256, seed=8)
    h = gptq_hessian(x.T @ x, x.shape[0])
    cfg = GPTQ(bits=4, group_size=16, block_size=32, act_order=True)
    unrolled = gptq_quantize(w, h, cfg).dequantize()
    monkeypatch.setattr(gptq_mod, "_MAX_UNROLLED_BLOCKS", 0)
    rolled = gptq_quantize(
        w, h, GPTQ(bits=4, group_size=16, block_size=32, act_order=True, damp=0.0100001)
    ).dequantize()
    same = np.isclose(np.asarray(unrolled), np.asarray(rolled), rtol=1e-4, atol=1e-6)
    assert same.mean() > 0.99


# --------------------------------------------------------------------------- clip_search

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from jqx.recipes import grid as _grid  # noqa: E402


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _minmax_and_search_errors(w, bits, sym, float_zero=False):
    # Jitted: one compile per grid instead of every primitive dispatched per example.
    grid = int_grid(bits, sym, float_zero=float_zero)

    def err(s, z):
        q = _grid.encode(w, s, z, grid)
        return jnp.sum(jnp.abs(_grid.dequant(q, s, z) - w) ** 2.4, axis=0)

    return err(*_grid.group_params(w, grid, axis=0)), err(
        *_grid.search_group_params(w, grid, axis=0)
    )


@settings(deadline=None, max_examples=30)
@given(
    seed=st.integers(0, 2**16),
    bits=st.sampled_from([2, 3, 4, 8]),
    sym=st.booleans(),
    float_zero=st.booleans(),
)
def test_search_group_params_never_worse_than_minmax(seed, bits, sym, float_zero):
    w = jax.random.t(jax.random.key(seed), 3.0, (32, 8, 6))  # 8 groups of 32 rows
    e_mm, e_cs = _minmax_and_search_errors(w, bits, sym, float_zero)
    assert bool(jnp.all(e_cs <= e_mm * (1 + 1e-6)))
    if bits <= 4:  # heavy tails: clipping pays somewhere
        assert float(jnp.sum(e_cs)) < float(jnp.sum(e_mm))


@pytest.mark.parametrize("seed", [0, 1])
def test_clip_search_lowers_output_error_on_heavy_tailed_weights(seed):
    # Near-isotropic inputs: the per-group weight error is what reaches the
    # output. (With strongly correlated inputs GPTQ's error feedback already
    # absorbs most of the clipping gain; MiniLM measured +0.001 cosine.)
    x = jax.random.normal(jax.random.key(200 + seed), (1024, 256))
    w = jax.random.t(jax.random.key(100 + seed), 3.0, (256, 64)) * 0.05
    h = gptq_hessian(x.T @ x, x.shape[0])
    e0 = _out_err(x, w, gptq_quantize(w, h, GPTQ(group_size=32)))
    e1 = _out_err(x, w, gptq_quantize(w, h, GPTQ(group_size=32, clip_search=True)))
    assert e1 < 0.98 * e0, (e1, e0)  # measured 0.94-0.96 over 3 seeds


def test_clip_search_recipe_and_bad_value():
    r = jqx.gptq(bits=4, group_size=32, clip_search=True)
    assert r.clip_search and "clip_search" in r.name
    with pytest.raises(ValueError, match="clip_search='yes'"):
        GPTQ(clip_search="yes")


# --------------------------------------------------------------------------- float_zero


@settings(deadline=None, max_examples=30)
@given(seed=st.integers(0, 2**16), bits=st.sampled_from([2, 3, 4, 8]))
def test_float_zero_puts_each_group_min_and_max_on_the_end_codes(seed, bits):
    # Unrounded zero point: a group's min decodes to itself (code qmin) and its max
    # (code qmax) to within float32 rounding of the scale; the rounded zero point
    # misses either end by up to half a step.
    w = jax.random.t(jax.random.key(seed), 3.0, (32, 8, 6))
    grid = int_grid(bits, False, float_zero=True)
    s, z = _grid.group_params(w, grid, axis=0)
    q = _grid.encode(w, s, z, grid)
    wh = _grid.dequant(q, s, z)
    lo, hi = jnp.min(w, axis=0), jnp.max(w, axis=0)
    at_lo = jnp.argmin(w, axis=0)[None]
    at_hi = jnp.argmax(w, axis=0)[None]
    tol = 8 * np.finfo(np.float32).eps * (jnp.abs(lo) + jnp.abs(hi))  # float32 rounding
    assert bool(jnp.all(jnp.take_along_axis(q, at_lo, 0)[0] == grid.qmin))
    assert bool(jnp.all(jnp.take_along_axis(q, at_hi, 0)[0] == grid.qmax))
    assert bool(jnp.all(jnp.abs(jnp.take_along_axis(wh, at_lo, 0)[0] - lo) <= tol))
    assert bool(jnp.all(jnp.abs(jnp.take_along_axis(wh, at_hi, 0)[0] - hi) <= tol))
    # Every element within half a step of its value (round to nearest on the grid).
    assert bool(jnp.all(jnp.abs(wh - w) <= 0.5 * s * (1 + 1e-5)))
    assert not bool(jnp.all(z == jnp.round(z)))


def test_float_zero_reproduces_a_min_scale_grid_exactly():
    # Weights already on a Q4_1-style grid (per group: min + d * code, codes 0 and 15
    # both present): GPTQ with float zero points keeps them (the rounded zero cannot).
    k, n, g = 128, 32, 32
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, (k, n)).astype(np.float32)
    codes[0::g], codes[1::g] = 0, 15
    d = rng.uniform(0.01, 0.05, (k // g, 1, n)).astype(np.float32)
    m = rng.uniform(-0.4, -0.1, (k // g, 1, n)).astype(np.float32)
    w = jnp.asarray((m + d * codes.reshape(k // g, g, n)).reshape(k, n))
    x = jax.random.normal(jax.random.key(3), (512, k))
    h = gptq_hessian(x.T @ x, x.shape[0])
    fz = gptq_quantize(w, h, GPTQ(bits=4, group_size=g, float_zero=True)).dequantize()
    rz = gptq_quantize(w, h, GPTQ(bits=4, group_size=g)).dequantize()
    assert float(jnp.max(jnp.abs(fz - w))) < 1e-6
    assert float(jnp.max(jnp.abs(rz - w))) > 1e-3


@pytest.mark.parametrize("seed", [0, 1])
def test_float_zero_lowers_output_error_on_gaussian_weights(seed):
    # Measured 0.92-0.95 of the rounded zero point's output error over 5 seeds (with
    # and without act_order). Not a law: on heavy-tailed t(3) weights it ranged
    # 0.94-1.12 (docs/guide/algorithms.md).
    x = jax.random.normal(jax.random.key(300 + seed), (1024, 256))
    w = jax.random.normal(jax.random.key(400 + seed), (256, 64)) * 0.05
    h = gptq_hessian(x.T @ x, x.shape[0])
    e0 = _out_err(x, w, gptq_quantize(w, h, GPTQ(group_size=32, act_order=True)))
    q = gptq_quantize(w, h, GPTQ(group_size=32, act_order=True, float_zero=True))
    assert _out_err(x, w, q) < 0.97 * e0
    assert q.format == "uint4" and q.zero_point.dtype == jnp.float32
    z = np.asarray(q.zero_point)
    assert not np.array_equal(z, np.round(z))  # the zero points stayed floats


def test_float_zero_lowers_output_error_requantizing_a_min_scale_grid():
    # A Q4_1-style model (groups of 32 on min + d * code) quantized again at group 64,
    # as benchmarks/llm_ptq.py does with SmolLM2's GGUF weights: measured 0.81-0.86.
    k, n = 256, 64
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, (k, n)).astype(np.float32)
    d = rng.uniform(0.01, 0.05, (k // 32, 1, n)).astype(np.float32)
    m = rng.uniform(-0.4, -0.1, (k // 32, 1, n)).astype(np.float32)
    w = jnp.asarray((m + d * codes.reshape(k // 32, 32, n)).reshape(k, n))
    x = jax.random.normal(jax.random.key(300), (1024, k))
    h = gptq_hessian(x.T @ x, x.shape[0])
    e0 = _out_err(x, w, gptq_quantize(w, h, GPTQ(group_size=64)))
    e1 = _out_err(x, w, gptq_quantize(w, h, GPTQ(group_size=64, float_zero=True)))
    assert e1 < 0.92 * e0, (e1, e0)


def test_float_zero_recipe_and_bad_input(tmp_path):
    r = jqx.gptq(bits=4, group_size=32, act_order=True, float_zero=True)
    assert r.float_zero and r.name.endswith("act_order, float_zero)")
    assert r.grid.float_zero and not jqx.gptq().grid.float_zero
    with pytest.raises(ValueError, match="float_zero='yes' must be True or False"):
        GPTQ(float_zero="yes")
    with pytest.raises(ValueError, match="float_zero=True with sym=True.*sym=False"):
        jqx.gptq(float_zero=True, sym=True)
    with pytest.raises(ValueError, match="float_zero=True with mx=.*Drop float_zero"):
        jqx.gptq(float_zero=True, mx=jqx.mxfp4_weight_only())
    # The GPTQ checkpoint format stores integer zero points: the writer refuses these.
    x = jax.random.normal(jax.random.key(0), (256, 64))
    w = jax.random.normal(jax.random.key(1), (64, 32))
    q = gptq_quantize(w, gptq_hessian(x.T @ x, 256), GPTQ(bits=4, group_size=32, float_zero=True))
    with pytest.raises(jqx.io.exchange.ExchangeError, match="integer zero points"):
        jqx.io.exchange.save({"m.weight": jqx.io.exchange.to_out_in(q)}, tmp_path / "o", "gptq")
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_act_order_group_layouts():
    """act_order with dynamic groups: the default ``group_layout="g_idx"`` is the
    reference's order (groups of consecutive rows in activation order, stored with a
    g_idx; matched against the reference loop above); ``"contiguous"`` keeps groups of
    consecutive input rows (no layout extension) and ends above it in output error."""
    w, x = _layer(k=64, n=16, m=256, seed=3)
    h = gptq_hessian(x.T @ x, x.shape[0])
    xn = np.asarray(x, np.float64)

    def err(q):
        return np.sum((xn @ (np.asarray(w) - np.asarray(q.dequantize()))) ** 2)

    gi = gptq_quantize(w, h, GPTQ(bits=4, group_size=16, act_order=True))
    co = gptq_quantize(w, h, GPTQ(bits=4, group_size=16, act_order=True, group_layout="contiguous"))
    assert gi.extensions == ("g_idx",) and co.extensions == ()
    # every group holds group_size rows
    assert np.bincount(np.asarray(gi.g_idx)).tolist() == [16] * 4
    assert err(co) > 1.2 * err(gi)
    assert "group_layout=contiguous" in GPTQ(act_order=True, group_layout="contiguous").name
    with pytest.raises(ValueError, match="group_layout='rows' is not supported"):
        GPTQ(group_layout="rows")


# --------------------------------------------------------------------------- MX grids

import ml_dtypes  # noqa: E402

from jqx.core import formats as _formats  # noqa: E402
from jqx.core.mx import mx_scale_bits  # noqa: E402

_MX = {
    "mxfp4": jqx.mxfp4_weight_only(),
    "mxfp8": jqx.mxfp8_weight_only(),
    "mxfp8_rceil": jqx.mxfp8_weight_only(scale_mode="rceil"),
    "mxfp6_e2m3": jqx.mx_weight_only("fp6_e2m3"),
    "mxfp6_e3m2": jqx.mx_weight_only("fp6_e3m2"),
    "mxint8": jqx.mx_weight_only("int8"),
    "nvfp4": jqx.nvfp4_weight_only(),
}


def _leaves_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb, strict=True))


def _check_on_grid(q, mx):
    """Codes decode to element-grid values; scales are valid E8M0 / E4M3."""
    f = _formats.get(mx.element)
    v = np.asarray(q.values(), np.float64)
    assert np.all(np.abs(v) <= f.max)
    if f.kind == "int":
        assert np.array_equal(v, np.round(v))
    else:
        codes = np.arange(2**f.bits if f.kind == "table" else 256, dtype=np.uint8)
        if f.kind == "float":  # FP8: every finite value of the dtype
            grid = codes.view(np.dtype(f.dtype)).astype(np.float64)
        else:
            grid = np.asarray(_formats.decode(jnp.asarray(codes), f), np.float64)
        assert np.isin(v, grid[np.isfinite(grid)]).all()
    if mx.layout == "nvfp4":
        assert q.scale.dtype == jnp.float8_e4m3fn and q.super_scale.dtype == jnp.float32
        s = np.asarray(q.scale.astype(jnp.float32))
        assert np.all(np.isfinite(s)) and np.all(s > 0) and float(q.super_scale.reshape(())) > 0
    else:
        assert q.scale.dtype == jnp.float8_e8m0fnu
        b = np.asarray(lax_bits(q.scale))
        assert np.all(b != 255)  # 255 is E8M0's NaN


def lax_bits(scale):
    return jax.lax.bitcast_convert_type(scale, jnp.uint8)


@pytest.mark.parametrize("name", list(_MX))
def test_mx_identity_hessian_equals_rtn(name):
    """With H = I nothing couples the rows: GPTQ over an MX grid is the format's own
    round-to-nearest encoder, bit for bit (codes, scales, per-tensor scale, layout)."""
    mx = _MX[name]
    w = jax.random.normal(jax.random.key(11), (128, 24)) * 0.05
    q = gptq_quantize(w, jnp.eye(128), GPTQ(mx=mx))
    ref = mx.quantize_weight(w)
    assert q.format == ref.format and q.block == ref.block and q.nbytes == ref.nbytes
    assert _leaves_equal(q, ref)


def _reference_gptq_mxfp4(w, h, damp=0.01):
    """A float64 port of the unblocked reference loop over MXFP4 (E2M1 elements, E8M0
    block scales by the OCP floor rule from the updated weights at each block's start)."""
    wt = np.array(w, np.float64).T.copy()  # (N, K)
    h = np.array(h, np.float64)
    k = h.shape[0]
    h = h + damp * np.mean(np.diag(h)) * np.eye(k)
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    q = np.zeros_like(wt)
    s = None
    for i in range(k):
        if i % 32 == 0:
            amax = np.abs(wt[:, i : i + 32]).max(1)
            with np.errstate(divide="ignore"):
                e = np.floor(np.log2(np.where(amax > 0, amax, 2.0**-200))) - 2
            s = 2.0 ** np.clip(e, -127, 127)
        col = wt[:, i]
        deq = np.clip(col / s, -6, 6).astype(ml_dtypes.float4_e2m1fn).astype(np.float64) * s
        q[:, i] = deq
        err = (col - deq) / u[i, i]
        wt[:, i:] -= np.outer(err, u[i, i:])
    return q.T


def test_mx_matches_unblocked_reference():
    w, x = _layer(k=128, n=16, m=512, seed=3)
    h = gptq_hessian(x.T @ x, x.shape[0])
    got = np.asarray(gptq_quantize(w, h, GPTQ(mx=_MX["mxfp4"], block_size=64)).dequantize())
    ref = _reference_gptq_mxfp4(w, h)
    same = np.isclose(got, ref, rtol=1e-4, atol=1e-7)
    assert same.mean() > 0.98, same.mean()  # float32 vs float64: rare flips only
    xn = np.asarray(x, np.float64)
    e_got = np.sum((xn @ (np.asarray(w) - got)) ** 2)
    e_ref = np.sum((xn @ (np.asarray(w) - ref)) ** 2)
    assert abs(e_got - e_ref) <= 0.03 * e_ref


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4", "mxfp8", "mxfp8_rceil"])
def test_mx_gptq_beats_rtn_on_correlated_inputs(name):
    """Issue #15: GPTQ-MXFP4's output error below RTN MXFP4's (and the same for NVFP4,
    MXFP8), with every ordering option; codes on the grid, scales valid. The error is
    measured against the float layer ``x @ w``."""
    mx = _MX[name]
    w, x = _layer(seed=0)
    h = gptq_hessian(x.T @ x, x.shape[0])
    e_float = float(jnp.sum((x @ w) ** 2))
    e_rtn = _out_err(x, w, mx.quantize_weight(w))
    assert e_rtn < 0.05 * e_float  # the RTN baseline itself is sane
    for kw in ({}, {"act_order": True}, {"static_groups": True}):
        q = gptq_quantize(w, h, GPTQ(mx=mx, **kw))
        assert q.format == mx.format and q.block == (mx.block_size, 1) and q.g_idx is None
        _check_on_grid(q, mx)
        # measured 0.13-0.23 (seed 0) for every format and option
        assert _out_err(x, w, q) < 0.4 * e_rtn, (kw, _out_err(x, w, q) / e_rtn)


def test_mx_static_groups_keep_the_rtn_scales():
    """static_groups: every block's scale is the format's rule on the original W (RTN's
    scales); dynamic groups take it from the error-updated weights, so some differ."""
    w, x = _layer(k=128, n=32, m=512, seed=2)
    h = gptq_hessian(x.T @ x, x.shape[0])
    for mx in (_MX["mxfp4"], _MX["nvfp4"]):
        rtn = mx.quantize_weight(w)
        st_ = gptq_quantize(w, h, GPTQ(mx=mx, static_groups=True, act_order=True))
        dy = gptq_quantize(w, h, GPTQ(mx=mx))
        np.testing.assert_array_equal(
            np.asarray(lax_bits(st_.scale)), np.asarray(lax_bits(rtn.scale))
        )
        assert not np.array_equal(np.asarray(lax_bits(dy.scale)), np.asarray(lax_bits(rtn.scale)))
    # MX scales follow the recipe's scale_mode
    mx = jqx.mxfp4_weight_only(scale_mode="rceil")
    q = gptq_quantize(w, h, GPTQ(mx=mx, static_groups=True))
    amax = jnp.max(jnp.abs(w.reshape(4, 32, 32)), axis=1)
    np.testing.assert_array_equal(
        np.asarray(lax_bits(q.scale)), np.asarray(mx_scale_bits(amax, "fp4_e2m1", "rceil"))
    )


def test_mx_recipe_calibrate_and_run():
    """jqx.gptq(mx=...) through jqx.calibrate; the result runs wherever quantize_mx's does
    (jqx.quantized), and MX activations are recorded."""
    w, x = _layer(k=64, n=16, m=256, seed=7)
    r = jqx.gptq(mx=jqx.mxfp4_weight_only())
    assert r.format == "fp4_e2m1" and r.needs_calibration and r.act is None
    assert r.name == "gptq(mx(fp4_e2m1, scale_mode=floor))"

    def f(p, xb):
        return xb @ p["kernel"]

    q = jqx.calibrate(f, {"kernel": w}, [x[:128], x[128:]], r, progress=False)["kernel"]
    direct = gptq_quantize(w, gptq_hessian(x.T @ x, 256), GPTQ(mx=jqx.mxfp4_weight_only()))
    np.testing.assert_allclose(
        np.asarray(q.dequantize()), np.asarray(direct.dequantize()), atol=1e-5
    )
    y = jax.jit(jqx.quantized(f))({"kernel": q}, x[:8])
    np.testing.assert_allclose(
        np.asarray(y), np.asarray(x[:8] @ q.dequantize()), rtol=1e-4, atol=1e-4
    )
    w4a4 = jqx.gptq(mx=jqx.mx_dynamic_activation_mx_weight("fp4_e2m1"))
    assert w4a4.act is not None and w4a4.act.granularity == "mx"
    qa = w4a4.quantize_weight(w, stats=type("S", (), {"xtx": x.T @ x, "n": 256})())
    assert qa.act == w4a4.act
    emb = r.for_embedding()
    assert emb.format == "fp4_e2m1" and emb.axis == -1 and not emb.needs_calibration


def test_mx_bad_settings():
    mx = jqx.mxfp4_weight_only()
    with pytest.raises(ValueError, match=r"mx=.*must be an MX recipe.*mxfp4_weight_only"):
        jqx.gptq(mx=jqx.int4_weight_only())
    with pytest.raises(ValueError, match="group_size=64 with mx=.*block \\(32 rows\\)"):
        jqx.gptq(mx=mx, group_size=64)
    with pytest.raises(ValueError, match="bits=3 with mx=.*drop bits"):
        jqx.gptq(mx=mx, bits=3)
    with pytest.raises(ValueError, match="clip_search=True .*not supported with mx"):
        jqx.gptq(mx=mx, clip_search=True)
    with pytest.raises(ValueError, match="axis=-1.*axis -2"):
        jqx.gptq(mx=mx.for_embedding())
    with pytest.raises(ValueError, match="size 48, not a multiple of .* block 32.*Pad K"):
        gptq_quantize(jnp.ones((48, 8)), jnp.eye(48), GPTQ(mx=mx), path="params/d/kernel")
    assert jqx.gptq(mx=mx, group_size=32).mx == mx  # the block size itself is accepted


def test_mx_result_transposes_for_the_llm():
    """LLM.quantize stores (out, in) weights: GPTQ's MX and NVFP4 results transpose
    (NVFP4's per-tensor scale goes with them)."""
    from jqx.llm.ptq import transpose_qarray  # noqa: PLC0415

    w, x = _layer(k=64, n=16, m=256, seed=9)
    h = gptq_hessian(x.T @ x, x.shape[0])
    for mx in (_MX["mxfp4"], _MX["nvfp4"]):
        q = gptq_quantize(w, h, GPTQ(mx=mx))
        t = transpose_qarray(q)
        assert t.shape == (16, 64) and t.block == (1, mx.block_size)
        np.testing.assert_array_equal(np.asarray(t.dequantize()), np.asarray(q.dequantize()).T)

"""GPTQ: known answers, a direct port of the reference loop, the accuracy goal, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jqx
from jqx.calibration.stats import StatsAccumulator
from jqx.core.numerics import encode_int
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


@settings(deadline=None, max_examples=30)
@given(seed=st.integers(0, 2**16), bits=st.sampled_from([2, 3, 4, 8]), sym=st.booleans())
def test_search_group_params_never_worse_than_minmax(seed, bits, sym):
    w = jax.random.t(jax.random.key(seed), 3.0, (32, 8, 6))  # 8 groups of 32 rows
    grid = int_grid(bits, sym)

    def err(s, z):
        q = encode_int(w, s, z, qmin=grid.qmin, qmax=grid.qmax)
        return jnp.sum(jnp.abs(_grid.dequant(q, s, z) - w) ** 2.4, axis=0)

    e_mm = err(*_grid.group_params(w, grid, axis=0))
    e_cs = err(*_grid.search_group_params(w, grid, axis=0))
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

"""jqx.allocate: per-weight sensitivities, the budgeted choice, rules, bad input."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jqx
from jqx.calibration.allocate import choose

N_LAYERS = 8
D = 64


def _params():
    ks = jax.random.split(jax.random.key(0), N_LAYERS + 1)
    p = {}
    for i in range(N_LAYERS):
        w = jax.random.normal(ks[i], (D, D)) / np.sqrt(D)
        if i in (2, 5):  # a few input channels with outliers: these layers are sensitive
            w = w.at[:4].multiply(12.0)
        p[f"l{i}"] = {"kernel": w}
    p["head"] = {"kernel": jax.random.normal(ks[-1], (D, 32)) / np.sqrt(D)}
    return p


def _fn(p, x):
    for i in range(N_LAYERS):
        x = x + jnp.tanh(x @ p[f"l{i}"]["kernel"])
    return 4.0 * x @ p["head"]["kernel"]


def _batches(n=2, seed=1):
    return [jax.random.normal(jax.random.key(seed + i), (64, D)) for i in range(n)]


CANDS = {
    "int4 g32": jqx.int4_weight_only(group_size=32),
    "int4 g64": jqx.int4_weight_only(group_size=64),
    "int8": jqx.int8_weight_only(),
}


def _kl(a, b):
    p, q = jax.nn.log_softmax(a, -1), jax.nn.log_softmax(b, -1)
    return float(jnp.mean(jnp.sum(jnp.exp(p) * (p - q), -1)))


@pytest.fixture(scope="module")
def plan():
    p = _params()
    return jqx.allocate(_fn, p, _batches(), CANDS, budget_bytes=_uniform_bytes(p), progress=False)


def _uniform_bytes(p):
    q = jqx.quantize(p, CANDS["int4 g32"])
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(q, is_leaf=jqx.is_qarray))


def test_rules_apply_and_the_budget_holds(plan):
    p = _params()
    assert len(plan.choice) == N_LAYERS + 1
    assert plan.total_bytes <= plan.budget_bytes
    q = jqx.quantize(p, plan.rules)
    for path, name in plan.choice.items():
        leaf = q[path.split("/")[0]]["kernel"]
        assert leaf.nbytes == plan.nbytes[path][name]
    assert "bits per weight" in plan.table()
    assert sum(plan.counts().values()) == N_LAYERS + 1


def test_same_bytes_as_uniform_int4_has_lower_measured_kl(plan):
    """The sensitive layers get more bits, paid for by groups of 64 elsewhere; the
    whole model's KL (measured, not the additive estimate) is below uniform int4 g32's."""
    p = _params()
    xs = _batches(2, seed=50)  # held-out inputs
    ref = [_fn(p, x) for x in xs]
    uni = jqx.dequantize(jqx.quantize(p, CANDS["int4 g32"]))
    mixed = jqx.dequantize(jqx.quantize(p, plan.rules))
    kl_uni = np.mean([_kl(r, _fn(uni, x)) for r, x in zip(ref, xs, strict=True)])
    kl_mix = np.mean([_kl(r, _fn(mixed, x)) for r, x in zip(ref, xs, strict=True)])
    assert "int8" in (plan.choice["l2/kernel"], plan.choice["l5/kernel"])
    assert kl_mix < kl_uni, (kl_mix, kl_uni)
    b, pred = plan.uniform("int4 g32")
    assert plan.total_bytes <= b and plan.predicted <= pred


def test_bits_per_weight_land_near_the_target():
    p = _params()
    for target in (5.0, 6.0, 7.5):
        plan = jqx.allocate(_fn, p, _batches(1), CANDS, bits_per_weight=target, progress=False)
        # below the target by less than the largest single upgrade step
        step = max(
            8 * (max(b.values()) - min(b.values())) / sum(plan.numel.values())
            for b in plan.nbytes.values()
        )
        assert target - step <= plan.bits_per_weight <= target, (target, plan.bits_per_weight)


def test_choose_matches_brute_force_on_convex_instances():
    """With convex per-weight curves (each upgrade saves less per byte than the one
    before) the greedy is optimal whenever it spends the budget exactly."""
    rng = np.random.default_rng(0)
    for _ in range(30):
        sens, size = {}, {}
        for w in range(4):
            scale = float(rng.uniform(0.1, 10))
            sens[f"w{w}"] = {"a": 4 * scale, "b": 2 * scale, "c": 1 * scale}
            size[f"w{w}"] = {"a": 10, "b": 20, "c": 30}
        budget = int(rng.integers(40, 121)) // 10 * 10
        got = choose(sens, size, budget)
        best = min(
            (
                sum(sens[w][c] for w, c in zip(sens, combo, strict=True))
                for combo in itertools.product("abc", repeat=4)
                if sum(size[w][c] for w, c in zip(sens, combo, strict=True)) <= budget
            ),
        )
        assert sum(size[w][c] for w, c in got.items()) <= budget
        assert sum(sens[w][c] for w, c in got.items()) == pytest.approx(best)


def test_choose_drops_dominated_candidates():
    got = choose({"a": {"x": 1.0, "y": 2.0, "z": 0.5}}, {"a": {"x": 10, "y": 20, "z": 30}}, 25)
    assert got == {"a": "x"}  # y costs more and is worse
    assert choose({"a": {"x": 1.0, "z": 0.5}}, {"a": {"x": 10, "z": 30}}, 100) == {"a": "z"}


def test_mse_metric_and_a_list_of_candidates():
    p = _params()
    plan = jqx.allocate(
        _fn,
        p,
        _batches(1),
        [jqx.int4_weight_only(group_size=32), jqx.int8_weight_only()],
        bits_per_weight=8.5,
        metric="mse",
        progress=False,
    )
    assert set(plan.candidates) == {"int4_weight_only", "int8_weight_only"}
    assert all(c == "int8_weight_only" for c in plan.choice.values())


# ------------------------------------------------------------------ bad input


def test_budget_below_the_smallest_candidate_names_it():
    with pytest.raises(
        ValueError,
        match=r"bits_per_weight=2.0 is below what the smallest candidates need: \d+ bytes, 5\.000 bits",
    ):
        jqx.allocate(_fn, _params(), _batches(1), CANDS, bits_per_weight=2.0, progress=False)


def test_no_batches_is_an_error_that_says_what_works():
    with pytest.raises(ValueError, match="no calibration batches"):
        jqx.allocate(_fn, _params(), [], CANDS, bits_per_weight=5.0, progress=False)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({}, "exactly one budget"),
        ({"bits_per_weight": 4.0, "budget_bytes": 100}, "exactly one budget"),
        ({"bits_per_weight": -1.0}, "bits_per_weight=-1.0 must be a positive"),
        ({"bits_per_weight": 5.0, "metric": "l1"}, "metric='l1' is not supported"),
    ],
)
def test_bad_budget_or_metric(kw, match):
    with pytest.raises(ValueError, match=match):
        jqx.allocate(_fn, _params(), _batches(1), CANDS, progress=False, **kw)


def test_bad_candidates():
    with pytest.raises(ValueError, match="candidates is empty"):
        jqx.allocate(_fn, _params(), _batches(1), {}, bits_per_weight=5.0, progress=False)
    with pytest.raises(TypeError, match=r"candidates\['x'\] must be a jqx recipe"):
        jqx.allocate(_fn, _params(), _batches(1), {"x": "int4"}, bits_per_weight=5.0)
    plan = jqx.allocate(_fn, _params(), _batches(1), CANDS, bits_per_weight=5.0, progress=False)
    with pytest.raises(ValueError, match="name='nope' is not a candidate"):
        plan.uniform("nope")


def test_a_candidate_that_needs_data_is_calibrated_per_weight():
    p = _params()
    xs = _batches(1)
    plan = jqx.allocate(
        _fn,
        p,
        xs,
        {"gptq4": jqx.gptq(bits=4, group_size=32), "rtn4": CANDS["int4 g32"]},
        bits_per_weight=6.5,
        progress=False,
    )
    # GPTQ minimises each layer's output error on these batches: never worse than RTN
    worse = [k for k, s in plan.sensitivity.items() if s["gptq4"] > 1.05 * s["rtn4"]]
    assert len(worse) <= 1, worse
    q = jqx.calibrate(_fn, p, xs, plan.rules, progress=False)
    assert all(jqx.is_qarray(q[k.split("/")[0]]["kernel"]) for k in plan.choice)

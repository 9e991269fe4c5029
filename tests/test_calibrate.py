"""jqx.calibrate and its observers, each checked against a float / numpy reference."""

import dataclasses
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jqx
from jqx.calibration.engine import observe_clip
from jqx.calibration.stats import StatsAccumulator

K, H, N = 16, 32, 8


def _params():
    ka, kb = jax.random.split(jax.random.key(0))
    return {
        "a": {"kernel": jax.random.normal(ka, (K, H)) / 4.0},
        "b": {"kernel": jax.random.normal(kb, (H, N)) / 4.0},
    }


def _mlp(p, x):
    return jax.nn.relu(x @ p["a"]["kernel"]) @ p["b"]["kernel"]


BATCHES = [jax.random.normal(jax.random.key(10 + i), (8, K)) * (1.0 + i) for i in range(3)]


# --------------------------------------------------------------------------- observers


def _acc(batches, need=("hist",)):
    acc = StatsAccumulator(batches[0].shape[-1], need)
    for b in batches:
        acc.update(b)
    return acc.result("w")


def test_minmax_and_ema_observers_match_reference():
    st = _acc(BATCHES, ())
    allx = np.concatenate([np.asarray(b) for b in BATCHES])
    assert observe_clip(st, "minmax") == pytest.approx(np.abs(allx).max(), rel=1e-7)
    mn, mx = float(BATCHES[0].min()), float(BATCHES[0].max())
    for b in BATCHES[1:]:
        mn = 0.9 * mn + 0.1 * float(b.min())
        mx = 0.9 * mx + 0.1 * float(b.max())
    assert observe_clip(st, "ema") == pytest.approx(max(abs(mn), abs(mx)), rel=1e-6)
    assert observe_clip(st, "moving_average_minmax", momentum=0.5) < observe_clip(st, "minmax")


def test_percentile_observer_within_three_bins_of_numpy():
    # The estimate lies in the histogram bin holding the sample of that rank
    # (one bin); growing ranges force re-binning, which moves each count by
    # less than one bin per re-bin, by at most two in total here (widths grow).
    bs = [jax.random.normal(jax.random.key(i), (512, 16)) * (1.0 + 0.5 * i) for i in range(4)]
    st = _acc(bs)
    allx = np.abs(np.concatenate([np.asarray(b) for b in bs]))
    width = allx.max() / 2048
    for p in (50.0, 99.0, 99.99):
        ref = np.percentile(allx, p, method="inverted_cdf")
        assert abs(observe_clip(st, "percentile", percentile=p) - ref) <= 3 * width
    assert observe_clip(st, "percentile", percentile=100.0) == pytest.approx(allx.max(), rel=1e-6)


def _int8_mse(x, c):
    s = c / 127.0
    return float(np.mean((np.clip(np.round(x / s), -127, 127) * s - x) ** 2))


def test_mse_observer_beats_minmax_with_outliers_and_is_near_grid_optimum():
    x = np.array(jax.random.normal(jax.random.key(3), (4096, 16)))
    x[0, :4] = [40.0, -35.0, 30.0, 25.0]  # a few outliers stretch min/max
    st = _acc([jnp.asarray(x)])
    c_mse = observe_clip(st, "mse")
    c_max = observe_clip(st, "minmax")
    assert c_mse < c_max
    grid = np.linspace(0.5, 40.0, 400)
    best = min(_int8_mse(x, c) for c in grid)
    assert _int8_mse(x, c_mse) <= 1.10 * best
    assert _int8_mse(x, c_mse) < 0.85 * _int8_mse(x, c_max)


def test_observer_bad_input():
    st = _acc(BATCHES, ())
    with pytest.raises(ValueError, match="observer='median'.*minmax"):
        observe_clip(st, "median")
    with pytest.raises(ValueError, match="histogram"):
        observe_clip(st, "percentile")
    with pytest.raises(ValueError, match="percentile=0"):
        observe_clip(_acc(BATCHES), "percentile", percentile=0)


# --------------------------------------------------------------------------- calibrate


def test_static_scales_are_max_input_over_batches():
    p = _params()
    q = jqx.calibrate(_mlp, p, BATCHES, jqx.int8_static_activation_int8_weight(), progress=False)
    xa = np.concatenate([np.asarray(b) for b in BATCHES])
    xb = np.asarray(jax.nn.relu(jnp.asarray(xa) @ p["a"]["kernel"]))
    for name, x in (("a", xa), ("b", xb)):
        qa = q[name]["kernel"]
        assert qa.act.kind == "static" and qa.act_scale.dtype == jnp.float32
        assert qa.act_scale.shape == (1,)
        np.testing.assert_allclose(float(qa.act_scale[0]), np.abs(x).max() / 127.0, rtol=1e-6)
        # The weights themselves are the plain int8 per-channel weights.
        ref = jqx.int8_static_activation_int8_weight().quantize_weight(p[name]["kernel"])
        np.testing.assert_array_equal(np.asarray(qa.codes()), np.asarray(ref.codes()))  # any layout


def test_calibrated_model_output_within_static_quantization_bound():
    p = {"a": _params()["a"]}
    fn = lambda p, x: x @ p["a"]["kernel"]  # noqa: E731
    q = jqx.calibrate(fn, p, BATCHES, jqx.int8_static_activation_int8_weight(), progress=False)
    x = BATCHES[1]
    y = jax.jit(jqx.quantized(fn))(q, x)
    w_hat = q["a"]["kernel"].dequantize()
    s = float(q["a"]["kernel"].act_scale[0])
    # x is within the calibrated range: |x - x_hat| <= s/2 per element.
    tol = s / 2 * jnp.sum(jnp.abs(w_hat), axis=0) + 1e-4 * (jnp.abs(x) @ jnp.abs(w_hat)) + 1e-5
    assert bool(jnp.all(jnp.abs(y - x @ w_hat) <= tol))


def test_batches_as_tuples_generators_and_argnum():
    p = _params()

    def fn(x, scale, params):
        return _mlp(params, x * scale)

    gen = ((b, jnp.float32(2.0)) for b in BATCHES)
    q = jqx.calibrate(
        fn, p, gen, jqx.int8_static_activation_int8_weight(), argnum=2, progress=False
    )
    xa = np.concatenate([np.asarray(b) for b in BATCHES]) * 2.0
    np.testing.assert_allclose(
        float(q["a"]["kernel"].act_scale[0]), np.abs(xa).max() / 127, rtol=1e-6
    )


def test_weight_only_recipe_through_calibrate_equals_quantize():
    p = _params()
    q1 = jqx.calibrate(_mlp, p, BATCHES, jqx.int4_weight_only(group_size=8), progress=False)
    q2 = jqx.quantize(p, jqx.int4_weight_only(group_size=8))
    for name in ("a", "b"):
        np.testing.assert_array_equal(
            np.asarray(q1[name]["kernel"].dequantize()), np.asarray(q2[name]["kernel"].dequantize())
        )


def test_rules_mix_and_unmatched_rule_is_reported():
    p = _params()
    rules = {
        "a/kernel": jqx.int8_static_activation_int8_weight(),
        "b/kernel": jqx.int8_weight_only(),
        "nothing/here": jqx.int8_weight_only(),
    }
    with pytest.warns(UserWarning, match="nothing/here"):
        q = jqx.calibrate(_mlp, p, BATCHES, rules, progress=False)
    assert q["a"]["kernel"].act_scale is not None and q["b"]["kernel"].act_scale is None


def test_no_batches_is_a_clear_error():
    with pytest.raises(ValueError, match="no calibration batches"):
        jqx.calibrate(_mlp, _params(), [], jqx.int8_static_activation_int8_weight(), progress=False)
    with pytest.raises(ValueError, match="no calibration batches"):
        jqx.calibrate(_mlp, _params(), iter([]), jqx.int8_weight_only(), progress=False)


@pytest.mark.parametrize("rows", [4, 64])
def test_nan_in_calibration_activations_names_batch_and_layer(rows):
    """A NaN among the activations a weight reads is an error naming the batch and the
    layer, at every size (XLA:CPU's own max drops a NaN from 16 rows of 384 on)."""
    params = {"d": {"kernel": jnp.ones((384, 8))}}
    x = np.ones((rows, 384), np.float32)
    x[rows - 1, 200] = np.nan

    def fn(p, a):
        return a @ p["d"]["kernel"]

    with pytest.raises(ValueError, match=r"batch 0: the input of d/kernel contains NaN or Inf"):
        jqx.calibrate(
            fn, params, [jnp.asarray(x)], jqx.int8_static_activation_int8_weight(), progress=False
        )
    acc = StatsAccumulator(384, ())
    with pytest.raises(ValueError, match="calibration activations contain NaN or Inf"):
        acc.update(jnp.asarray(x))


def test_mismatched_batch_names_the_layer():
    bad = jnp.ones((8, K + 3))
    with pytest.raises(ValueError, match=r"batch 0.*a/kernel \(input size 16\)"):
        jqx.calibrate(
            _mlp, _params(), [bad], jqx.int8_static_activation_int8_weight(), progress=False
        )
    with pytest.raises(ValueError, match=r"batch 1.*first quantized layer is a/kernel"):
        jqx.calibrate(
            _mlp,
            _params(),
            [BATCHES[0], bad],
            jqx.int8_static_activation_int8_weight(),
            progress=False,
        )


def test_static_weight_unused_by_fn_is_an_error():
    p = _params()
    with pytest.raises(ValueError, match="b/kernel.*no calibration rows"):
        jqx.calibrate(
            lambda p, x: x @ p["a"]["kernel"],
            p,
            BATCHES,
            jqx.int8_static_activation_int8_weight(),
            progress=False,
        )


def test_progress_bar_shows_and_can_be_silenced(capsys):
    jqx.calibrate(_mlp, _params(), BATCHES, jqx.int8_weight_only(), progress=True)
    assert "calibrate" in capsys.readouterr().err
    jqx.calibrate(_mlp, _params(), BATCHES, jqx.int8_weight_only(), progress=False)
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------- sequential and scan


@dataclasses.dataclass(frozen=True, kw_only=True)
class _SeqRecorder(jqx.RTN):
    """A sequential recipe (like GPTQ) that keeps the X^T X it was given."""

    seen: list = dataclasses.field(default_factory=list, compare=False, hash=False)

    @property
    def sequential(self):
        return True

    @property
    def stats_needed(self):
        return ("xtx",)

    def quantize_weight(self, w, path=None, stats=None):
        self.seen.append((path, stats))
        return super().quantize_weight(w, path=path, stats=stats)


def test_sequential_recipe_sees_earlier_layers_quantized():
    p = _params()
    r = _SeqRecorder(format="int4", group_size=8)
    q = jqx.calibrate(_mlp, p, BATCHES, r, progress=False)
    assert [path for path, _ in r.seen] == ["a/kernel", "b/kernel"]
    xa = jnp.concatenate(BATCHES)
    np.testing.assert_allclose(r.seen[0][1].xtx, xa.T @ xa, rtol=1e-5, atol=1e-3)
    # Layer b's statistics come from layer a's *quantized* output ...
    hq = jax.nn.relu(xa @ q["a"]["kernel"].dequantize())
    np.testing.assert_allclose(r.seen[1][1].xtx, hq.T @ hq, rtol=1e-5, atol=1e-3)
    # ... which differs measurably from the float one (int4 g8 error).
    hf = jax.nn.relu(xa @ p["a"]["kernel"])
    assert float(jnp.max(jnp.abs(r.seen[1][1].xtx - hf.T @ hf))) > 1e-2


def test_sequential_order_is_the_forward_order_not_the_alphabetical_one():
    """Layers are calibrated in the order the model first uses them (jit hands
    the records back with sorted keys; "layer_10" sorts before "layer_2")."""
    names = ["layer_2", "layer_10", "b", "a"]  # forward order, far from sorted
    keys = jax.random.split(jax.random.key(3), len(names))
    p = {
        n: {"kernel": jax.random.normal(kk, (K, K)) / 4.0}
        for n, kk in zip(names, keys, strict=True)
    }

    def fn(pp, x):
        for n in names:
            x = jnp.tanh(x @ pp[n]["kernel"])
        return x

    r = _SeqRecorder(format="int4", group_size=8)
    jqx.calibrate(fn, p, BATCHES, r, progress=False)
    assert [path for path, _ in r.seen] == [f"{n}/kernel" for n in names]


def test_gptq_through_calibrate_beats_round_to_nearest():
    """The library's GPTQ recipe (sequential, X^T X) run by calibrate: lower output
    error on the calibration data than round-to-nearest at the same format."""
    k1, k2 = jax.random.split(jax.random.key(7))
    p = {
        "a": {"kernel": jax.random.normal(k1, (64, 64)) / 8},
        "b": {"kernel": jax.random.normal(k2, (64, 16)) / 8},
    }
    xs = [jax.random.normal(jax.random.key(20 + i), (64, 64)) for i in range(2)]
    x = jnp.concatenate(xs)
    y = _mlp(p, x)

    def rel_err(q):
        return float(jnp.mean((jqx.quantized(_mlp)(q, x) - y) ** 2) / jnp.mean(y**2))

    q_gptq = jqx.calibrate(_mlp, p, xs, jqx.gptq(bits=4, group_size=32), progress=False)
    q_rtn = jqx.quantize(p, jqx.int4_weight_only(group_size=32))
    assert jqx.is_qarray(q_gptq["a"]["kernel"]) and jqx.is_qarray(q_gptq["b"]["kernel"])
    assert rel_err(q_gptq) < 0.9 * rel_err(q_rtn)
    assert rel_err(q_gptq) < 0.05


def _attn_like(p, x, calls=None):
    """q/k/v read one input (h); o reads their mix. ``calls`` counts executions."""
    if calls is not None:
        jax.debug.callback(lambda: calls.append(1))
    h = jnp.tanh(x @ p["in"]["kernel"])
    q, k, v = (h @ p[n]["kernel"] for n in ("q", "k", "v"))
    return (jnp.tanh(q) * k + v) @ p["o"]["kernel"]


def test_sequential_weights_sharing_an_input_share_one_pass(monkeypatch):
    """GPTQ through calibrate: query/key/value read the same input, so they are
    calibrated after one statistics pass (3 passes in all instead of 5), with
    results identical to one pass per weight."""
    keys = jax.random.split(jax.random.key(9), 5)
    p = {
        n: {"kernel": jax.random.normal(kk, (K if n == "in" else H, H)) / 4.0}
        for n, kk in zip(("in", "q", "k", "v", "o"), keys, strict=True)
    }

    def run():
        calls = []
        q = jqx.calibrate(
            lambda pp, x: _attn_like(pp, x, calls),
            p,
            BATCHES,
            jqx.gptq(bits=4, group_size=8),
            progress=False,
        )
        return q, len(calls) // len(BATCHES)

    grouped, passes = run()
    assert passes == 3  # all weights; then q/k/v together; then o
    monkeypatch.setattr(sys.modules["jqx.calibration.engine"], "_GROUP_SHARED_INPUTS", False)
    single, passes_single = run()
    assert passes_single == 5
    for n in p:
        a, b = grouped[n]["kernel"], single[n]["kernel"]
        np.testing.assert_array_equal(np.asarray(a.qvalue), np.asarray(b.qvalue))
        np.testing.assert_array_equal(np.asarray(a.scale), np.asarray(b.scale))
        np.testing.assert_array_equal(np.asarray(a.zero_point), np.asarray(b.zero_point))


def _scan_fn(p, x):
    def step(h, w):
        return jnp.tanh(h @ w), None

    h, _ = jax.lax.scan(step, x @ p["embed"]["kernel"], p["layers"]["kernel"])
    return h


def _scan_params(n_layers: int, seed: int):
    ke, kl = jax.random.split(jax.random.key(seed))
    return {
        "embed": {"kernel": jax.random.normal(ke, (K, H)) / 4.0},
        "layers": {"kernel": jax.random.normal(kl, (n_layers, H, H)) / 4.0},
    }


def test_scanned_stacked_weight_gets_per_slice_static_scales():
    L = 3
    p = _scan_params(L, 5)
    q = jqx.calibrate(
        _scan_fn, p, BATCHES, jqx.int8_static_activation_int8_weight(), progress=False
    )
    ql = q["layers"]["kernel"]
    assert ql.shape == (L, H, H) and ql.act_scale.shape == (L, 1)
    h = jnp.concatenate(BATCHES) @ p["embed"]["kernel"]
    for i in range(L):
        np.testing.assert_allclose(
            float(ql.act_scale[i, 0]), float(jnp.max(jnp.abs(h))) / 127, rtol=1e-5
        )
        h = jnp.tanh(h @ p["layers"]["kernel"][i])
    # Each slice keeps its own weight scales: same as quantizing the stack directly.
    ref = jqx.int8_weight_only().quantize_weight(p["layers"]["kernel"])
    np.testing.assert_allclose(
        np.asarray(ql.dequantize()), np.asarray(ref.dequantize()), rtol=0, atol=1e-7
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = jax.jit(jqx.quantized(_scan_fn))(q, BATCHES[0])
    assert y.shape == (8, H)


def test_sequential_recipe_on_a_scanned_stack_falls_back_to_one_pass():
    L = 2
    p = _scan_params(L, 6)
    with pytest.warns(UserWarning, match="layers/kernel is a stacked weight used inside scan"):
        q = jqx.calibrate(_scan_fn, p, BATCHES, jqx.gptq(bits=8, group_size=None), progress=False)
    ql = q["layers"]["kernel"]
    assert ql.shape == (L, H, H)
    y_ref = _scan_fn(p, BATCHES[0])
    y = jqx.quantized(_scan_fn)(q, BATCHES[0])
    # 8-bit GPTQ: outputs within 2% of the float model's scale.
    assert float(jnp.max(jnp.abs(y - y_ref))) <= 0.02 * float(jnp.max(jnp.abs(y_ref)))


# --------------------------------------------------------------------------- row_mask (padding)

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(deadline=None, max_examples=25)
@given(
    rows=st.integers(1, 12),
    seed=st.integers(0, 2**16),
    keep=st.lists(st.booleans(), min_size=12, max_size=12),
)
def test_masked_update_equals_update_on_kept_rows(rows, seed, keep):
    x = jax.random.normal(jax.random.key(seed), (rows, 4)) * 3.0
    m = np.asarray(keep[:rows])
    need = ("xtx", "absmax", "mean_abs", "hist")
    a = StatsAccumulator(4, need)
    a.update(x, mask=m)
    if not m.any():
        assert a.n == 0
        with pytest.raises(ValueError, match="no calibration rows"):
            a.result("w")
        return
    b = StatsAccumulator(4, need)
    b.update(x[np.flatnonzero(m)])
    ra, rb = a.result("w"), b.result("w")
    assert (ra.n, ra.min, ra.max) == (rb.n, rb.min, rb.max)
    for f in ("xtx", "absmax", "mean_abs", "hist"):
        np.testing.assert_allclose(np.asarray(getattr(ra, f)), np.asarray(getattr(rb, f)))


def _seq_model(p, x, mask):
    # A token model: (batch, seq, K) -> (batch, N); padded rows carry large junk.
    h = jax.nn.relu(x @ p["a"]["kernel"]) @ p["b"]["kernel"]
    return jnp.sum(h * mask[..., None].astype(h.dtype), axis=1)


def _padded_batches():
    """Two (batch, seq=6, K) batches whose padding rows are 50x larger junk,
    and the same real rows without padding."""
    out, real = [], []
    for i, lens in enumerate(([6, 2, 4], [3, 5, 1])):
        x = jax.random.normal(jax.random.key(30 + i), (3, 6, K))
        mask = (np.arange(6)[None] < np.asarray(lens)[:, None]).astype(np.int32)
        x = jnp.where(jnp.asarray(mask)[..., None] > 0, x, 50.0)
        out.append((x, jnp.asarray(mask)))
        real.append(jnp.concatenate([x[r, :n] for r, n in enumerate(lens)])[None])
    return out, real


def test_row_mask_leaves_padding_out_of_static_scales_and_gptq():
    p = _params()
    padded, real = _padded_batches()
    unpadded = [(x, jnp.ones(x.shape[:2], jnp.int32)) for x in real]
    rm = lambda x, mask: mask  # noqa: E731
    for recipe in (jqx.int8_static_activation_int8_weight(), jqx.gptq(bits=4, group_size=8)):
        q_mask = jqx.calibrate(_seq_model, p, padded, recipe, progress=False, row_mask=rm)
        q_real = jqx.calibrate(_seq_model, p, unpadded, recipe, progress=False)
        q_junk = jqx.calibrate(_seq_model, p, padded, recipe, progress=False)
        for name in ("a", "b"):
            qm, qr, qj = (t[name]["kernel"] for t in (q_mask, q_real, q_junk))
            if recipe.act is not None:
                np.testing.assert_allclose(qm.act_scale, qr.act_scale, rtol=1e-6)
                assert float(qj.act_scale[0]) > 10 * float(qr.act_scale[0])  # junk counted
            else:
                np.testing.assert_allclose(qm.dequantize(), qr.dequantize(), rtol=1e-5, atol=1e-6)
                assert not np.allclose(qj.dequantize(), qr.dequantize(), atol=1e-3)


def test_row_mask_bad_values_and_unmatched_shape():
    padded, _ = _padded_batches()

    def cal(row_mask):
        jqx.calibrate(
            _seq_model, _params(), padded, jqx.int8_weight_only(), progress=False, row_mask=row_mask
        )

    with pytest.raises(ValueError, match=r"row_mask returned .* values other than 0/1"):
        cal(lambda x, mask: mask * 2)
    with pytest.warns(UserWarning, match="no row was left out"):
        cal(lambda x, mask: mask[:, :3])

"""jqx.mixed_precision: policies, loss scaling, step skipping, resumption."""

import io

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jqx
from jqx import mixed_precision as mp

# A small two-layer MLP computed in float16: big inputs make the scaled
# float16 backward pass overflow, small ones keep it finite.
D_IN, D_H, B = 8, 16, 4
POLICY_F16 = mp.get_policy("params=float32,compute=float16,output=float32")


def init_params(seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {
        "l1": {
            "kernel": jax.random.normal(k1, (D_IN, D_H), jnp.float32) * 0.3,
            "bias": jnp.zeros((D_H,), jnp.float32),
        },
        "l2": {
            "kernel": jax.random.normal(k2, (D_H, 1), jnp.float32) * 0.3,
            "bias": jnp.zeros((1,), jnp.float32),
        },
    }


def forward(p, x):
    h = jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"])
    return h @ p["l2"]["kernel"] + p["l2"]["bias"]


def make_loss(policy):
    fwd = policy.apply(forward)

    def loss_fn(params, x, y):
        return jnp.mean(jnp.square(fwd(params, x).astype(jnp.float32) - y))

    return loss_fn


def batch(i, big=False):
    kx, _ = jax.random.split(jax.random.key(1000 + i))
    x = jax.random.normal(kx, (B, D_IN), jnp.float32)
    y = jnp.sum(x[:, :2], axis=1, keepdims=True) * 0.5
    if big:
        x = x * 3000.0
        y = y * 3000.0
    return x, y


def make_step(opt, loss_fn):
    grad_fn = mp.value_and_grad(loss_fn)

    @jax.jit
    def step(params, state, x, y):
        loss, grads = grad_fn(state, params, x, y)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    return step


def bits(tree):
    """Leaves as raw bytes, so equality is bit-for-bit (NaN == NaN, -0.0 != 0.0)."""
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def tree_all_finite(tree):
    return all(
        bool(np.all(np.isfinite(np.asarray(x))))
        for x in jax.tree.leaves(tree)
        if np.asarray(x).dtype.kind == "f"
    )


# ---------------------------------------------------------------- policies


def test_policy_parse_forms():
    p = mp.get_policy("params=float32,compute=bfloat16,output=float32")
    assert (p.param_dtype, p.compute_dtype, p.output_dtype) == (
        jnp.float32,
        jnp.bfloat16,
        jnp.float32,
    )
    assert p.loss_scale == "none"  # bf16 needs no loss scaling
    assert mp.get_policy("p=f32,c=f16,o=f16").loss_scale == "dynamic"
    assert mp.get_policy("c=half").compute_dtype == jnp.float16
    assert mp.get_policy("mixed_bfloat16") == p
    assert mp.get_policy("float32").loss_scale == "none"
    assert mp.get_policy("c=f16,ls=static").loss_scale == "static"
    assert mp.get_policy(str(p)) == p  # str round-trips
    assert mp.get_policy(p) is p


@pytest.mark.parametrize(
    "spec, match",
    [
        ("params=float64", "float64"),
        ("compute=int8", "int8"),
        ("weights=float32", "unknown key 'weights'"),
        ("compute", "not key=value"),
        ("c=f16,compute=bf16", "twice"),
        ("c=f16,ls=sometimes", "loss_scale='sometimes'"),
        ("", "empty"),
    ],
)
def test_policy_bad_specs_explain(spec, match):
    with pytest.raises(ValueError, match=match):
        mp.get_policy(spec)


def test_policy_casts_only_floats():
    p = mp.get_policy("p=f32,c=bf16,o=f32")
    tree = {
        "w": jnp.ones((2, 2), jnp.float32),
        "ids": jnp.ones((3,), jnp.int32),
        "h": jnp.ones((2,), jnp.float16),
    }
    c = p.cast_to_compute(tree)
    assert (
        c["w"].dtype == jnp.bfloat16
        and c["h"].dtype == jnp.bfloat16
        and c["ids"].dtype == jnp.int32
    )
    assert p.cast_to_param(c)["w"].dtype == jnp.float32
    out = p.apply(lambda w, x: x @ w)(tree["w"], jnp.ones((1, 2), jnp.float32))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), [[2.0, 2.0]], rtol=0, atol=0)


def test_policy_forward_close_to_f32():
    params = init_params()
    x, _ = batch(0)
    ref = forward(params, x)
    for spec, tol in (("bf16", 2e-2), ("f16", 2e-3)):
        out = mp.get_policy(spec).apply(forward)(params, x)
        assert out.dtype == jnp.float32
        err = float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))
        assert err < tol, (spec, err)


# ---------------------------------------------------------------- loss scaling basics


def test_scale_unscale_roundtrip_and_value_and_grad_matches_float():
    params = init_params()
    opt = mp.static_loss_scale(optax.sgd(0.1), 2.0**10)
    state = opt.init(params)
    loss_fn = make_loss(mp.get_policy("float32"))
    x, y = batch(0)
    loss, grads = mp.value_and_grad(loss_fn)(state, params, x, y)
    ref_loss, ref_grads = jax.value_and_grad(loss_fn)(params, x, y)
    # Scaling by a power of two is exact in f32 away from over/underflow.
    chex.assert_trees_all_close(grads, ref_grads, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-7)
    assert float(mp.scale_loss(jnp.float32(3.0), state)) == 3.0 * 2.0**10


def test_f16_grads_with_scaling_close_to_f32_and_without_underflow():
    """Loss scaling rescues small float16 gradients that would otherwise flush to zero."""
    params = init_params()
    x, y = batch(1)

    def tiny(policy):  # a loss whose gradients are ~1e-6: below float16's normal range
        base = make_loss(policy)
        return lambda p, x, y: 1e-6 * base(p, x, y)

    ref = jax.grad(tiny(mp.get_policy("float32")))(params, x, y)

    def rel_err(opt):
        _, g = mp.value_and_grad(tiny(POLICY_F16))(opt.init(params), params, x, y)
        return max(
            float(jnp.max(jnp.abs(a - b))) / float(jnp.max(jnp.abs(b)))
            for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref), strict=True)
        )

    with_scaling = rel_err(mp.static_loss_scale(optax.sgd(0.1), 2.0**12))
    without = rel_err(mp.no_loss_scale(optax.sgd(0.1)))
    assert with_scaling < 5e-3, with_scaling
    assert without > 5e-2, without


def test_finite_step_equals_inner_optimizer():
    params = init_params()
    inner = optax.sgd(1e-2, momentum=0.9)
    opt = mp.dynamic_loss_scale(inner)
    s, si = opt.init(params), inner.init(params)
    grads = jax.grad(make_loss(mp.get_policy("float32")))(params, *batch(2))
    u, s2 = opt.update(grads, s, params)
    ui, si2 = inner.update(grads, si, params)
    assert bits(u) == bits(ui)
    assert bits(s2.inner_state) == bits(si2)
    assert int(s2.loss_scale.counter) == 1 and int(s2.loss_scale.skipped) == 0


# ---------------------------------------------------------------- reliability (issue section 5)


def test_overflowing_f16_step_is_skipped_bit_identically():
    params = init_params()
    opt = mp.dynamic_loss_scale(optax.sgd(1e-2, momentum=0.9), initial_scale=2.0**12)
    step = make_step(opt, make_loss(POLICY_F16))
    state = opt.init(params)
    # A few normal steps first, so the momentum buffers are non-trivial (optax.adam
    # cannot run under the strict dtype promotion of this suite: int count ** float).
    for i in range(3):
        params, state, _ = step(params, state, *batch(i))
    assert int(state.loss_scale.skipped) == 0, "test setup: the normal batches stay finite"
    # An exact -0.0 must survive a skipped step too.
    params = jax.tree.map(lambda a: a, params)
    params["l1"]["bias"] = params["l1"]["bias"].at[0].set(-0.0)
    params_before = jax.tree.map(np.asarray, params)
    inner_before = jax.tree.map(np.asarray, state.inner_state)
    scale_before = float(mp.loss_scale(state))

    x, y = batch(3, big=True)
    _, raw = mp.value_and_grad(make_loss(POLICY_F16))(state, params, x, y)
    assert not tree_all_finite(raw), "test setup: this batch must overflow in float16"

    new_params, new_state, _ = step(params, state, x, y)
    assert bits(new_params) == bits(params_before)
    assert bits(new_state.inner_state) == bits(inner_before)
    assert float(mp.loss_scale(new_state)) == scale_before / 2
    assert int(new_state.loss_scale.counter) == 0
    assert int(new_state.loss_scale.skipped) == 1


def test_training_recovers_from_overflow_and_params_stay_finite():
    params = init_params()
    # Start far too high: the first steps overflow and the scale backs off.
    opt = mp.dynamic_loss_scale(optax.sgd(3e-2, momentum=0.9), initial_scale=2.0**40, period=5)
    loss_fn = make_loss(POLICY_F16)
    step = make_step(opt, loss_fn)
    state = opt.init(params)
    x_eval, y_eval = batch(99)
    ref_loss = make_loss(mp.get_policy("float32"))
    loss0 = float(ref_loss(params, x_eval, y_eval))
    scales = []
    for i in range(60):
        big = i in (30, 31)  # two more overflows mid-run
        params, state, _ = step(params, state, *batch(i % 8, big=big))
        assert tree_all_finite(params), f"non-finite parameter after step {i}"
        assert tree_all_finite(state.inner_state), f"non-finite optimizer state after step {i}"
        scales.append(float(mp.loss_scale(state)))
    skipped = int(state.loss_scale.skipped)
    assert skipped >= 3  # initial back-off (>= 1) plus the two big batches
    assert scales[0] == 2.0**39
    assert min(scales) >= 1.0
    assert scales[31] < scales[29]  # mid-run overflow halved the scale
    assert scales[-1] > scales[32]  # and it grew back with period=5
    loss1 = float(ref_loss(params, x_eval, y_eval))
    assert loss1 < 0.5 * loss0, (loss0, loss1)


def test_scale_floor_and_growth():
    params = {"w": jnp.zeros((3,), jnp.float32)}
    opt = mp.dynamic_loss_scale(optax.sgd(0.1), initial_scale=4.0, period=2)
    state = opt.init(params)
    upd = jax.jit(opt.update)
    bad = {"w": jnp.array([jnp.inf, 0.0, 0.0], jnp.float32)}
    good = {"w": jnp.ones((3,), jnp.float32)}
    for expected in (2.0, 1.0, 1.0, 1.0):
        _, state = upd(bad, state, params)
        assert float(mp.loss_scale(state)) == expected
    _, state = upd(good, state, params)
    assert float(mp.loss_scale(state)) == 1.0
    _, state = upd(good, state, params)
    assert float(mp.loss_scale(state)) == 2.0 and int(state.loss_scale.counter) == 0


@given(st.lists(st.booleans(), min_size=1, max_size=40))
def test_dynamic_scale_follows_reference_model(finite_steps):
    """Scale/counter/skipped match a plain-Python model of the documented rule."""
    params = {"w": jnp.zeros((4,), jnp.float32)}
    opt = mp.dynamic_loss_scale(
        optax.sgd(0.1), initial_scale=2.0**4, period=3, factor=2.0, min_scale=1.0
    )
    state = opt.init(params)
    upd = _jitted_update(opt)
    scale, counter, skipped = 16.0, 0, 0
    for ok in finite_steps:
        g = {"w": jnp.full((4,), 1.0 if ok else jnp.nan, jnp.float32)}
        _, state = upd(g, state, params)
        if ok:
            counter += 1
            if counter >= 3:
                scale, counter = scale * 2.0, 0
        else:
            scale, counter, skipped = max(scale / 2.0, 1.0), 0, skipped + 1
        assert float(state.loss_scale.scale) == scale
        assert int(state.loss_scale.counter) == counter
        assert int(state.loss_scale.skipped) == skipped


_UPDATES = {}


def _jitted_update(opt):
    # One compilation for all hypothesis examples (same config, same shapes).
    key = "ref"
    if key not in _UPDATES:
        _UPDATES[key] = jax.jit(opt.update)
    return _UPDATES[key]


def _save(tree) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, *[np.asarray(x) for x in jax.tree.leaves(tree)])
    return buf.getvalue()


def _restore(blob: bytes, like):
    with np.load(io.BytesIO(blob)) as f:
        leaves = [jnp.asarray(f[f"arr_{i}"]) for i in range(len(f.files))]
    return jax.tree.unflatten(jax.tree.structure(like), leaves)


def test_resumed_run_is_bit_identical():
    opt = mp.dynamic_loss_scale(optax.sgd(1e-2, momentum=0.9), initial_scale=2.0**20, period=4)
    step = make_step(opt, make_loss(POLICY_F16))
    schedule = [(i % 6, i in (5, 9)) for i in range(14)]  # includes overflowing steps

    params, state = init_params(), opt.init(init_params())
    for i, big in schedule:
        params, state, _ = step(params, state, *batch(i, big))
    straight = (params, state)

    params, state = init_params(), opt.init(init_params())
    for i, big in schedule[:7]:
        params, state, _ = step(params, state, *batch(i, big))
    blob = _save((params, state))
    del params, state
    fresh = (init_params(seed=5), opt.init(init_params(seed=5)))
    params, state = _restore(blob, fresh)
    assert isinstance(state, mp.MixedPrecisionState)
    for i, big in schedule[7:]:
        params, state, _ = step(params, state, *batch(i, big))
    assert int(state.loss_scale.skipped) >= 2
    assert bits((params, state)) == bits(straight)


def test_bf16_policy_wraps_without_scaling():
    policy = mp.get_policy("bf16")
    opt = policy.wrap_optimizer(optax.sgd(0.1))
    state = opt.init(init_params())
    assert float(mp.loss_scale(state)) == 1.0
    params = init_params()
    step = make_step(opt, make_loss(policy))
    x, y = batch(0)
    new, state, loss = step(params, state, x, y)
    ref = jax.grad(make_loss(mp.get_policy("float32")))(params, x, y)
    expect = jax.tree.map(lambda p, g: p - 0.1 * g, params, ref)
    # bf16 compute: 8 mantissa bits, so the step matches f32 to about 1%.
    for a, b, p in zip(
        jax.tree.leaves(new), jax.tree.leaves(expect), jax.tree.leaves(params), strict=True
    ):
        assert (
            float(jnp.max(jnp.abs((a - p) - (b - p))))
            <= 2e-2 * float(jnp.max(jnp.abs(b - p))) + 1e-7
        )


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="period=0"):
        mp.dynamic_loss_scale(optax.sgd(0.1), period=0)
    with pytest.raises(ValueError, match="factor"):
        mp.dynamic_loss_scale(optax.sgd(0.1), factor=1.0)
    with pytest.raises(ValueError, match="min_scale"):
        mp.dynamic_loss_scale(optax.sgd(0.1), initial_scale=0.5)
    with pytest.raises(ValueError, match="scale=inf"):
        mp.static_loss_scale(optax.sgd(0.1), float("inf"))
    with pytest.raises(TypeError, match="optax.GradientTransformation"):
        mp.dynamic_loss_scale(lambda g: g)
    with pytest.raises(TypeError, match="MixedPrecisionState"):
        mp.scale_loss(jnp.float32(1.0), optax.sgd(0.1).init({"w": jnp.zeros(2)}))
    with pytest.raises(ValueError, match="only apply to loss_scale='dynamic'"):
        mp.get_policy("bf16").wrap_optimizer(optax.sgd(0.1), period=10)


def test_exported_from_jqx():
    assert jqx.mixed_precision is mp
    assert "mixed_precision" in jqx.__all__


def test_extra_args_reach_an_inner_optimizer_that_takes_them():
    params = {"w": jnp.ones((2,), jnp.float32)}
    seen = {}

    def update(updates, state, params=None, *, value=None):
        seen["value"] = value
        return updates, state

    inner = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)
    opt = mp.dynamic_loss_scale(inner)
    u, _ = opt.update(
        {"w": jnp.full((2,), 0.5, jnp.float32)}, opt.init(params), params, value=jnp.float32(3.0)
    )
    assert float(seen["value"]) == 3.0
    assert u["w"].tolist() == [0.5, 0.5]
    # And a plain optax optimizer ignores them.
    opt2 = mp.dynamic_loss_scale(optax.sgd(1.0))
    u2, _ = opt2.update(
        {"w": jnp.full((2,), 0.5, jnp.float32)}, opt2.init(params), params, value=jnp.float32(3.0)
    )
    assert u2["w"].tolist() == [-0.5, -0.5]

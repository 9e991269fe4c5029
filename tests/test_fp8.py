"""FP8 training with delayed scaling: state updates, emulated math, Flax parity."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.linen import fp8_ops

import jqx  # noqa: F401
from jqx.training import fp8

E4M3_MAX, E5M2_MAX = 448.0, 57344.0


def test_scale_formula_and_history_roll():
    hist = jnp.array([1.0, 3.0, 0.0, 2.0])
    new = jax.jit(fp8.update_amax_history)(jnp.array([[-5.0, 1.0]]), hist)
    # roll by one towards the front, newest amax at index 0
    assert new.tolist() == [5.0, 0.0, 2.0, 1.0]
    for margin in (0, 1, 3):
        s = jax.jit(fp8.multiplier_from_history, static_argnums=(2, 3))(
            new, jnp.ones(1), jnp.float8_e4m3fn, margin
        )
        np.testing.assert_allclose(np.asarray(s), [E4M3_MAX / (5.0 * 2**margin)], rtol=1e-7)
    s = fp8.multiplier_from_history(new, jnp.ones(1), jnp.float8_e5m2)
    np.testing.assert_allclose(np.asarray(s), [E5M2_MAX / 5.0], rtol=1e-7)
    # an all-zero (or non-finite) history keeps the old scale
    old = jnp.array([7.0])
    assert fp8.multiplier_from_history(jnp.zeros(4), old, jnp.float8_e4m3fn).tolist() == [7.0]
    assert fp8.multiplier_from_history(
        jnp.array([jnp.inf, 1.0]), old, jnp.float8_e4m3fn
    ).tolist() == [7.0]


def test_qdq_on_the_fp8_grid():
    x = jax.random.normal(jax.random.key(0), (64,)) * 3
    scale = jnp.array([E4M3_MAX / 12.0])
    y = jax.jit(fp8.fake_quant, static_argnums=1)(x, jnp.float8_e4m3fn, scale)
    # every value is an e4m3 number times 1/scale, within half an e4m3 ulp
    # (relative 2^-4) of x, and saturation happens only beyond amax 12
    codes = np.asarray(y) * float(scale[0])
    grid = codes.astype(jnp.float8_e4m3fn).astype(np.float32)
    np.testing.assert_allclose(codes, grid, rtol=1e-6)  # up to the f32 rounding of * (1/scale)
    assert len(np.unique(grid)) > 20
    assert np.all(np.abs(np.asarray(y - x)) <= np.abs(np.asarray(x)) * 2**-4 + 1e-6)


class MLP(nn.Module):
    dot_general_cls: object = None

    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(32, dot_general_cls=self.dot_general_cls)(x))
        return nn.Dense(4, dot_general_cls=self.dot_general_cls)(x)


X = jax.random.normal(jax.random.key(1), (16, 8)) * 2.0
Y = jax.random.normal(jax.random.key(2), (16, 4))


def _loss_ours(p, s, x=X):
    f = fp8.delayed_scaling(MLP().apply)
    return jnp.mean((f(s, {"params": p}, x) - Y) ** 2)


def test_state_update_one_step():
    v = MLP().init(jax.random.key(0), X)
    st = fp8.init_state(v, history_len=8)
    assert sorted(st) == ["params/Dense_0/kernel", "params/Dense_1/kernel"]
    step = jax.jit(jax.grad(_loss_ours, argnums=(0, 1)))
    _, st1 = step(v["params"], st)
    e = st1["params/Dense_0/kernel"]
    # history[0] is this step's amax; the scale still comes from the (empty) old history
    assert float(e["input_amax_history"][0]) == pytest.approx(float(jnp.max(jnp.abs(X))))
    w0 = v["params"]["Dense_0"]["kernel"]
    assert float(e["kernel_amax_history"][0]) == float(jnp.max(jnp.abs(w0)))
    assert float(e["output_grad_amax_history"][0]) > 0
    assert e["input_scale"].tolist() == [1.0] and e["output_grad_scale"].tolist() == [1.0]
    _, st2 = step(v["params"], st1)
    e2 = st2["params/Dense_0/kernel"]
    # delayed: step 2 uses the amax recorded at step 1
    np.testing.assert_allclose(
        np.asarray(e2["kernel_scale"]), [E4M3_MAX / float(jnp.max(jnp.abs(w0)))], rtol=1e-6
    )
    og = float(e["output_grad_amax_history"][0])
    np.testing.assert_allclose(np.asarray(e2["output_grad_scale"]), [E5M2_MAX / og], rtol=1e-6)
    assert e2["kernel_amax_history"][:2].tolist() == [float(jnp.max(jnp.abs(w0))), 0.0]


def test_forward_matches_fp8_reference_within_bound():
    v = MLP().init(jax.random.key(0), X)
    st = fp8.init_state(v, history_len=4)
    _, st = jax.jit(jax.grad(_loss_ours, argnums=(0, 1)))(v["params"], st)
    f = jax.jit(fp8.delayed_scaling(MLP().apply))
    y = f(st, v, X)
    y32 = MLP().apply(v, X)
    # e4m3 keeps 3 mantissa bits: each operand is within 2^-4 relative, so a
    # two-layer output moves by a few percent of its scale at most
    err = float(jnp.max(jnp.abs(y - y32)))
    assert 0 < err < 0.08 * float(jnp.max(jnp.abs(y32)))


def _flax_step(fv, x, y):
    def loss(fv):
        return jnp.mean((MLP(fp8_ops.Fp8DotGeneralOp).apply(fv, x) - y) ** 2)

    return jax.value_and_grad(loss)(fv)


def test_matches_flax_fp8_dot_general_op():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        fv = MLP(fp8_ops.Fp8DotGeneralOp).init(jax.random.key(0), X)
        hl = fv["_overwrite_with_gradient"]["Dense_0"]["Fp8DotGeneralOp_0"][
            "input_amax_history"
        ].shape[0]
        p = fv["params"]
        st = fp8.init_state({"params": p}, history_len=hl)
        assert hl == 1024  # both default to Transformer Engine's length
        ours = jax.jit(jax.value_and_grad(_loss_ours, argnums=(0, 1)))
        theirs = jax.jit(_flax_step)
        pf = p
        for i in range(4):
            xs = X * (1.0 + i)  # growing activations exercise the delayed scales
            lo, (gp, st) = ours(p, st, xs)
            lf, gf = theirs(
                {"params": pf, "_overwrite_with_gradient": fv["_overwrite_with_gradient"]}, xs, Y
            )
            fv = {"params": pf, "_overwrite_with_gradient": gf["_overwrite_with_gradient"]}
            # same loss and parameter gradients, bit for bit on CPU
            assert float(lo) == float(lf), (i, float(lo), float(lf))
            jax.tree.map(
                lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                gp,
                gf["params"],
            )
            for layer in ("Dense_0", "Dense_1"):
                mine = st[f"params/{layer}/kernel"]
                flax_meta = gf["_overwrite_with_gradient"][layer]["Fp8DotGeneralOp_0"]
                for role in ("input", "kernel", "output_grad"):
                    np.testing.assert_array_equal(
                        np.asarray(mine[f"{role}_amax_history"]),
                        np.asarray(flax_meta[f"{role}_amax_history"]),
                    )
                    # Flax stores the inverse scale
                    np.testing.assert_allclose(
                        np.asarray(mine[f"{role}_scale"]),
                        1.0 / np.asarray(flax_meta[f"{role}_scale"]),
                        rtol=1e-6,
                    )
            p = jax.tree.map(lambda a, g: a - 0.1 * g, p, gp)
            pf = jax.tree.map(lambda a, g: a - 0.1 * g, pf, gf["params"])


def test_nnx_model_and_errors():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(8, 16, rngs=rngs)

        def __call__(self, x):
            return self.a(x) + x @ self.a.kernel[...]  # a second matmul with a.kernel

    gdef, state = nnx.split(Net(nnx.Rngs(0)))

    def apply(s, x):
        return nnx.merge(gdef, s)(x)

    st = fp8.init_state(state, history_len=4)
    assert list(st) == ["a/kernel"]
    with pytest.raises(ValueError, match="more than one matmul"):
        fp8.delayed_scaling(apply)(st, state, X)

    class One(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(8, 16, rngs=rngs)

        def __call__(self, x):
            return nnx.relu(self.a(x))

    gdef, state = nnx.split(One(nnx.Rngs(0)))

    def apply(s, x):
        return nnx.merge(gdef, s)(x)

    st = fp8.init_state(state, history_len=4)
    f = fp8.delayed_scaling(apply)
    _, st = jax.jit(jax.grad(lambda s, f8: jnp.sum(f(f8, s, X)), argnums=(0, 1)))(state, st)
    assert float(st["a/kernel"]["input_amax_history"][0]) == pytest.approx(
        float(jnp.max(jnp.abs(X)))
    )
    with pytest.raises(ValueError, match="init_state"):
        f({}, state, X)
    with pytest.raises(ValueError, match="fp8 dtype"):
        fp8.delayed_scaling(apply, fwd_dtype=jnp.bfloat16)

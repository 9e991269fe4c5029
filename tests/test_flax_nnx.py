"""jqx.flax.nnx: quantized Linear / Einsum against flax.nnx's float layers.

Bounds as in test_flax_linen.py: weight-only equals the float layer on the
dequantized weights up to ``1e-5 * (|x| @ |W_hat|) + 1e-6``; W8A8 adds
``(max|x_row| / 254) * sum_k |W_hat[k, n]|`` for the per-token activation
rounding.
"""

import chex
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import jqx
import jqx.flax
from jqx.flax import nnx as qnnx

K, N = 32, 16
X = jax.random.normal(jax.random.key(1), (4, K))

RECIPES = {
    "int8": lambda axis: jqx.int8_weight_only(axis=axis),
    "int4_g16": lambda axis: jqx.int4_weight_only(group_size=16, axis=axis),
    "nf4_g16": lambda axis: jqx.nf4_weight_only(group_size=16, axis=axis),
    "w8a8": lambda axis: jqx.int8_dynamic_activation_int8_weight(axis=axis),
}


def _make(name, cls_linear, cls_einsum):
    if name == "Linear":
        return cls_linear(K, N, rngs=nnx.Rngs(0), bias_init=nnx.initializers.constant(0.1)), -2
    return (
        cls_einsum(
            "bk,knh->bnh",
            (K, 2, N // 2),
            (2, N // 2),
            rngs=nnx.Rngs(0),
            bias_init=nnx.initializers.constant(0.1),
        ),
        0,
    )


def _bound(recipe_name, x, w_hat_2d, packed=False):
    ax = jnp.abs(x)
    aw = jnp.abs(w_hat_2d)
    tol = 1e-5 * (ax @ aw) + 1e-6
    row_max, col_sum = jnp.max(ax, axis=-1, keepdims=True), jnp.sum(aw, axis=0, keepdims=True)
    if recipe_name == "w8a8":
        tol = tol + row_max / 254.0 * col_sum
    elif packed:  # int8 weight-only on the native GEMM: the two-level activation split
        tol = tol + row_max / 32511.0 * col_sum
    return tol


@pytest.mark.parametrize("layer_name", ["Linear", "Einsum"])
@pytest.mark.parametrize("recipe_name", list(RECIPES))
def test_quantized_layer_matches_float_layer_on_dequantized_weights(layer_name, recipe_name):
    qmodel, axis = _make(layer_name, qnnx.Linear, qnnx.Einsum)
    fmodel, _ = _make(layer_name, nnx.Linear, nnx.Einsum)
    gdef, state = nnx.split(qmodel)
    qstate = jqx.quantize(state, RECIPES[recipe_name](axis))
    qm = nnx.merge(gdef, qstate)
    assert jqx.is_qarray(qm.kernel.get_value())
    y = nnx.jit(lambda m, x: m(x))(qm, X)
    fgdef, _ = nnx.split(fmodel)
    y_ref = nnx.merge(fgdef, jqx.dequantize(qstate))(X)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    w_hat = qm.kernel.get_value().dequantize().reshape(K, N)
    packed = qm.kernel.get_value().code_layout == "vnni"  # jqx.quantize packs where it runs
    tol = _bound(recipe_name, X, w_hat, packed).reshape(y.shape)
    err = jnp.abs(y - y_ref)
    assert bool(jnp.all(err <= tol)), float(jnp.max(err - tol))


@pytest.mark.parametrize("layer_name", ["Linear", "Einsum"])
def test_float_params_still_work_and_names_match(layer_name):
    qmodel, _ = _make(layer_name, qnnx.Linear, qnnx.Einsum)
    fmodel, _ = _make(layer_name, nnx.Linear, nnx.Einsum)
    chex.assert_trees_all_close(qmodel(X), fmodel(X), rtol=1e-6, atol=1e-6)
    # Same state structure as Flax's layer: a float model's state loads directly.
    chex.assert_trees_all_equal_structs(nnx.state(qmodel), nnx.state(fmodel))


def test_update_from_quantized_float_checkpoint():
    """Quantize a float nnx.Linear's state and load it into the quantized layer."""
    fmodel, _ = _make("Linear", nnx.Linear, nnx.Einsum)
    qstate = jqx.quantize(nnx.state(fmodel), jqx.int8_weight_only())
    qmodel = qnnx.Linear(K, N, rngs=nnx.Rngs(123))
    nnx.update(qmodel, qstate)
    y = qmodel(X)
    y_ref = fmodel(X)
    w = fmodel.kernel.get_value()
    # int8 per-channel: |dW| <= scale / 2 = max|W[:, n]| / 254.
    tol = (
        jnp.abs(X) @ (jnp.max(jnp.abs(w), axis=0, keepdims=True) / 254.0 * jnp.ones_like(w)) + 1e-5
    )
    assert bool(jnp.all(jnp.abs(y - y_ref) <= tol))


def test_out_sharding_none_and_preferred_element_type_pass_through():
    m = qnnx.Linear(K, N, rngs=nnx.Rngs(0), preferred_element_type=jnp.float32)
    gdef, state = nnx.split(m)
    qm = nnx.merge(gdef, jqx.quantize(state, jqx.int8_weight_only()))
    y = qm(X, out_sharding=None)
    assert y.dtype == jnp.float32 and y.shape == (4, N)


def test_nnx_jit_does_not_retrace():
    qmodel, _ = _make("Linear", qnnx.Linear, qnnx.Einsum)
    gdef, state = nnx.split(qmodel)
    qstate = jqx.quantize(state, jqx.int4_weight_only(group_size=16))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(s, x):
        return nnx.merge(gdef, s)(x)

    f(qstate, X)
    y = f(qstate, X * 2.0)
    fmodel, _ = _make("Linear", nnx.Linear, nnx.Einsum)
    y_ref = nnx.merge(nnx.split(fmodel)[0], jqx.dequantize(qstate))(X * 2.0)
    assert float(jnp.max(jnp.abs(y - y_ref))) <= 1e-4 * float(jnp.max(jnp.abs(y_ref)))


def test_calibrate_an_nnx_model_built_from_jqx_layers():
    class Net(nnx.Module):
        def __init__(self):
            self.a = qnnx.Linear(K, N, rngs=nnx.Rngs(0))
            self.b = qnnx.Linear(N, 8, rngs=nnx.Rngs(1))

        def __call__(self, x):
            return self.b(jax.nn.relu(self.a(x)))

    gdef, state = nnx.split(Net())

    def fn(s, x):
        return nnx.merge(gdef, s)(x)

    batches = [X, X * 2.0]
    qstate = jqx.calibrate(
        fn, state, batches, jqx.int8_static_activation_int8_weight(), progress=False
    )
    qa = qstate["a"]["kernel"].get_value()
    assert jqx.is_qarray(qa) and qa.act.kind == "static"
    assert abs(float(qa.act_scale[0]) - float(jnp.max(jnp.abs(X * 2.0))) / 127.0) <= 1e-6
    y = nnx.merge(gdef, qstate)(X)
    y_ref = fn(state, X)
    # int8 weights and int8 activations at two calibrated per-tensor scales: ~1% of the output.
    assert float(jnp.max(jnp.abs(y - y_ref))) <= 0.03 * float(jnp.max(jnp.abs(y_ref)))

"""jqx.flax.linen: quantized Dense / DenseGeneral / Einsum against the float Flax layers.

Bounds: weight-only layers must equal the float Flax layer run on the
dequantized weights up to f32 rounding (``1e-5 * (|x| @ |W_hat|) + 1e-6``).
W8A8 also quantizes the activations per token (absmax / 127), which moves
each output by at most ``(max|x_row| / 254) * sum_k |W_hat[k, n]|``.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jqx
import jqx.flax
from jqx.flax import linen as qnn

K, N = 32, 16
X = jax.random.normal(jax.random.key(1), (4, K))

RECIPES = {
    "int8": lambda axis: jqx.int8_weight_only(axis=axis),
    "int4_g16": lambda axis: jqx.int4_weight_only(group_size=16, axis=axis),
    "nf4_g16": lambda axis: jqx.nf4_weight_only(group_size=16, axis=axis),
    "w8a8": lambda axis: jqx.int8_dynamic_activation_int8_weight(axis=axis),
}

# (quantized layer, float layer, kernel reduction axis, kernel as (K, N) matrix)
LAYERS = {
    "Dense": (qnn.Dense(N), nn.Dense(N), -2, lambda w: w),
    "DenseGeneral": (
        qnn.DenseGeneral((2, N // 2)),
        nn.DenseGeneral((2, N // 2)),
        0,
        lambda w: w.reshape(K, N),
    ),
    "Einsum": (
        qnn.Einsum((K, 2, N // 2), "bk,knh->bnh"),
        nn.Einsum((K, 2, N // 2), "bk,knh->bnh"),
        0,
        lambda w: w.reshape(K, N),
    ),
}


def _bound(recipe_name, x, w_hat_2d, packed=False):
    ax = jnp.abs(x.astype(jnp.float32))
    aw = jnp.abs(w_hat_2d.astype(jnp.float32))
    tol = 1e-5 * (ax @ aw) + 1e-6
    row_max, col_sum = jnp.max(ax, axis=-1, keepdims=True), jnp.sum(aw, axis=0, keepdims=True)
    if recipe_name == "w8a8":
        tol = tol + row_max / 254.0 * col_sum
    elif packed:  # int8 weight-only on the native GEMM: the two-level activation split
        tol = tol + row_max / 32511.0 * col_sum
    return tol


@pytest.mark.parametrize("layer_name", list(LAYERS))
@pytest.mark.parametrize("recipe_name", list(RECIPES))
def test_quantized_layer_matches_float_layer_on_dequantized_weights(layer_name, recipe_name):
    qlayer, flayer, axis, as_2d = LAYERS[layer_name]
    v = flayer.init(jax.random.key(0), X)
    # A non-zero bias so the bias path is checked too.
    v = jax.tree_util.tree_map_with_path(
        lambda p, a: a + 0.1 if jqx.path_str(p).endswith("bias") else a, v
    )
    qv = jqx.quantize(v, RECIPES[recipe_name](axis))
    assert jqx.is_qarray(qv["params"]["kernel"])
    y = jax.jit(qlayer.apply)(qv, X)
    y_ref = flayer.apply(jqx.dequantize(qv), X)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    w_hat = as_2d(qv["params"]["kernel"].dequantize())
    packed = qv["params"]["kernel"].code_layout == "vnni"  # jqx.quantize packs where it runs
    tol = _bound(recipe_name, X, w_hat, packed).reshape(y.shape)
    err = jnp.abs(y - y_ref)
    assert bool(jnp.all(err <= tol)), float(jnp.max(err - tol))
    # And close to the float model within the weight's quantization error.
    y_float = flayer.apply(v, X)
    w = as_2d(v["params"]["kernel"])
    wq_err = jnp.abs(X) @ jnp.abs(w - w_hat)
    assert bool(jnp.all(jnp.abs(y - y_float).reshape(4, N) <= wq_err + tol.reshape(4, N) + 1e-6))


@pytest.mark.parametrize("layer_name", list(LAYERS))
def test_float_params_still_work(layer_name):
    qlayer, flayer, _, _ = LAYERS[layer_name]
    v = flayer.init(jax.random.key(0), X)
    chex.assert_trees_all_close(qlayer.apply(v, X), flayer.apply(v, X), rtol=1e-6, atol=1e-6)
    # Same parameter names and shapes as Flax's layer.
    chex.assert_trees_all_equal_shapes(qlayer.init(jax.random.key(0), X), v)


def test_jit_does_not_retrace():
    qlayer, flayer, _, _ = LAYERS["Dense"]
    qv = jqx.quantize(flayer.init(jax.random.key(0), X), jqx.int4_weight_only(group_size=16))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(v, x):
        return qlayer.apply(v, x)

    y1 = f(qv, X)
    y2 = f(qv, X + 1.0)
    ref = flayer.apply(jqx.dequantize(qv), X + 1.0)
    assert float(jnp.max(jnp.abs(y2 - ref))) <= 1e-4 * float(jnp.max(jnp.abs(ref)))
    assert y1.shape == (4, N)


def test_mismatched_input_size_names_the_layer():
    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return qnn.Dense(8, name="out")(jax.nn.relu(qnn.Dense(N, name="hidden")(x)))

    m = MLP()
    qv = jqx.quantize(m.init(jax.random.key(0), X), jqx.int4_weight_only(group_size=16))
    assert m.apply(qv, X).shape == (4, 8)
    with pytest.raises(ValueError, match="hidden/kernel.*shape \\(32, 16\\).*expects \\(24, 16\\)"):
        m.apply(qv, jnp.ones((4, 24)))


def test_promote_dtype_passes_qarray_and_casts_floats():
    q = jqx.quantize_array(jnp.ones((K, N)), "int8")
    x, k, b = jqx.flax.promote_dtype(
        jnp.ones((2, K), jnp.bfloat16), q, jnp.zeros(N), dtype=jnp.float32
    )
    assert k is q and x.dtype == jnp.float32 and b.dtype == jnp.float32
    x, k, b = jqx.flax.promote_dtype(jnp.ones((2, K)), q, None)
    assert k is q and b is None and x.dtype == jnp.float32
    x, k = jqx.flax.promote_dtype(jnp.ones((2, K)), q, dtype=jnp.bfloat16)
    # Only the dtype the codes dequantize to changes; the codes are the same arrays.
    assert k.dtype == "bfloat16" and k.qvalue is q.qvalue and x.dtype == jnp.bfloat16


def test_bfloat16_compute_dtype():
    qlayer = qnn.Dense(N, dtype=jnp.bfloat16)
    v = nn.Dense(N).init(jax.random.key(0), X)
    qv = jqx.quantize(v, jqx.int8_weight_only())
    y = qlayer.apply(qv, X)
    y_ref = nn.Dense(N).apply(jqx.dequantize(qv), X)
    # bf16 inputs carry 8 mantissa bits: relative 2^-8 per product.
    tol = 2.0**-7 * (jnp.abs(X) @ jnp.abs(qv["params"]["kernel"].dequantize())) + 1e-3
    assert bool(jnp.all(jnp.abs(y.astype(jnp.float32) - y_ref) <= tol))


def test_quantized_transform_runs_the_adapters_too():
    """jqx.quantized(model.apply) on a model built from jqx layers gives the same result."""
    qlayer, flayer, _, _ = LAYERS["Dense"]
    qv = jqx.quantize(flayer.init(jax.random.key(0), X), jqx.int8_weight_only())
    y1 = qlayer.apply(qv, X)
    y2 = jax.jit(jqx.quantized(flayer.apply))(qv, X)
    np.testing.assert_allclose(np.asarray(y1), np.asarray(y2), rtol=1e-5, atol=1e-5)

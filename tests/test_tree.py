"""jqx.quantize over linen and nnx parameter trees; rules; dequantize,
tree_nbytes, summary; bad input at the tree level."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import jqx


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(32, name="up")(x)
        x = nn.LayerNorm(name="norm")(x)
        return nn.Dense(16, name="down")(x)


@pytest.fixture(scope="module")
def linen_params():
    return MLP().init(jax.random.key(0), jnp.ones((1, 64)))


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(64, 32, rngs=rngs)
        self.down = nnx.Linear(32, 16, rngs=rngs)


def _max_err_ok(q, w):
    """|w - w_hat| <= S/2 per element for int formats with absmax."""
    S = np.asarray(q.blocked(jnp.zeros(q.shape)) + q.expand(q.scale)).reshape(q.shape)
    return np.all(np.abs(np.asarray(q.dequantize()) - np.asarray(w)) <= S / 2 * (1 + 1e-5))


def test_linen_default_selects_kernels_only(linen_params):
    q = jqx.quantize(linen_params, jqx.int8_weight_only())
    p = q["params"]
    assert isinstance(p["up"]["kernel"], jqx.QArray) and isinstance(p["down"]["kernel"], jqx.QArray)
    for leaf in (p["up"]["bias"], p["norm"]["scale"], p["norm"]["bias"]):
        assert isinstance(leaf, jax.Array)
    assert p["up"]["kernel"].scale.shape == (1, 32)  # per output channel
    assert _max_err_ok(p["up"]["kernel"], linen_params["params"]["up"]["kernel"])
    # pure: the input tree is unchanged
    assert isinstance(linen_params["params"]["up"]["kernel"], jax.Array)
    # dequantize(tree) gives a tree the model runs on, close to the float model
    x = jnp.ones((2, 64))
    y = MLP().apply(jqx.dequantize(q), x)
    y0 = MLP().apply(linen_params, x)
    assert float(jnp.max(jnp.abs(y - y0))) < 0.05 * float(jnp.max(jnp.abs(y0)))


def test_nnx_state_round_trip():
    model = NnxMLP(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    q = jqx.quantize(state, jqx.int4_weight_only(group_size=16))
    qm = nnx.merge(graphdef, q)
    assert isinstance(qm.up.kernel[...], jqx.QArray)
    assert isinstance(qm.up.bias[...], jax.Array)
    k = qm.up.kernel[...]
    assert k.format == "uint4" and k.block == (16, 1) and k.qvalue.shape == (64, 16)
    deq = nnx.merge(graphdef, jqx.dequantize(q))
    err = jnp.abs(deq.up.kernel[...] - model.up.kernel[...])
    S = jnp.repeat(k.scale, 16, axis=0)
    assert bool(jnp.all(err <= S / 2 * (1 + 1e-5)))


def test_rules_first_match_wins_and_none_keeps_float(linen_params):
    rules = {
        "down": None,
        "up/kernel": jqx.int4_weight_only(group_size=16),
        ".*": jqx.int8_weight_only(),
    }
    with pytest.warns(UserWarning, match=r"\['\.\*'\] matched no leaf \(earlier rules win\)"):
        q = jqx.quantize(linen_params, rules)["params"]
    assert q["up"]["kernel"].format == "uint4"
    assert isinstance(q["down"]["kernel"], jax.Array)
    # the catch-all rule sees only matmul weights: biases and norms stay float
    assert isinstance(q["up"]["bias"], jax.Array) and isinstance(q["norm"]["scale"], jax.Array)
    q2 = jqx.quantize(
        linen_params, {"up": jqx.fp8_weight_only(), ".*": jqx.nf4_weight_only(group_size=16)}
    )
    assert q2["params"]["up"]["kernel"].format == "fp8_e4m3"
    assert q2["params"]["down"]["kernel"].format == "nf4"


def test_unused_rule_warns_and_names_it(linen_params):
    with pytest.warns(UserWarning, match=r"rule\(s\) \['attn'\] matched no leaf.*params/up/kernel"):
        jqx.quantize(linen_params, {"attn": jqx.int8_weight_only(), ".*": jqx.int8_weight_only()})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jqx.quantize(linen_params, {"up": jqx.int8_weight_only(), "down": None})


def test_filter_fn_selects_other_leaves(linen_params):
    q = jqx.quantize(
        linen_params,
        jqx.int8_weight_only(granularity=jqx.per_tensor()),
        filter_fn=lambda p, x: p.endswith("bias"),
    )["params"]
    assert isinstance(q["up"]["bias"], jqx.QArray) and isinstance(q["up"]["kernel"], jax.Array)


def test_stacked_kernels_get_per_layer_scales():
    params = {
        "layers": {
            "kernel": jnp.asarray(np.random.default_rng(0).normal(size=(4, 32, 8)), jnp.float32)
        }
    }
    params["layers"]["kernel"] = params["layers"]["kernel"].at[2].multiply(50.0)
    q = jqx.quantize(params, jqx.int8_weight_only())["layers"]["kernel"]
    assert q.scale.shape == (4, 1, 8)
    assert _max_err_ok(q, params["layers"]["kernel"])


def test_already_quantized_leaves_are_left_alone(linen_params):
    q = jqx.quantize(linen_params, jqx.int8_weight_only())
    q2 = jqx.quantize(q, jqx.int4_weight_only(group_size=16))
    assert q2["params"]["up"]["kernel"] is q["params"]["up"]["kernel"]


def test_tree_nbytes_and_summary(linen_params):
    f32 = jqx.tree_nbytes(linen_params)
    assert f32 == sum(x.size * 4 for x in jax.tree_util.tree_leaves(linen_params))
    q = jqx.quantize(linen_params, jqx.int4_weight_only(group_size=16))
    k = q["params"]["up"]["kernel"]
    assert k.nbytes == 64 * 32 // 2 + 2 * (64 // 16) * 32 * 4
    others = f32 - (64 * 32 + 32 * 16) * 4
    assert jqx.tree_nbytes(q) == others + k.nbytes + q["params"]["down"]["kernel"].nbytes
    s = jqx.summary(q)
    assert s.startswith("6 leaves (2 quantized)") and "uint4:" in s and "float32:" in s
    assert jqx.tree_nbytes(k) == k.nbytes  # a single QArray
    np.testing.assert_allclose(np.asarray(jqx.dequantize(k)), np.asarray(k.dequantize()))


def test_activation_spec_is_recorded(linen_params):
    q = jqx.quantize(linen_params, jqx.int8_dynamic_activation_int8_weight())["params"]["up"][
        "kernel"
    ]
    assert q.act == jqx.ActSpec("dynamic", "int8", "per_token")
    q = jqx.quantize(linen_params, jqx.fp8_dynamic_activation_fp8_weight())["params"]["up"][
        "kernel"
    ]
    assert q.act.format == "fp8_e4m3" and q.format == "fp8_e4m3"


# ------------------------------------------------------------------ bad input


def test_nan_in_a_weight_names_the_leaf_path(linen_params):
    bad = jax.tree_util.tree_map(lambda x: x, linen_params)
    bad["params"]["down"]["kernel"] = bad["params"]["down"]["kernel"].at[0, 0].set(jnp.nan)
    with pytest.raises(
        ValueError, match=r"params/down/kernel contains NaN or Inf.*rule mapping its path to None"
    ):
        jqx.quantize(bad, jqx.int8_weight_only())
    # excluding the leaf with a rule is the documented fix
    q = jqx.quantize(bad, {"down": None, ".*": jqx.int8_weight_only()})
    assert bool(jnp.isnan(q["params"]["down"]["kernel"][0, 0]))


def test_group_size_error_names_leaf_axis_size_and_divisors(linen_params):
    with pytest.raises(ValueError) as e:
        jqx.quantize(linen_params, jqx.int4_weight_only(group_size=24))
    msg = str(e.value)
    # leaves are visited in key order: params/down/kernel (32, 16) comes first
    assert "group_size=24 does not divide axis 0 of params/down/kernel (size 32)" in msg
    assert "such as 8, 16" in msg


def test_non_float_leaf_selected_is_an_error():
    params = {"emb": {"kernel": jnp.ones((8, 4), jnp.int32)}, "d": {"kernel": jnp.ones((8, 4))}}
    with pytest.raises(
        TypeError, match=r"emb/kernel \(dtype=int32\) was selected.*only float arrays.*None"
    ):
        jqx.quantize(params, {"emb": jqx.int8_weight_only()})
    with pytest.raises(TypeError, match=r"emb/kernel \(dtype=int32\) was selected"):
        jqx.quantize(params, jqx.int8_weight_only(), filter_fn=lambda p, x: x.ndim == 2)
    # a single recipe with the default selection skips non-float kernels
    q = jqx.quantize(params, jqx.int8_weight_only())
    assert isinstance(q["emb"]["kernel"], jax.Array) and isinstance(q["d"]["kernel"], jqx.QArray)


@pytest.mark.parametrize(
    "recipe,exc,match",
    [
        (None, TypeError, r"recipe must be a jqx recipe.*or a dict of rules"),
        (
            "int8",
            TypeError,
            r"recipe must be a jqx recipe \(e.g. jqx.int8_weight_only\(\)\) or None, got str",
        ),
        (
            {"(": jqx.int8_weight_only()},
            ValueError,
            r"rules key '\(' is not a valid regular expression",
        ),
        ({"up": "int8"}, TypeError, r"rules\['up'\] must be a jqx recipe"),
        (
            jqx.int8_static_activation_int8_weight(),
            ValueError,
            r"needs calibration data; use jqx.calibrate",
        ),
    ],
)
def test_bad_recipe_arguments(linen_params, recipe, exc, match):
    with pytest.raises(exc, match=match):
        jqx.quantize(linen_params, recipe)

"""QAT: clipped STE, LSQ gradients, convert bit-identity, Flax models, under jit."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import jqx
from jqx.training import qat

K, N = 32, 8  # one fixed weight shape for the property tests


def _weights(seed, scale=1.0):
    return jax.random.normal(jax.random.key(seed), (K, N), jnp.float32) * scale


# ----------------------------------------------------------------------------- STE


@functools.partial(jax.jit, static_argnums=0)
def _lsq_grads(recipe, w, s, z, up):
    """(dL/dw, dL/ds) of L = sum(fake_quant_lsq(w, s) * up); one compile per recipe."""
    return jax.grad(
        lambda w, s: jnp.sum(qat.fake_quant_weight_lsq(w, s, recipe, z) * up), argnums=(0, 1)
    )(w, s)


@settings(max_examples=10)
@given(seed=st.integers(0, 2**16), frac=st.floats(0.3, 0.9))
def test_clipped_ste_identity_inside_zero_outside(seed, frac):
    # int8 per-tensor with a fixed (LSQ) scale: the representable range is
    # [-128 s, 127 s]; weights beyond it are clamped and get no gradient.
    r = jqx.RTN(format="int8", granularity=jqx.per_tensor())
    w = _weights(seed, 3.0)
    s = (jnp.max(jnp.abs(w)) * frac / 127.0).reshape(1, 1)  # clamps the largest weights
    up = jax.random.normal(jax.random.key(seed + 1), (K, N))

    grad = _lsq_grads(r, w, s, None, up)[0]
    v = np.asarray(w) / float(s[0, 0])
    rounded = np.round(v)  # numpy rounds half to even, as jqx does
    inside = (rounded >= -128) & (rounded <= 127)
    assert (~inside).any() and inside.any()  # the draw exercises both branches
    np.testing.assert_array_equal(np.asarray(grad), np.where(inside, np.asarray(up), 0.0))


@pytest.mark.parametrize(
    "recipe",
    [
        jqx.int8_weight_only(),
        jqx.int4_weight_only(group_size=8),
        jqx.fp8_weight_only(),
        jqx.fp4_weight_only(group_size=8),
        jqx.nf4_weight_only(group_size=8),
    ],
    ids=lambda r: r.name,
)
def test_rtn_fake_quant_value_and_ste(recipe):
    w = _weights(0)
    fq = jax.jit(lambda w: qat.fake_quant_weight(w, recipe))
    ref = recipe.quantize_weight(w).dequantize()
    np.testing.assert_array_equal(np.asarray(fq(w)), np.asarray(ref))
    # Scale recomputed from the block's own max: nothing is clamped, the
    # gradient is the identity everywhere.
    up = jax.random.normal(jax.random.key(3), (K, N))
    g = jax.jit(jax.grad(lambda w: jnp.sum(qat.fake_quant_weight(w, recipe) * up)))(w)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(up))
    # and the fake value is within the format's error of the float weight
    fmt = recipe.fmt
    q = recipe.quantize_weight(w)
    step = np.asarray(q.dequantize() - w)
    gap = np.max(np.diff(np.array(fmt.values)))  # widest grid step
    bound = 0.5 * gap * float(jnp.max(q.scale))
    assert np.max(np.abs(step)) <= bound * (1 + 1e-6)


# ----------------------------------------------------------------------------- LSQ


def _round_to_grid(v, recipe):
    fmt = recipe.fmt
    if fmt.kind == "int":
        return np.round(v)
    if fmt.name == "fp8_e4m3":
        return np.clip(v, -fmt.max, fmt.max).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    vals = np.array(fmt.values, np.float64)
    idx = np.abs(v[..., None] - vals).argmin(-1)  # ties have measure zero in these draws
    return vals[idx]


@pytest.mark.parametrize(
    "recipe",
    [
        jqx.int8_weight_only(),
        jqx.int4_weight_only(group_size=8),
        jqx.fp8_weight_only(),
        jqx.fp4_weight_only(group_size=8),
    ],
    ids=lambda r: r.name,
)
@settings(max_examples=6)
@given(seed=st.integers(0, 2**16), shrink=st.floats(0.5, 1.5))
def test_lsq_scale_gradient_matches_formula(recipe, seed, shrink):
    w = _weights(seed)
    init = qat.init_scales({"k": {"kernel": w}}, recipe)["k/kernel"]
    s = init["scale"] * shrink  # < 1 clamps some weights, > 1 none
    z = init.get("zero_point")
    up = jax.random.normal(jax.random.key(seed + 7), (K, N))
    gs = _lsq_grads(recipe, w, s, z, up)[1]

    block = recipe.weight_granularity().resolve((K, N))
    nb = (K // block[0], N // block[1])
    sb = np.repeat(np.repeat(np.asarray(s, np.float64), block[0], 0), block[1], 1)
    zb = 0.0 if z is None else np.repeat(np.repeat(np.asarray(z), block[0], 0), block[1], 1)
    v = np.asarray(w, np.float64) / sb
    fmt = recipe.fmt
    lo = fmt.qmin if fmt.kind == "int" else -fmt.max
    hi = fmt.qmax if fmt.kind == "int" else fmt.max
    if fmt.kind == "int":
        r = np.round(v) + zb
        inside = (r >= lo) & (r <= hi)
        d = np.where(inside, np.round(v) - v, np.clip(r, lo, hi) - zb)
    else:
        inside = np.abs(v) <= hi
        d = np.where(inside, _round_to_grid(v, recipe) - v, np.sign(v) * hi)
    g = 1.0 / np.sqrt(block[0] * block[1] * hi)  # LSQ: 1 / sqrt(n * qmax)
    want = (np.asarray(up, np.float64) * d).reshape(nb[0], block[0], nb[1], block[1]).sum(
        (1, 3)
    ) * g
    np.testing.assert_allclose(np.asarray(gs), want, rtol=1e-4, atol=1e-5)


def test_lsq_grad_scale_formula():
    r = jqx.int4_weight_only(group_size=32)  # uint4: qmax 15
    assert qat.lsq_grad_scale(r, (32, 1)) == pytest.approx(1 / np.sqrt(32 * 15))


# ----------------------------------------------------------------------------- convert


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32)(x))
        return nn.Dense(4)(x)


def _mlp():
    m = MLP()
    x = jax.random.normal(jax.random.key(1), (256, 16))
    return m, m.init(jax.random.key(0), x), x


# The float model's forward, compiled once for the tests that bound against it.
_float_forward = jax.jit(lambda v, x: MLP().apply(v, x))


INT_RECIPES = [
    jqx.int8_weight_only(),
    jqx.int4_weight_only(group_size=8),
    jqx.int4_weight_only(group_size=8, scheme="absmax"),
]


@pytest.mark.parametrize("recipe", INT_RECIPES, ids=lambda r: f"{r.name}-{r.format}")
@pytest.mark.parametrize("lsq", [False, True])
def test_convert_bit_identical(recipe, lsq):
    m, v, x = _mlp()
    scales = qat.init_scales(v, recipe) if lsq else None
    if lsq:  # trained scales differ from RTN: perturb them
        scales = jax.tree.map(lambda s: s * 1.1, scales)
        scales = {
            p: {**e, "zero_point": e["zero_point"] / 1.1} if "zero_point" in e else e
            for p, e in scales.items()
        }
    f = qat.fake_quantized(m.apply, recipe, lsq=lsq)
    fake = jax.jit(f)(scales, v, x) if lsq else jax.jit(f)(v, x)
    q = qat.convert(v, recipe, scales)
    if not lsq:  # same codes and scales as plain PTQ
        ptq = jqx.quantize(v, recipe, prepack=False)  # convert keeps the plain layout
        for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(ptq), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the converted tree's quantized forward equals the fake forward bit for bit
    out = jax.jit(jqx.quantized(m.apply))(q, x)
    np.testing.assert_array_equal(np.asarray(fake), np.asarray(out))
    # and both are within quantization error of the float model
    ref = _float_forward(v, x)
    assert float(jnp.max(jnp.abs(fake - ref))) < 0.2 * float(jnp.max(jnp.abs(ref)))


@pytest.mark.parametrize(
    "recipe",
    [
        jqx.fp8_weight_only(),
        jqx.nf4_weight_only(group_size=8),
        jqx.fp4_weight_only(group_size=8),
        jqx.int8_dynamic_activation_int8_weight(),
        jqx.fp8_dynamic_activation_fp8_weight(),
    ],
    ids=lambda r: r.name,
)
def test_other_recipes_match_quantized_forward(recipe):
    # The fake forward runs jqx.ops on the converted QArray, so float, table
    # and activation-quantized recipes match jqx.quantized exactly too.
    m, v, x = _mlp()
    qa = recipe.act is not None
    fake = jax.jit(qat.fake_quantized(m.apply, recipe, quantize_activations=qa))(v, x)
    out = jax.jit(jqx.quantized(m.apply))(qat.convert(v, recipe), x)
    np.testing.assert_array_equal(np.asarray(fake), np.asarray(out))
    ref = _float_forward(v, x)
    assert float(jnp.max(jnp.abs(fake - ref))) < 0.2 * float(jnp.max(jnp.abs(ref)))


def test_activation_fake_quant_changes_forward_and_keeps_ste():
    m, v, x = _mlp()
    r = jqx.int8_weight_only()
    wo = qat.fake_quantized(m.apply, r)
    wa = qat.fake_quantized(m.apply, r, quantize_activations=True)
    a, b = jax.jit(wo)(v, x), jax.jit(wa)(v, x)
    assert float(jnp.max(jnp.abs(a - b))) > 0  # the activations really are quantized
    assert float(jnp.max(jnp.abs(a - b))) < 0.02 * float(jnp.max(jnp.abs(a)))
    # gradient w.r.t. the input of one matmul: STE through the activation
    # quantizer, i.e. the same as without it
    p = {"l": {"kernel": v["params"]["Dense_0"]["kernel"]}}

    def lin(p, x):
        return x @ p["l"]["kernel"]

    up = jax.random.normal(jax.random.key(5), (x.shape[0], 32))
    ga = jax.jit(jax.grad(lambda x: jnp.sum(qat.fake_quantized(lin, r)(p, x) * up)))(x)
    gb = jax.jit(
        jax.grad(
            lambda x: jnp.sum(qat.fake_quantized(lin, r, quantize_activations=True)(p, x) * up)
        )
    )(x)
    np.testing.assert_array_equal(np.asarray(ga), np.asarray(gb))


# ----------------------------------------------------------------------------- training


def _train(loss, params, steps, lr=3e-3):
    opt = optax.adam(lr)
    st_ = opt.init(params)

    @jax.jit
    def step(p, s):
        lv, g = jax.value_and_grad(loss)(p)
        with jax.numpy_dtype_promotion("standard"):  # optax's bias correction mixes int/float
            u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, lv

    for _ in range(steps):
        params, st_, lv = step(params, st_)
    return params, float(lv)


@pytest.mark.parametrize("lsq", [False, True])
def test_qat_recovers_ptq_loss_linen(lsq):
    # Fit a float MLP, quantize it to int4 g8 (RTN), then fine-tune with QAT:
    # the converted model's loss must recover part of the float-to-PTQ gap.
    # This MLP is tiny (two int4 groups per output column), so the recovery is
    # noisy step to step; the char LM example measures the real goal.
    m, v, x = _mlp()
    y = jnp.sin(x[:, :4] * 2.0)
    recipe = jqx.int4_weight_only(group_size=8, scheme="absmax")

    def mse(out):
        return jnp.mean((out - y) ** 2)

    v, _ = _train(lambda p: mse(m.apply(p, x)), v, 300, 1e-2)
    float_loss = float(mse(m.apply(v, x)))
    ptq_loss = float(mse(jqx.quantized(m.apply)(jqx.quantize(v, recipe), x)))

    f = qat.fake_quantized(m.apply, recipe, lsq=lsq)
    if lsq:
        tr = {"p": v, "s": qat.init_scales(v, recipe)}
        tr, _ = _train(lambda t: mse(f(t["s"], t["p"], x)), tr, 200, 1e-4)
        q = qat.convert(tr["p"], recipe, tr["s"])
    else:
        p, _ = _train(lambda p: mse(f(p, x)), v, 200, 1e-4)
        q = qat.convert(p, recipe)
    qat_loss = float(mse(jqx.quantized(m.apply)(q, x)))
    # measured: 34% (RTN) and 37% (LSQ) of the gap; require a quarter
    assert ptq_loss - qat_loss >= 0.25 * (ptq_loss - float_loss), (float_loss, ptq_loss, qat_loss)


def test_qat_nnx_model():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(16, 32, rngs=rngs)
            self.b = nnx.Linear(32, 4, rngs=rngs)

        def __call__(self, x):
            return self.b(nnx.relu(self.a(x)))

    gdef, state = nnx.split(Net(nnx.Rngs(0)))

    def apply(st_, x):
        return nnx.merge(gdef, st_)(x)

    x = jax.random.normal(jax.random.key(1), (16, 16))
    recipe = jqx.int8_weight_only()
    f = jax.jit(qat.fake_quantized(apply, recipe))
    out = f(state, x)
    want = jqx.quantized(apply)(qat.convert(state, recipe), x)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want))
    g = jax.grad(lambda s: f(s, x).sum())(state)
    gb = jax.jit(jax.grad(lambda s: apply(s, x).sum()))(state)
    # the STE gradient differs from the float one only through the quantized
    # forward activations: close, not equal
    ga, gfa = g["a"]["kernel"][...], gb["a"]["kernel"][...]
    assert float(jnp.max(jnp.abs(ga - gfa))) < 0.05 * float(jnp.max(jnp.abs(gfa)))


# ----------------------------------------------------------------------------- errors


def test_errors_name_the_fix():
    w = _weights(0)
    with pytest.raises(NotImplementedError, match="static activation scale"):
        qat.fake_quantized(lambda p: p, jqx.int8_static_activation_int8_weight())
    with pytest.raises(ValueError, match="init_scales"):
        qat.fake_quant_weight_lsq(w, jnp.ones((2, 2)), jqx.int8_weight_only())
    f = qat.fake_quantized(lambda p, x: x, jqx.int8_weight_only(), argnum=3)
    with pytest.raises(ValueError, match="argnum=3"):
        f({"k": {"kernel": w}}, 1.0)
    f = qat.fake_quantized(lambda p: p, jqx.int8_weight_only(), lsq=True)
    with pytest.raises(ValueError, match="init_scales"):
        f({}, {"k": {"kernel": w}})

"""jqx.ops.conv: quantized convolutions (conv kernel layout, W8A8 on int8 codes, the
dispatcher's choice, the interpreter and Flax routes, calibration, report labels)."""

from __future__ import annotations

import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

import jqx
from jqx.flax import linen as qnn
from jqx.flax import nnx as qnnx

DN = ("NHWC", "HWIO", "NHWC")
W8A8 = jqx.int8_dynamic_activation_int8_weight()
W8A8_TENSOR = jqx.int8_dynamic_activation_int8_weight(act_granularity="per_tensor")


def _x(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape)


def _float_conv(x, w, **kw):
    kw.setdefault("dimension_numbers", DN)
    return lax.conv_general_dilated(x, w, precision=lax.Precision.HIGHEST, **kw)


def _codes_reference(x, q, groups=1, per_sample=True, **kw):
    """The W8A8 product built independently from the codes: x rounded to int8 per
    sample (and per channel group) or per tensor, the integer window sums formed
    exactly by a float32 conv of the codes (partial sums stay below 2**24), then
    both scales."""
    c = x.shape[-1]
    xg = x.reshape(x.shape[:-1] + (groups, c // groups))
    axes = tuple(range(1, xg.ndim - 2)) + (xg.ndim - 1,) if per_sample else None
    amax = jnp.max(jnp.abs(xg), axis=axes, keepdims=True)
    s = jnp.where(amax == 0, 1.0, amax / 127.0)
    codes = jnp.clip(jnp.round(xg / s), -127, 127).reshape(x.shape)
    s = s.reshape(s.shape[:-2] + (groups,)) if per_sample else s.reshape((1,) * x.ndim)
    wc = q.codes().astype(jnp.float32)
    ws = q.scale.reshape(q.scale.shape[-2:])  # (G, O)
    cin = wc.shape[-2]
    y = 0.0
    for g in range(groups):
        sl = slice(g * cin // groups, (g + 1) * cin // groups)
        acc = _float_conv(codes[..., sl], wc[..., sl, :], **kw)
        y = y + acc * s[..., g : g + 1].reshape((s.shape[0],) + (1,) * (x.ndim - 1)) * ws[g]
    return y


# --------------------------------------------------------------------------- layout


def test_conv_kernel_per_output_channel_is_smaller_than_float():
    w = _x((3, 3, 1, 16))
    q = jqx.int8_weight_only().quantize_weight(w, path="params/Conv_0/kernel")
    assert q.block == (3, 3, 1, 1) and q.scale.shape == (1, 1, 1, 16)
    assert q.nbytes < w.size * 4  # 144 codes + 16 scales = 208 B < 576 B
    assert q.granularity == "per-channel(axis 3)"
    # The former layout (one scale per window position and output) was bigger than float.
    old = jqx.int8_weight_only(conv_kernels=False).quantize_weight(w, path="Conv_0/kernel")
    assert old.block == (1, 1, 1, 1) and old.nbytes > w.size * 4
    # Dense kernels, even 3-D ones, keep their layout.
    d = jqx.int8_weight_only().quantize_weight(_x((4, 2, 8)), path="params/Dense_0/kernel")
    assert d.block == (1, 2, 1)


def test_conv_kernel_group_wise_shares_scales_over_the_window():
    w = _x((3, 3, 16, 8))
    q = jqx.int4_weight_only(group_size=8).quantize_weight(w, path="encoder/conv1/kernel")
    assert q.block == (3, 3, 8, 1) and q.scale.shape == (1, 1, 2, 8)
    err = jnp.linalg.norm(q.dequantize() - w) / jnp.linalg.norm(w)
    assert float(err) < 0.12


def test_conv_kernels_switch():
    w = _x((3, 3, 4, 8))
    assert jqx.int8_weight_only(conv_kernels=True).quantize_weight(w, path="k").block == (
        3,
        3,
        4,
        1,
    )
    with pytest.raises(ValueError, match="conv_kernels='yes' is not supported"):
        jqx.int8_weight_only(conv_kernels="yes")


def test_group_size_error_says_which_layouts_work():
    p = {"params": {"Conv_1": {"kernel": _x((3, 3, 16, 32))}}}
    with pytest.raises(ValueError) as e:
        jqx.quantize(p, jqx.int4_weight_only(group_size=128))
    msg = str(e.value)
    assert "group_size=128" in msg and "params/Conv_1/kernel" in msg
    assert "groups its input channels" in msg and "must divide 16" in msg
    assert "1, 2, 4, 8 or group_size=None" in msg


# --------------------------------------------------------------------------- exact on codes


@pytest.mark.parametrize(
    "recipe, groups, per_sample, taps",
    [
        (W8A8, 1, True, False),
        (W8A8, 1, True, True),
        (W8A8_TENSOR, 1, False, True),
        (jqx.int8_dynamic_activation_int8_weight(group_size=4), 2, True, False),
    ],
    ids=["per-sample", "per-sample-taps", "per-tensor-taps", "groups-of-4"],
)
def test_w8a8_is_exact_on_the_codes(recipe, groups, per_sample, taps):
    x, w = _x((2, 6, 6, 8)), _x((3, 3, 8, 5), 1)
    q = recipe.quantize_weight(w, path="conv/kernel")
    kw = dict(window_strides=(1, 1), padding="SAME")
    taps_max = 10**6 if taps else 0
    with jqx.ops.policy(platform="cpu", native_available=False, conv_taps_max_in=taps_max):
        name = jqx.ops.explain_conv(x, q, dimension_numbers=DN, **kw)
        # Jitted (the policy is read at trace time, inside it): one program, not each op.
        y = jax.jit(lambda x, q: jqx.ops.conv_general_dilated(x, q, dimension_numbers=DN, **kw))(
            x, q
        )
    assert name == ("xla.conv_int8_taps" if taps and groups == 1 else "xla.conv_int8")
    ref = jax.jit(lambda x, q: _codes_reference(x, q, groups, per_sample, **kw))(x, q)
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6 * float(jnp.max(jnp.abs(ref))))
    # ...and close to the float convolution: both roundings are within half a step.
    full = _float_conv(x, w, **kw)
    assert float(jnp.max(jnp.abs(y - full)) / jnp.max(jnp.abs(full))) < 0.03


def test_static_scale_from_calibration_is_used():
    x, w = _x((2, 5, 5, 3)), _x((3, 3, 3, 4), 1)
    q = jqx.int8_static_activation_int8_weight().quantize_weight(w, path="conv/kernel")
    with pytest.raises(ValueError, match="never calibrated"):
        jqx.ops.conv_general_dilated(x, q, (1, 1), "VALID", dimension_numbers=DN)
    c = float(jnp.max(jnp.abs(x)))
    q = q.replace(act_scale=jnp.asarray([c / 127.0], jnp.float32))
    y = jqx.ops.conv_general_dilated(x, q, (1, 1), "VALID", dimension_numbers=DN)
    ref = _codes_reference(x, q, 1, False, window_strides=(1, 1), padding="VALID")
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6 * float(jnp.max(jnp.abs(ref))))


@pytest.mark.parametrize(
    "recipe, name, bound",
    [
        (jqx.int8_weight_only(), "xla.conv_dequantize", 0.02),
        (jqx.int4_weight_only(group_size=4), "xla.conv_dequantize", 0.15),
        (jqx.fp8_dynamic_activation_fp8_weight(), "xla.conv_decoded_f32", 0.1),
        (jqx.int8_dynamic_activation_int8_weight(conv_kernels=False), "xla.conv_simulated", 0.03),
        (jqx.llm_int8(), "xla.conv_dequantize", 0.02),
    ],
    ids=["int8-wo", "int4-g4", "fp8", "per-position-scales", "llm_int8"],
)
def test_other_kinds_bounded_against_float(recipe, name, bound):
    x, w = _x((2, 6, 6, 8)), _x((3, 3, 8, 5), 1)
    q = recipe.quantize_weight(w, path="conv/kernel")
    assert jqx.ops.explain_conv(x, q, (1, 1), "SAME", dimension_numbers=DN) == name
    y = jqx.ops.conv_general_dilated(x, q, (1, 1), "SAME", dimension_numbers=DN)
    full = _float_conv(x, w, window_strides=(1, 1), padding="SAME")
    assert float(jnp.max(jnp.abs(y - full)) / jnp.max(jnp.abs(full))) < bound
    if q.act is None:  # weight-only: the float conv of the dequantized kernel, exactly
        deq = _float_conv(x, q.dequantize(), window_strides=(1, 1), padding="SAME")
        np.testing.assert_allclose(y, deq, rtol=1e-5, atol=1e-5)


_CASES = st.fixed_dictionaries(
    {
        "layout": st.sampled_from(
            [("NHWC", "HWIO", "NHWC"), ("NCHW", "OIHW", "NCHW"), ("NHWC", "OIHW", "NCHW")]
        ),
        "strides": st.sampled_from([(1, 1), (2, 1)]),
        "padding": st.sampled_from(["SAME", "VALID", ((1, 0), (2, 1))]),
        "lhs_dilation": st.sampled_from([(1, 1), (2, 2)]),
        "rhs_dilation": st.sampled_from([(1, 1), (1, 2)]),
        "fgc": st.sampled_from([1, 2]),
        "recipe": st.sampled_from(["w8a8", "w8a8_tensor", "int8_wo", "fp8"]),
        "seed": st.integers(0, 3),
    }
)


@settings(max_examples=5)
@given(_CASES)
def test_property_matches_float_conv_of_quantized_operands(c):
    """Every layout, stride, padding, dilation and feature grouping: the quantized conv
    equals the float conv of the dequantized kernel and (for W8A8) the quantize-
    dequantized input, within float32 rounding of the window sums."""
    lhs_l, rhs_l, out_l = c["layout"]
    fgc = c["fgc"]
    x = _x((2, 7, 6, 4), c["seed"])  # NHWC
    w = _x((3, 2, 4 // fgc, 6), c["seed"] + 1)  # HWIO
    x_in = x if lhs_l == "NHWC" else jnp.transpose(x, (0, 3, 1, 2))
    w_in = w if rhs_l == "HWIO" else jnp.transpose(w, (3, 2, 0, 1))
    recipe = {
        "w8a8": W8A8,
        "w8a8_tensor": W8A8_TENSOR,
        "int8_wo": jqx.int8_weight_only(),
        "fp8": jqx.fp8_dynamic_activation_fp8_weight(act_granularity="per_tensor"),
    }[c["recipe"]]
    # Per output channel in the stored layout: the conv layout of a kernel stored OIHW.
    out_axis = rhs_l.index("O")
    q = recipe.replace(granularity=jqx.per_channel(out_axis)).quantize_weight(w_in)
    kw = dict(
        window_strides=c["strides"],
        padding=c["padding"],
        lhs_dilation=c["lhs_dilation"],
        rhs_dilation=c["rhs_dilation"],
        dimension_numbers=(lhs_l, rhs_l, out_l),
        feature_group_count=fgc,
    )
    if isinstance(kw["padding"], str) and kw["lhs_dilation"] != (1, 1):
        with pytest.raises(ValueError, match="String padding is not implemented"):
            jqx.ops.conv_general_dilated(x_in, q, **kw)
        kw["padding"] = ((1, 1), (0, 2))

    # Jitted: each example is a new conv configuration, one program instead of each
    # eager op compiled on its own.
    @jax.jit
    def run(x_in, q):
        y = jqx.ops.conv_general_dilated(x_in, q, **kw)
        xd = x_in
        if q.act is not None:
            fmt = q.act.format
            n_axis = 0
            axes = (
                None
                if q.act.granularity == "per_tensor"
                else tuple(a for a in range(4) if a != n_axis)
            )
            s = jqx.core.numerics.absmax_scale(x_in, axes, fmt)
            codes, _ = jqx.core.numerics.quantize_activation(x_in, fmt, scale=s)
            xd = jqx.core.formats.decode(codes, fmt) * s
        ref = lax.conv_general_dilated(xd, q.dequantize(), precision=lax.Precision.HIGHEST, **kw)
        return y, ref

    y, ref = run(x_in, q)
    assert y.shape == ref.shape
    tol = 2e-5 * float(jnp.max(jnp.abs(ref))) + 1e-6
    assert float(jnp.max(jnp.abs(y - ref))) <= tol


# --------------------------------------------------------------------------- dispatch


def test_dispatch_and_backends():
    x, w = _x((1, 4, 4, 2)), _x((3, 3, 2, 3), 1)
    q = W8A8.quantize_weight(w, path="conv/kernel")
    with jqx.ops.policy(platform="cpu", native_available=False):
        assert jqx.ops.explain_conv(x, q, (1, 1), "SAME", dimension_numbers=DN) == (
            "xla.conv_int8_taps"
        )
    with jqx.ops.policy(platform="cuda"):  # CPU measurements never apply elsewhere
        assert jqx.ops.explain_conv(x, q, (1, 1), "SAME", dimension_numbers=DN) == "xla.conv_int8"
    with jqx.ops.policy(native_available=False, platform="cpu"):
        with pytest.raises(RuntimeError, match="backend='native'"):
            jqx.ops.conv_general_dilated(
                x, q, (1, 1), "SAME", dimension_numbers=DN, backend="native"
            )
    with pytest.raises(ValueError, match="backend='gpu' is not supported"):
        jqx.ops.conv_general_dilated(x, q, (1, 1), "SAME", dimension_numbers=DN, backend="gpu")
    assert jqx.ops.explain_conv(x, w, (1, 1), "SAME", dimension_numbers=DN) == (
        "lax.conv_general_dilated"
    )
    with pytest.raises(ValueError, match="has 3 dims but the input"):
        jqx.ops.conv_general_dilated(x, W8A8.quantize_weight(w[0]), (1,), "SAME")


# --------------------------------------------------------------------------- native kernel


def _need_native_conv():
    from jqx.kernels.cpu import native  # noqa: PLC0415

    if jax.default_backend() != "cpu" or not native.conv_available():
        pytest.skip(
            "the native int8 conv kernel (jqx/kernels/cpu/conv_int8.cc) cannot run here: "
            + (native.conv_status() if jax.default_backend() == "cpu" else "not on CPU")
            + " (it needs an x86-64 CPU with AVX2 and a C++17 compiler)"
        )


def _static(q, scale):
    r = jqx.int8_static_activation_int8_weight()
    return r.quantize_weight(q, path="conv/kernel").replace(
        act_scale=jnp.asarray([scale], jnp.float32)
    )


@pytest.mark.parametrize(
    "x_shape, w_shape, kw",
    [
        ((2, 6, 6, 8), (3, 3, 8, 5), {}),
        ((3, 7, 9, 1), (3, 3, 1, 16), {}),  # one input channel (padded to a pair)
        ((2, 7, 9, 3), (3, 2, 3, 20), dict(window_strides=(2, 1), padding="VALID")),
        (
            (2, 9, 9, 4),
            (3, 3, 4, 17),
            dict(window_strides=(1, 2), padding=((2, 0), (1, 3)), rhs_dilation=(2, 1)),
        ),
        ((4, 10, 3), (3, 3, 7), dict(window_strides=(1,), dimension_numbers=("NWC", "WIO", "NWC"))),
        ((2, 3, 6, 6), (3, 3, 3, 5), dict(dimension_numbers=("NCHW", "HWIO", "NCHW"))),
    ],
    ids=["same", "one-channel", "strided-valid", "pads-dilation", "1d", "nchw"],
)
@pytest.mark.parametrize("act", ["per-sample", "per-tensor", "static"])
def test_native_conv_is_bit_identical_to_xla(x_shape, w_shape, kw, act):
    """The native kernel forms the same codes, exact int32 sums and the same rescale
    as xla.conv_int8: identical floats, not merely close."""
    _need_native_conv()
    kw = {"window_strides": (1,) * (len(x_shape) - 2), "padding": "SAME", **kw}
    kw.setdefault("dimension_numbers", DN)
    x, w = 3.0 * _x(x_shape), _x(w_shape, 1)
    if act == "static":  # a small scale: codes clip at -128 and 127
        q = _static(w, 0.5 * float(jnp.max(jnp.abs(x))) / 127.0)
    else:
        q = (W8A8 if act == "per-sample" else W8A8_TENSOR).quantize_weight(w, path="conv/kernel")

    def f(backend):
        return jax.jit(lambda x, q: jqx.ops.conv_general_dilated(x, q, backend=backend, **kw))

    assert jqx.ops.explain_conv(x, q, backend="native", **kw) == "native.conv_int8"
    y, ref = f("native")(x, q), f("xla")(x, q)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    np.testing.assert_array_equal(y, ref)


@pytest.mark.parametrize("act", ["per-sample", "per-tensor", "static"])
def test_nan_in_a_sample_is_kept_by_every_activation_scale(act):
    """A NaN in one image: its outputs are NaN under every activation scale (a static
    scale becomes NaN for that sample, numerics.keep_nan_rows; int8 codes cannot carry
    it), the other images' stay finite (but per tensor, where the one scale is inf),
    on XLA's path and in the native kernel alike."""
    kw = {"window_strides": (1, 1), "padding": "SAME", "dimension_numbers": DN}
    x, w = 3.0 * _x((3, 6, 6, 8)), _x((3, 3, 8, 5), 1)
    x = x.at[1, 2, 3, 4].set(jnp.nan)
    if act == "static":
        q = _static(w, 0.05)
    else:
        q = (W8A8 if act == "per-sample" else W8A8_TENSOR).quantize_weight(w, path="conv/kernel")
    ys = {}
    for backend in ("xla", "native"):
        if backend == "native":
            _need_native_conv()
        f = jax.jit(lambda x, q, b=backend: jqx.ops.conv_general_dilated(x, q, backend=b, **kw))
        ys[backend] = np.asarray(f(x, q))
        y = ys[backend]
        assert np.isnan(y[1]).all()
        assert np.isfinite(y[[0, 2]]).all() == (act != "per-tensor")
    np.testing.assert_array_equal(ys["native"], ys["xla"])


def test_native_conv_dispatch():
    x, w = _x((64, 8, 8, 16)), _x((3, 3, 16, 32), 1)
    q = W8A8.quantize_weight(w, path="conv/kernel")
    args = ((1, 1), "SAME")
    with jqx.ops.policy(platform="cpu", native_available=True):
        assert jqx.ops.explain_conv(x, q, *args, dimension_numbers=DN) == "native.conv_int8"
        assert jqx.ops.explain_conv(x, q, *args, dimension_numbers=DN, backend="xla") == (
            "xla.conv_int8"
        )
        # Grouped convs and input dilation are not the kernel's: XLA, even when asked.
        grouped = W8A8.quantize_weight(_x((3, 3, 8, 32), 1), path="conv/kernel")
        assert jqx.ops.explain_conv(
            x, grouped, *args, dimension_numbers=DN, feature_group_count=2, backend="native"
        ) == ("xla.conv_int8")
        assert jqx.ops.explain_conv(
            x, q, (1, 1), ((1, 1), (1, 1)), (2, 2), dimension_numbers=DN, backend="native"
        ) == ("xla.conv_int8")
        # Weight-only kernels have no int8 activations to convolve.
        wo = jqx.int8_weight_only().quantize_weight(w, path="conv/kernel")
        assert jqx.ops.explain_conv(x, wo, *args, dimension_numbers=DN) == "xla.conv_dequantize"
    with jqx.ops.policy(platform="cpu", native_available=True, conv_native_min_work=1 << 40):
        assert jqx.ops.explain_conv(x, q, *args, dimension_numbers=DN) == "xla.conv_int8"
    with jqx.ops.policy(platform="cuda", native_available=True):
        assert jqx.ops.explain_conv(x, q, *args, dimension_numbers=DN) == "xla.conv_int8"
    with jqx.ops.policy(platform="cpu", native_available=False):
        assert jqx.ops.explain_conv(x, q, *args, dimension_numbers=DN) == "xla.conv_int8"
        with pytest.raises(RuntimeError, match=r"backend='native'.*native_available=False"):
            jqx.ops.explain_conv(x, q, *args, dimension_numbers=DN, backend="native")


def test_native_conv_in_a_model_matches_xla(cnn):
    """The digits-sized CNN through jqx.quantized: the native path gives the XLA
    path's logits exactly, dynamic and calibrated static."""
    _need_native_conv()
    m, v = cnn
    x = _x((4, 8, 8, 1))
    for q in (
        jqx.quantize(v, W8A8),
        jqx.calibrate(m.apply, v, [x], jqx.int8_static_activation_int8_weight(), progress=False),
    ):
        # A policy is read at trace time: a fresh wrapper per policy.
        with jqx.ops.policy(native_available=False):
            ref = jax.jit(jqx.quantized(m.apply))(q, x)
        with jqx.ops.policy(conv_native_min_work=0):
            fwd = jqx.quantized(m.apply)
            assert "ffi_call" in str(jax.make_jaxpr(fwd)(q, x))
            y = jax.jit(fwd)(q, x)
        np.testing.assert_array_equal(y, ref)


# --------------------------------------------------------------------------- models


class _CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.relu(nn.Conv(8, (3, 3), strides=2, feature_group_count=2)(x))
        x = nn.ConvTranspose(4, (3, 3), strides=(2, 2))(x)
        x = nn.ConvTranspose(4, (3, 3), strides=(2, 2), transpose_kernel=True)(x)
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


@pytest.fixture(scope="module")
def cnn():
    """The CNN and its parameters, initialised once and jitted (an eager init
    compiles each op of each layer on its own); they do not depend on the batch."""
    m = _CNN()
    return m, jax.jit(m.init)(jax.random.key(1), jnp.zeros((1, 8, 8, 1)))


def _int32_convs(fn, *args) -> int:
    jaxpr = jax.make_jaxpr(fn)(*args)
    return str(jaxpr).count("preferred_element_type=int32")


def test_quantized_cnn_runs_int8_convs_and_calibrates(cnn):
    m, v = cnn
    x = _x((2, 8, 8, 1))
    y_f = jax.jit(m.apply)(v, x)
    q = jqx.quantize(v, W8A8)
    fwd = jqx.quantized(m.apply)
    # Conv_0 runs as taps (one int8 dot per window position), the rest as int8 convs
    # (on XLA: the native kernel is one custom call).
    with jqx.ops.policy(native_available=False):
        assert _int32_convs(fwd, q, x) >= 4
    qs = jqx.calibrate(m.apply, v, [x], jqx.int8_static_activation_int8_weight(), progress=False)
    # Conv_0's input is the image itself: its scale is max|x| / 127.
    c0 = qs["params"]["Conv_0"]["kernel"].act_scale
    np.testing.assert_allclose(c0, [float(jnp.max(jnp.abs(x))) / 127.0], rtol=1e-6)
    assert all(qs["params"][k]["kernel"].act_scale is not None for k in qs["params"])
    y_s = jax.jit(fwd)(qs, x)
    assert float(jnp.max(jnp.abs(y_s - y_f)) / jnp.max(jnp.abs(y_f))) < 0.05


def test_flax_adapters():
    x = _x((2, 6, 6, 3))
    conv = qnn.Conv(4, (3, 3))
    v = conv.init(jax.random.key(0), x)
    qv = jqx.quantize(v, W8A8.replace(conv_kernels=True))
    ref = jqx.quantized(nn.Conv(4, (3, 3)).apply)(qv, x)
    np.testing.assert_allclose(conv.apply(qv, x), ref, rtol=1e-6, atol=1e-6)
    with jqx.ops.policy(native_available=False):  # XLA's formulation (the native one is a call)
        assert _int32_convs(conv.apply, qv, x) >= 1  # 3 input channels: one int8 dot per tap
    m = qnnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0))
    gdef, state = nnx.split(m)
    qs = jqx.quantize(state, W8A8.replace(conv_kernels=True))
    y = nnx.merge(gdef, qs)(x)
    y_f = m(x)
    assert float(jnp.max(jnp.abs(y - y_f)) / jnp.max(jnp.abs(y_f))) < 0.03


def test_report_says_what_runs():
    p = {
        "Conv_0": {"kernel": _x((3, 3, 2, 4))},
        "Dense_0": {"kernel": _x((8, 4))},
    }
    x = _x((1, 5, 5, 2))
    cases = {
        "dynamic:int8": W8A8,
        "dynamic:int8 simulated (float conv)": W8A8.replace(conv_kernels=False),
        "dynamic:fp8_e4m3 (f32 conv of codes)": jqx.fp8_dynamic_activation_fp8_weight(),
        "llm_int8:int8 not applied (float conv, dequantized kernel)": jqx.llm_int8(),
        "-": jqx.int8_weight_only(),
    }
    runs = {
        "dynamic:int8": ("xla.conv_int8_taps", "xla.conv_int8"),
        "dynamic:int8 simulated (float conv)": ("xla.conv_simulated",),
        "dynamic:fp8_e4m3 (f32 conv of codes)": ("xla.conv_decoded_f32",),
        "llm_int8:int8 not applied (float conv, dequantized kernel)": ("xla.conv_dequantize",),
        "-": ("xla.conv_dequantize",),
    }
    for label, r in cases.items():
        q = jqx.quantize(p, r)
        layers = {lr.path: lr.act for lr in jqx.report(p, q).layers}
        assert layers["Conv_0/kernel"] == label
        assert (
            not layers["Dense_0/kernel"].startswith(label)
            or label in ("-",)
            or (label == "dynamic:int8")
        )
        k = q["Conv_0"]["kernel"]
        with jqx.ops.policy(native_available=False):  # the XLA names (native: test_native_*)
            name = jqx.ops.explain_conv(x, k, (1, 1), "SAME", dimension_numbers=DN)
        assert name in runs[label]


def test_trained_digits_cnn_keeps_its_accuracy():
    pytest.importorskip("sklearn")
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
    from train_digits_cnn import accuracy, train

    with jax.numpy_dtype_promotion("standard"):  # optax's bias correction mixes int/float
        model, params, (_, _, x_te, y_te) = train(epochs=4)
    acc_f = accuracy(jax.jit(model.apply), params, x_te, y_te)
    assert acc_f > 80.0
    qfwd = jax.jit(jqx.quantized(model.apply))
    for r in (jqx.int8_weight_only(), W8A8):
        acc_q = accuracy(qfwd, jqx.quantize(params, r), x_te, y_te)
        assert abs(acc_q - acc_f) <= 1.5, (r.name, acc_q, acc_f)

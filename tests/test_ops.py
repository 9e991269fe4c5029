"""jqx.ops.dot_general: every path against lax.dot_general on the dequantized
weight (weight-only: tight) and against the float product (W8A8: the bound
from the activation rounding error)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _gelu_check import assert_gelu_tanh_within_bound, assert_gelu_within_bound
from hypothesis import given
from hypothesis import strategies as st
from jax import lax

import jqx
from jqx.kernels.cpu import native

DN = (((1,), (0,)), ((), ()))
K, N, M = 64, 32, 5
HI = lax.Precision.HIGHEST


def _w(seed=0, shape=(K, N)):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _x(seed=1, shape=(M, K)):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _ref(x, w_hat, dn=DN):
    return lax.dot_general(x, w_hat, dn, precision=HI)


def _tight(x, w_hat, dn=DN):
    """f32 rounding bound for a K-term dot: a few ulps of sum |x| |w|."""
    mag = lax.dot_general(jnp.abs(x), jnp.abs(w_hat), dn, precision=HI)
    return 1e-5 * mag + 1e-6


WEIGHT_ONLY = {
    "int8": jqx.int8_weight_only(),
    "int8_g16": jqx.int8_weight_only(group_size=16),
    "uint4_g16": jqx.int4_weight_only(group_size=16),
    "int4_absmax_perchannel": jqx.int4_weight_only(group_size=None, scheme="absmax"),
    "fp8_e4m3": jqx.fp8_weight_only(),
    "fp8_e5m2": jqx.fp8_weight_only("e5m2"),
    "fp4_e2m1": jqx.fp4_weight_only("e2m1"),
    "fp4_e1m2": jqx.fp4_weight_only("e1m2"),
    "fp4_e3m0": jqx.fp4_weight_only("e3m0", group_size=16),
    "nf4": jqx.nf4_weight_only(group_size=16),
    "bf16": jqx.weight_only("bf16"),
    "fp16": jqx.weight_only("fp16"),
}


@pytest.mark.parametrize("name", list(WEIGHT_ONLY))
def test_weight_only_matches_dequantized(name):
    q = WEIGHT_ONLY[name].quantize_weight(_w())
    x = _x()
    w_hat = q.dequantize()
    for xx in (x, x[:1]):
        y = jax.jit(lambda a, b: jqx.ops.dot_general(a, b, DN))(xx, q)
        assert y.dtype == jnp.float32 and y.shape == (xx.shape[0], N)
        assert np.all(np.abs(y - _ref(xx, w_hat)) <= _tight(xx, w_hat)), name


def test_weight_only_bf16_activations():
    q = jqx.int8_weight_only().quantize_weight(_w())
    x = _x().astype(jnp.bfloat16)
    y = jqx.ops.dot_general(x, q, DN)
    assert y.dtype == jnp.bfloat16
    ref = _ref(x.astype(jnp.float32), q.dequantize())
    # one bf16 rounding of the output
    assert np.all(np.abs(y.astype(jnp.float32) - ref) <= 2**-8 * np.abs(ref) + 1e-5)
    y32 = jqx.ops.dot_general(x, q, DN, preferred_element_type=jnp.float32)
    assert y32.dtype == jnp.float32
    assert np.all(np.abs(y32 - ref) <= _tight(x.astype(jnp.float32), q.dequantize()))


def _dn_cases():
    """(x shape, weight shape, dimension numbers, weight is lhs)."""
    return [
        ((M, K), (K, N), DN, False),  # x @ W
        ((M, K), (N, K), (((1,), (1,)), ((), ())), False),  # x @ W.T (tied embedding)
        ((M, K), (K, N), (((0,), (1,)), ((), ())), True),  # W on the lhs: W^T-contract
        ((3, M, K), (3, K, N), (((2,), (1,)), ((0,), (0,))), False),  # einsum bmk,bkn->bmn
        ((2, M, K), (K, N), (((2,), (0,)), ((), ())), False),  # leading batch of rows
    ]


@pytest.mark.parametrize("case", range(5))
@pytest.mark.parametrize("recipe", ["int8", "uint4_g16", "nf4"])
def test_dimension_numbers(case, recipe):
    xs, ws, dn, w_lhs = _dn_cases()[case]
    w = _w(shape=ws)
    r = WEIGHT_ONLY[recipe]
    if ws == (N, K):  # contraction on the last axis: group along it
        r = r.replace(axis=-1)
    q = r.quantize_weight(w)
    x = _x(shape=xs)
    w_hat = q.dequantize()
    if w_lhs:
        y = jqx.ops.dot_general(q, x, dn)
        ref = lax.dot_general(w_hat, x, dn, precision=HI)
        bound = 1e-5 * lax.dot_general(jnp.abs(w_hat), jnp.abs(x), dn, precision=HI) + 1e-6
    else:
        y = jqx.ops.dot_general(x, q, dn)
        ref = _ref(x, w_hat, dn)
        bound = _tight(x, w_hat, dn)
    assert y.shape == ref.shape
    assert np.all(np.abs(y - ref) <= bound)


def _int8_act_bound(x, w_hat, s_row):
    """|x - x_hat| <= s/2 per element, so |y - x @ w_hat| <= s/2 * sum_k |w_hat|."""
    return (s_row / 2) * jnp.sum(jnp.abs(w_hat), axis=0, keepdims=True) * 1.001 + _tight(x, w_hat)


def test_w8a8_int8_dynamic_bound_and_int32_dot():
    q = jqx.int8_dynamic_activation_int8_weight().quantize_weight(_w())
    x = _x()
    w_hat = q.dequantize()
    for xx in (x, x[:1]):
        y = jqx.ops.dot_general(xx, q, DN)
        s = jnp.max(jnp.abs(xx), axis=1, keepdims=True) / 127
        assert np.all(np.abs(y - _ref(xx, w_hat)) <= _int8_act_bound(xx, w_hat, s))
    jaxpr = str(jax.make_jaxpr(lambda a: jqx.ops.dot_general(a, q, DN))(x))
    assert "preferred_element_type=int32" in jaxpr
    # and it is not exact: the activations really were quantized
    assert float(jnp.max(jnp.abs(jqx.ops.dot_general(x, q, DN) - _ref(x, w_hat)))) > 1e-4


def test_w8a8_many_rows_bf16_dot_equals_int32_dot():
    """>= 1024 rows run the int8 codes through a bf16 x bf16 -> f32 dot; the
    products are exact, so it must equal the int32 path bit for bit."""
    k, n, m = 384, 64, 1024
    w = jax.random.normal(jax.random.key(3), (k, n), jnp.float32)
    q = jqx.int8_dynamic_activation_int8_weight().quantize_weight(w)
    x = jax.random.normal(jax.random.key(4), (m, k), jnp.float32)
    x = x.at[:, :3].multiply(40.0)  # push some activation codes to +-127
    # XLA only (the native kernel: below); the policy measured on CPU.
    with jqx.ops.policy(platform="cpu"):
        f = jax.jit(lambda a: jqx.ops.dot_general(a, q, DN, backend="xla"))
        y_bf16 = f(x)
        assert "bf16" in str(jax.make_jaxpr(f)(x))
    with jqx.ops.policy(platform="cpu", w8a8_bf16_min_rows=10**9):
        g = jax.jit(lambda a: jqx.ops.dot_general(a, q, DN, backend="xla"))
        assert "preferred_element_type=int32" in str(jax.make_jaxpr(g)(x))
        y_int32 = g(x)
    np.testing.assert_array_equal(np.asarray(y_bf16), np.asarray(y_int32))
    w_hat = q.dequantize()
    s = jnp.max(jnp.abs(x), axis=1, keepdims=True) / 127
    assert np.all(np.abs(y_bf16 - _ref(x, w_hat)) <= _int8_act_bound(x, w_hat, s))


@pytest.mark.skipif(not native.available(), reason=f"native int8 GEMM: {native.status()}")
def test_w8a8_many_rows_native_kernel_equals_int32_dot():
    """On a CPU with AVX512-VNNI, big enough products go to jqx.native's int8
    GEMM (exact int32 sums), also for a 3-D activation contracted on its last
    axis and on a middle axis; it must equal the XLA int32 path bit for bit."""
    k, n = 100, 80  # K not a multiple of 4, N not of 16
    w = jax.random.normal(jax.random.key(5), (k, n), jnp.float32)
    q = jqx.int8_dynamic_activation_int8_weight().quantize_weight(w)
    x = jax.random.normal(jax.random.key(6), (4, 300, k), jnp.float32).at[..., :3].multiply(40.0)
    with jqx.ops.policy(native_min_work=1 << 23):  # 1200 x 100 x 80 passes
        for xx, dn in [
            (x, (((2,), (0,)), ((), ()))),
            (jnp.swapaxes(x, 1, 2), (((1,), (0,)), ((), ()))),
        ]:
            with jqx.ops.policy(w8a8_bf16_min_rows=10**9):
                g = jax.jit(lambda a, dn=dn: jqx.ops.dot_general(a, q, dn, backend="xla"))
                assert native.TARGET not in str(jax.make_jaxpr(g)(xx))
                want = np.asarray(g(xx))
            # The default: the VNNI kernel quantizes the activations itself; backend
            # "native": the plain GEMM on the codes XLA made. Both equal XLA's path.
            for backend, target in ((None, native.W8A8_VNNI_TARGET), ("native", native.TARGET)):
                f = jax.jit(lambda a, dn=dn, b=backend: jqx.ops.dot_general(a, q, dn, backend=b))
                assert target in str(jax.make_jaxpr(f)(xx))
                np.testing.assert_array_equal(np.asarray(f(xx)), want)
        # Small products keep XLA's int32 dot.
        h = jax.jit(lambda a: jqx.ops.dot_general(a, q, DN))
        assert native.TARGET not in str(jax.make_jaxpr(h)(x[0]))


@pytest.mark.skipif(not native.available(), reason=f"native int8 GEMM: {native.status()}")
def test_decode_rows_native_kernel_equals_int32_dot():
    """Up to 6 rows the kernel reads the weight in place, so it is used from
    2^18 weight elements on: W8A8 and int8 weight-only (two-level split, 2 x rows)
    equal the XLA int32 path bit for bit; one row more stays on XLA."""
    k, n = 515, 520  # K odd, N not a multiple of 64: K * N >= 2^18
    w = jax.random.normal(jax.random.key(7), (k, n), jnp.float32)
    for recipe, max_rows in (
        (jqx.int8_dynamic_activation_int8_weight(), 6),
        (jqx.int8_weight_only(), 3),  # its two levels double the rows
    ):
        q = recipe.quantize_weight(w)
        for rows in (1, max_rows):
            x = jax.random.normal(jax.random.key(rows), (rows, k), jnp.float32)
            f = jax.jit(lambda a, q=q: jqx.ops.dot_general(a, q, DN))
            assert native.TARGET in str(jax.make_jaxpr(f)(x))
            # the same split on XLA
            with jqx.ops.policy(w8a8_bf16_min_rows=10**9, two_level_min_weight=0):
                g = jax.jit(lambda a, q=q: jqx.ops.dot_general(a, q, DN, backend="xla"))
                np.testing.assert_array_equal(np.asarray(f(x)), np.asarray(g(x)))
        x_more = jnp.ones((max_rows + 1, k), jnp.float32)
        h = jax.jit(lambda a, q=q: jqx.ops.dot_general(a, q, DN))
        assert native.TARGET not in str(jax.make_jaxpr(h)(x_more))


@pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.status()}")
@pytest.mark.parametrize(
    "name,recipe",
    [
        ("uint4_g128", jqx.int4_weight_only(group_size=128)),
        ("int4_absmax_perchannel", jqx.int4_weight_only(group_size=None, scheme="absmax")),
        ("nf4_g64", jqx.nf4_weight_only(group_size=64)),
        ("fp4_g32", jqx.fp4_weight_only(group_size=32)),
    ],
)
def test_w4_decode_rows_take_native_kernel(name, recipe):
    """Activations with <= 16 rows and a packed 4-bit weight of >= 2^18 elements go
    to jqx.native's w4 kernel: within f32 rounding of x @ dequantize(W), also for a
    3-D activation, one contracted on a middle axis and bf16 (widened to f32);
    17 rows stay on XLA."""
    k, n = 512, 520
    w = jax.random.normal(jax.random.key(11), (k, n), jnp.float32)
    q = recipe.quantize_weight(w)
    w_hat = q.dequantize()
    x = jax.random.normal(jax.random.key(12), (3, 4, k), jnp.float32)
    for xx, dn in [
        (x[0, :1], DN),
        (x, (((2,), (0,)), ((), ()))),
        (jnp.swapaxes(x, 1, 2), (((1,), (0,)), ((), ()))),
    ]:
        f = jax.jit(lambda a, dn=dn: jqx.ops.dot_general(a, q, dn))
        assert native.W4_TARGET in str(jax.make_jaxpr(f)(xx))
        y = f(xx)
        assert np.all(np.abs(y - _ref(xx, w_hat, dn)) <= _tight(xx, w_hat, dn))
        g = jax.jit(lambda a, dn=dn: jqx.ops.dot_general(a, q, dn, backend="xla"))
        assert native.W4_TARGET not in str(jax.make_jaxpr(g)(xx))
    h = jax.jit(lambda a: jqx.ops.dot_general(a, q, DN))
    assert native.W4_TARGET not in str(jax.make_jaxpr(h)(jnp.ones((17, k))))
    # bf16 activations are widened to f32: a bf16 result of the f32 product.
    xb = x[0, :2].astype(jnp.bfloat16)
    assert native.W4_TARGET in str(jax.make_jaxpr(h)(xb))
    yb = h(xb)
    assert yb.dtype == jnp.bfloat16
    ref = _ref(xb.astype(jnp.float32), w_hat)
    bound = _tight(xb.astype(jnp.float32), w_hat) + 2.0**-8 * jnp.abs(ref)  # one bf16 rounding
    assert np.all(np.abs(yb.astype(jnp.float32) - ref) <= bound)


@given(st.integers(0, 2**31 - 1), st.floats(0.01, 100.0))
def test_w8a8_int8_property(seed, scale):
    q = jqx.int8_dynamic_activation_int8_weight().quantize_weight(_w())
    x = _x() * scale + jax.random.normal(jax.random.key(seed), (M, K)) * scale
    w_hat = q.dequantize()
    y = jqx.ops.dot_general(x, q, DN)
    s = jnp.max(jnp.abs(x), axis=1, keepdims=True) / 127
    assert np.all(np.abs(y - _ref(x, w_hat)) <= _int8_act_bound(x, w_hat, s))


def test_w8a8_per_tensor_granularity():
    q = jqx.int8_dynamic_activation_int8_weight(act_granularity="per_tensor").quantize_weight(_w())
    x = _x()
    w_hat = q.dequantize()
    s = jnp.max(jnp.abs(x)) / 127
    y = jqx.ops.dot_general(x, q, DN)
    assert np.all(np.abs(y - _ref(x, w_hat)) <= _int8_act_bound(x, w_hat, s))


def test_w8a8_fp8_bound():
    q = jqx.fp8_dynamic_activation_fp8_weight().quantize_weight(_w())
    x = _x()
    w_hat = q.dequantize()
    y = jqx.ops.dot_general(x, q, DN)
    s = jnp.max(jnp.abs(x), axis=1, keepdims=True) / 448
    # E4M3: half an ulp is 2^-4 relative for normals, 2^-10 * s for subnormals
    err_x = 2.0**-4 * jnp.abs(x) + 2.0**-10 * s
    bound = lax.dot_general(err_x, jnp.abs(w_hat), DN, precision=HI) * 1.001 + _tight(x, w_hat)
    assert np.all(np.abs(y - _ref(x, w_hat)) <= bound)


def test_static_activation_scale():
    q = jqx.int8_static_activation_int8_weight().quantize_weight(_w())
    x = _x()
    with pytest.raises(ValueError, match="jqx.calibrate"):
        jqx.ops.dot_general(x, q, DN)
    amax = jnp.max(jnp.abs(x))
    q = q.replace(act_scale=(amax / 127).reshape(1))
    y = jqx.ops.dot_general(x, q, DN)
    w_hat = q.dequantize()
    assert np.all(np.abs(y - _ref(x, w_hat)) <= _int8_act_bound(x, w_hat, amax / 127))
    # a scale calibrated too small clips: the error grows beyond the bound
    q_small = q.replace(act_scale=(amax / 127 / 4).reshape(1))
    y2 = jqx.ops.dot_general(x, q_small, DN)
    assert float(jnp.max(jnp.abs(y2 - _ref(x, w_hat)))) > float(
        jnp.max(jnp.abs(y - _ref(x, w_hat)))
    )


def test_llm_int8_outliers_computed_in_16_bits():
    q = jqx.llm_int8(threshold=6.0).quantize_weight(_w())
    x = _x()
    x = x.at[:, 3].set(jnp.array([50.0, -80.0, 0.5, 20.0, 7.0]))  # an outlier feature
    w_hat = q.dequantize()
    y = jqx.ops.dot_general(x, q, DN)
    x_reg = x.at[:, 3].set(0.0)
    s = jnp.max(jnp.abs(x_reg), axis=1, keepdims=True) / 127
    out_part = jnp.abs(x[:, 3:4]) * jnp.abs(w_hat[3:4]) * 2.0**-9  # f16 rounding of x and w
    bound = _int8_act_bound(x_reg, w_hat, s) + out_part + _tight(x, w_hat)
    assert np.all(np.abs(y - _ref(x, w_hat)) <= bound)
    # plain W8A8 on the same input is much worse: the outlier sets the row scale
    qd = jqx.int8_dynamic_activation_int8_weight().quantize_weight(_w())
    yd = jqx.ops.dot_general(x, qd, DN)
    assert float(jnp.max(jnp.abs(yd - _ref(x, w_hat)))) > 3 * float(
        jnp.max(jnp.abs(y - _ref(x, w_hat)))
    )


@pytest.mark.parametrize("name", ["int8", "uint4_g16", "w8a8"])
def test_in_scale(name):
    r = WEIGHT_ONLY.get(name) or jqx.int8_dynamic_activation_int8_weight()
    q = r.quantize_weight(_w())
    ins = jnp.linspace(0.5, 2.0, K).reshape(K, 1)
    q = q.replace(in_scale=ins)
    x = _x()
    w_hat = q.dequantize()  # divides by in_scale
    y = jqx.ops.dot_general(x, q, DN)
    if name == "w8a8":
        xs = x / ins.reshape(1, K)
        s = jnp.max(jnp.abs(xs), axis=1, keepdims=True) / 127
        bound = _int8_act_bound(xs, w_hat * ins, s)
    else:
        bound = 2 * _tight(x, w_hat)
    assert np.all(np.abs(y - _ref(x, w_hat)) <= bound)


@pytest.mark.parametrize("rows", [16, 64])  # 64: the int8 kernel reads the weight (N, K)
def test_pallas_backend_matches_xla(rows):
    x = _x(shape=(rows, K))
    for r in (jqx.int4_weight_only(group_size=32), jqx.int8_dynamic_activation_int8_weight()):
        q = r.quantize_weight(_w())
        y_x = jqx.ops.dot_general(x, q, DN, backend="xla")
        y_p = jqx.ops.dot_general(x, q, DN, backend="pallas")
        w_hat = q.dequantize()
        # both within the same error budget of the dequantized product
        s = jnp.max(jnp.abs(x), axis=1, keepdims=True) / 127
        bound = _int8_act_bound(x, w_hat, s) if q.act else 2 * _tight(x, w_hat)
        assert np.all(np.abs(y_p - _ref(x, w_hat)) <= bound + 1e-4)
        assert np.all(np.abs(y_x - _ref(x, w_hat)) <= bound)


def test_bad_input():
    q = jqx.int8_weight_only().quantize_weight(_w())
    with pytest.raises(ValueError, match="backend="):
        jqx.ops.dot_general(_x(), q, DN, backend="cuda")
    with pytest.raises(ValueError, match="contracting dims"):
        jqx.ops.dot_general(_x(shape=(M, 7)), q, DN)
    with pytest.raises(TypeError, match="jqx.quantized"):
        _x() @ q


@pytest.mark.skipif(not native.available(), reason=f"native int8 GEMM: {native.status()}")
def test_int8_weight_only_small_m_two_level_on_native_kernel():
    """Few rows x a large int8 weight (>= 4M elements) on a VNNI CPU: both
    activation levels go through jqx.native's GEMM in one call (one row: XLA splits
    and the GEMM reads the weight in place; 16: the split inside the kernel); the
    sums are exact, so the output equals the XLA int32 formulation bit for bit."""
    kk = 2048
    q = jqx.int8_weight_only().quantize_weight(_w(shape=(kk, kk)))
    w_hat = q.dequantize()
    for m, target in ((1, native.TARGET), (16, native.W8A8_VNNI_TARGET)):
        x = _x(shape=(m, kk))
        f = jax.jit(lambda a: jqx.ops.dot_general(a, q, DN))
        assert target in str(jax.make_jaxpr(f)(x))
        y = f(x)
        s = jnp.max(jnp.abs(x), axis=1, keepdims=True)
        bound = s / 32511 * jnp.sum(jnp.abs(w_hat), axis=0, keepdims=True) + _tight(x, w_hat)
        assert np.all(np.abs(y - _ref(x, w_hat)) <= bound)
        g = jax.jit(lambda a: jqx.ops.dot_general(a, q, DN, backend="xla"))
        assert native.TARGET not in str(jax.make_jaxpr(g)(x))
        np.testing.assert_array_equal(np.asarray(y), np.asarray(g(x)))


def test_plain_arrays_pass_through():
    x, w = _x(), _w()
    np.testing.assert_array_equal(jqx.ops.dot_general(x, w, DN), lax.dot_general(x, w, DN))


def test_int8_weight_only_small_m_two_level_split():
    """Few rows x a large int8 weight: the activations are split into two int8
    levels (two int32 dots) instead of converting the weight; the extra error
    is at most max|x_row| / 32511 per element. (XLA's formulation on CPU; the
    native kernel's is above.)"""
    kk = 1024
    q = jqx.int8_weight_only().quantize_weight(_w(shape=(kk, kk)))
    w_hat = q.dequantize()
    with jqx.ops.policy(platform="cpu"):
        for m in (1, 16):
            x = _x(shape=(m, kk))
            y = jqx.ops.dot_general(x, q, DN, backend="xla")
            s = jnp.max(jnp.abs(x), axis=1, keepdims=True)
            bound = s / 32511 * jnp.sum(jnp.abs(w_hat), axis=0, keepdims=True) + _tight(x, w_hat)
            assert np.all(np.abs(y - _ref(x, w_hat)) <= bound)
        jaxpr = str(jax.make_jaxpr(lambda a: jqx.ops.dot_general(a, q, DN, backend="xla"))(x))
    assert "preferred_element_type=int32" in jaxpr and f"f32[{kk},{kk}]" not in jaxpr


# --------------------------------------------------------------------------- dispatch
#
# Which implementation runs is decided once per product by jqx.ops.dispatch; these
# tests check the decision through the public switches (backend=, jqx.ops.policy) and
# jqx.ops.explain, without running the native or GPU kernels, so they run everywhere.

W8A8 = jqx.int8_dynamic_activation_int8_weight()


def _explain(x, q, dn=DN, **kw):
    return jqx.ops.explain(x, q, dn, **kw)


def _abstract(recipe, shape):
    """A QArray of ShapeDtypeStructs: explain reads only shapes and dtypes."""
    return jax.eval_shape(recipe.quantize_weight, jax.ShapeDtypeStruct(shape, jnp.float32))


def test_dispatch_native_routing():
    """Where the native kernels pay (the shapes of the native tests above), decided
    with the policy saying they are available."""
    dn_last, dn_mid = (((2,), (0,)), ((), ())), (((1,), (0,)), ((), ()))
    with jqx.ops.policy(platform="cpu", native_available=True):
        q = _abstract(W8A8, (100, 80))
        x = jnp.ones((4, 300, 100))
        with jqx.ops.policy(native_min_work=1 << 23):
            # W8A8 with the activation quantization in the VNNI kernel; backend="native"
            # keeps the plain int8 GEMM (XLA quantizes)
            assert _explain(x, q, dn_last) == "native.w8a8_vnni"
            assert _explain(jnp.swapaxes(x, 1, 2), q, dn_mid) == "native.w8a8_vnni"
            assert _explain(x, q, dn_last, backend="native") == "native.int8_gemm"
            assert _explain(x[0], q) == "xla.int32_dot"  # small products stay on XLA
            assert _explain(x, q, dn_last, backend="xla") == "xla.bf16_dot"  # 1200 rows
        assert _explain(x, q, dn_last) == "native.w8a8_vnni"  # 2^23.2 >= the default 2^23
        assert _explain(x[:, :100], q, dn_last) == "xla.int32_dot"  # 400 rows: below it
        with jqx.ops.policy(native_min_work=1 << 26):
            assert _explain(x, q, dn_last) == "xla.bf16_dot"
        # Up to 6 rows the GEMM reads the weight in place: from 2^18 weight elements on.
        q8a8, q8 = _abstract(W8A8, (515, 520)), _abstract(jqx.int8_weight_only(), (515, 520))
        for rows in range(1, 7):
            assert _explain(jnp.ones((rows, 515)), q8a8) == "native.int8_gemm"
        assert _explain(jnp.ones((7, 515)), q8a8) == "xla.int32_dot"
        assert _explain(jnp.ones((1, 515)), q8a8, backend="xla") == "xla.int32_dot_padded"
        # int8 weight-only: its two levels double the rows.
        for rows in (1, 3):
            assert _explain(jnp.ones((rows, 515)), q8) == "native.two_level_int8"
        assert _explain(jnp.ones((4, 515)), q8) == "xla.decoded_dot"
        assert _explain(jnp.ones((1, 515)), q8, backend="xla") == "xla.decoded_dot"
        with jqx.ops.policy(two_level_min_weight=0):
            assert _explain(jnp.ones((1, 515)), q8, backend="xla") == "xla.two_level_int8"
        # 4-bit weight-only at <= 16 rows, any 4-bit format; bf16 activations too.
        for recipe in (
            jqx.int4_weight_only(group_size=128),
            jqx.int4_weight_only(group_size=None, scheme="absmax"),
            jqx.nf4_weight_only(group_size=64),
            jqx.fp4_weight_only(group_size=32),
        ):
            q4 = _abstract(recipe, (512, 520))
            assert _explain(jnp.ones((3, 4, 512)), q4, dn_last) == "native.w4"
            assert _explain(jnp.ones((2, 512), jnp.bfloat16), q4) == "native.w4"
            assert _explain(jnp.ones((17, 512)), q4) != "native.w4"
            assert _explain(jnp.ones((1, 512)), q4, backend="xla").startswith("xla.")
        # Layouts the kernels do not take stay on XLA.
        q3 = _abstract(W8A8, (2, 515, 520))
        dn_batch = (((2,), (1,)), ((0,), (0,)))
        assert _explain(jnp.ones((2, 3, 515)), q3, dn_batch) == "xla.int32_dot"
        # backend="native" forces the kernel whatever the size; XLA where none applies.
        q_small = _abstract(W8A8, (K, N))
        assert _explain(_x(), q_small) == "xla.int32_dot"
        assert _explain(_x(), q_small, backend="native") == "native.int8_gemm"
        q_fp8 = _abstract(jqx.fp8_dynamic_activation_fp8_weight(), (K, N))
        assert _explain(_x(), q_fp8, backend="native") == "xla.bf16_dot"
        # backend="xla" never picks a native or Pallas kernel.
        for qq in (q8a8, q8, q_small):
            assert _explain(jnp.ones((2, qq.shape[0])), qq, backend="xla").startswith("xla.")


def test_dispatch_cpu_thresholds_apply_only_on_cpu():
    """The bf16 route, the two-level split, single-row padding and the native kernels
    were measured on XLA:CPU: another platform gets XLA's direct formulations."""
    q8a8 = _abstract(W8A8, (384, 64))
    q8 = _abstract(jqx.int8_weight_only(), (1024, 1024))
    x1024, x1 = jnp.ones((1024, 384)), jnp.ones((1, 384))
    with jqx.ops.policy(platform="cpu", native_available=False):
        assert _explain(x1024, q8a8) == "xla.bf16_dot"
        assert _explain(x1, q8a8) == "xla.int32_dot_padded"
        assert _explain(jnp.ones((16, 1024)), q8) == "xla.two_level_int8"
        assert _explain(jnp.ones((65, 1024)), q8) == "xla.decoded_dot"
        with jqx.ops.policy(pad_single_row=False, w8a8_bf16_min_rows=2048):
            assert _explain(x1024, q8a8) == "xla.int32_dot"
            assert _explain(x1, q8a8) == "xla.int32_dot"
    for platform in ("gpu", "tpu"):
        with jqx.ops.policy(platform=platform, device_kind="NVIDIA H200", native_available=True):
            assert _explain(x1024, q8a8) == "xla.int32_dot"
            assert _explain(x1, q8a8) == "xla.int32_dot"
            assert _explain(jnp.ones((16, 1024)), q8) == "xla.decoded_dot"
            with pytest.raises(RuntimeError, match=f"CPU backend and this one is '{platform}'"):
                _explain(x1, q8a8, backend="native")


def test_dispatch_pallas_table():
    """backend=None on a GPU runs a Pallas kernel only where the table measured it
    faster on this device; backend="pallas" runs it wherever it applies."""
    big = (4096, 4096)
    q4 = _abstract(jqx.int4_weight_only(group_size=128), big)
    q8a8 = _abstract(W8A8, big)
    qf8 = _abstract(jqx.fp8_dynamic_activation_fp8_weight(), big)
    table = {"H200": {"w4a16": {1: "pallas"}, "int8_dynamic": {16: "pallas"}, "fp8": {1: "xla"}}}
    x1, x16 = jnp.ones((1, 4096), jnp.bfloat16), jnp.ones((16, 4096), jnp.bfloat16)
    with jqx.ops.policy(platform="gpu", device_kind="NVIDIA H200", pallas_table=table):
        assert _explain(x1, q4) == "pallas.w4a16"
        assert _explain(x16, q4) == "xla.dequantize_dot"  # bucket not measured
        assert _explain(x16, q8a8) == "pallas.int8_dynamic"
        assert _explain(x1, qf8) == "xla.bf16_dot"  # measured: XLA wins
        assert _explain(x1, q4, backend="xla") == "xla.dequantize_dot"
        assert _explain(jnp.ones((1, 1, 4096)), q4, (((2,), (0,)), ((), ()))) != "pallas.w4a16"
    with jqx.ops.policy(platform="gpu", device_kind="NVIDIA A100", pallas_table=table):
        assert _explain(x1, q4) == "xla.dequantize_dot"
    with jqx.ops.policy(platform="gpu", device_kind="NVIDIA H200"):  # the shipped table
        assert _explain(x1, q4) == "pallas.w4a16"
        assert _explain(jnp.ones((4096, 4096), jnp.bfloat16), q4) == "xla.dequantize_dot"
        assert _explain(jnp.ones((1024, 4096), jnp.bfloat16), q8a8) == "pallas.int8_dynamic"
        assert _explain(x16, q8a8) != "pallas.int8_dynamic"
    with jqx.ops.policy(platform="cpu", native_available=False):
        assert _explain(x1, q4) == "xla.dequantize_dot"
        assert _explain(x1, q4, backend="pallas") == "pallas.w4a16"
        assert _explain(x16, q8a8, backend="pallas") == "pallas.int8_dynamic"
        assert _explain(x16, qf8, backend="pallas") == "pallas.fp8"
        # Layouts and specs the kernels do not take run on XLA.
        assert _explain(x16, q8a8.replace(in_scale=jnp.ones((4096, 1))), backend="pallas") == (
            "xla.int32_dot"
        )
        per_tensor = _abstract(
            jqx.fp8_dynamic_activation_fp8_weight(act_granularity="per_tensor"), big
        )
        assert _explain(x16, per_tensor, backend="pallas") == "xla.bf16_dot"
        q_g24 = _abstract(jqx.int4_weight_only(group_size=24), (96, 64))
        assert _explain(jnp.ones((2, 96)), q_g24, backend="pallas") == "xla.dequantize_dot"


@pytest.fixture
def pretend_native_kernels(monkeypatch):
    """The native kernel wrappers believe their library is loaded, so tracing shows their
    FFI calls (make_jaxpr needs no registered target); running them would fail. This
    checks the native adapters' wiring on machines without AVX512-VNNI."""
    monkeypatch.setattr(native, "available", lambda: True)


def test_native_adapters_trace_to_the_ffi_targets(pretend_native_kernels):
    dn_last, dn_mid = (((2,), (0,)), ((), ())), (((1,), (0,)), ((), ()))
    x = jnp.ones((3, 4, 515))
    cases = [
        (W8A8, (515, 520), native.TARGET),
        (jqx.int8_weight_only(), (515, 520), native.TARGET),
        (jqx.int4_weight_only(group_size=103), (515, 520), native.W4_TARGET),
    ]
    with jqx.ops.policy(platform="cpu", native_available=True):
        for recipe, shape, target in cases:
            q = recipe.quantize_weight(_w(shape=shape))
            for xx, dn in [
                (x[0, :1], DN),
                (x[:, :1], dn_last),
                (jnp.swapaxes(x[:, :1], 1, 2), dn_mid),
            ]:
                f = jax.jit(lambda a, q=q, dn=dn: jqx.ops.dot_general(a, q, dn, backend="native"))
                g = jax.jit(lambda a, q=q, dn=dn: jqx.ops.dot_general(a, q, dn, backend="xla"))
                assert target in str(jax.make_jaxpr(f)(xx))
                assert target not in str(jax.make_jaxpr(g)(xx))
                assert jax.eval_shape(f, xx) == jax.eval_shape(g, xx)


def test_native_backend_needs_the_kernels():
    q = W8A8.quantize_weight(_w())
    with jqx.ops.policy(platform="cpu", native_available=False):
        with pytest.raises(RuntimeError, match=r"backend='native'.*native_available=False"):
            jqx.ops.dot_general(_x(), q, DN, backend="native")
    if jqx.ops.native_status() != "available":
        with pytest.raises(RuntimeError, match="backend='native'"):
            jqx.ops.dot_general(_x(), q, DN, backend="native")


def test_policy_is_read_at_trace_time():
    q = W8A8.quantize_weight(_w())
    x = _x()
    f = jax.jit(lambda a: jqx.ops.dot_general(a, q, DN, backend="xla"))
    with jqx.ops.policy(platform="cpu", w8a8_bf16_min_rows=1) as pol:
        assert pol.w8a8_bf16_min_rows == 1 and jqx.ops.current_policy() is pol
        assert "bf16" in str(jax.make_jaxpr(f)(x))
        y = f(x)  # traced here: keeps the bf16 route
    assert jqx.ops.current_policy() == jqx.ops.Policy()
    np.testing.assert_array_equal(np.asarray(f(x)), np.asarray(y))
    with pytest.raises(TypeError, match="'bf16_rows', which is not a Policy field"):
        with jqx.ops.policy(bf16_rows=1):
            pass


def test_explain_front_half():
    q = jqx.int8_weight_only().quantize_weight(_w())
    x = _x()
    assert _explain(x, _w()) == "lax.dot_general"
    with jqx.ops.policy(platform="cpu", native_available=False):
        assert jqx.ops.explain(q, x, (((0,), (1,)), ((), ()))) == "xla.decoded_dot"
        assert jqx.ops.explain(q, q, (((0,), (0,)), ((), ()))) == "xla.decoded_dot"
        with pytest.raises(ValueError, match="'native'"):
            _explain(x, q, backend="cuda")


def test_in_scale_off_the_contraction_is_dequantized_with_it():
    """An in_scale that varies along a free dim cannot divide x: the weight is
    dequantized with it (x . dequantize(W))."""
    q = jqx.int8_weight_only().quantize_weight(_w(shape=(N, K)))
    q = q.replace(in_scale=jnp.linspace(0.5, 2.0, N).reshape(N, 1))
    x = _x()
    dn = (((1,), (1,)), ((), ()))
    assert _explain(x, q, dn) == "xla.dequantize_dot"
    y = jqx.ops.dot_general(x, q, dn)
    w_hat = q.dequantize()
    assert np.all(np.abs(y - _ref(x, w_hat, dn)) <= 2 * _tight(x, w_hat, dn))


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_block_layouts_dispatch_to_the_block_kernel(tmp_path, kind):
    """jqx.load_gguf's Q4_0/Q4_1/Q8_0 weights, used as x @ W.T, go to the AVX2 block
    kernel at decode sizes (where it builds) and to XLA otherwise; both within a float32
    bound of the dequantized product."""
    gguf = pytest.importorskip("gguf")
    from jqx.kernels.cpu import native

    t = getattr(gguf.GGMLQuantizationType, kind)
    w = np.random.default_rng(0).normal(size=(48, 96)).astype(np.float32)
    raw = gguf.quants.quantize(w, t)
    path = str(tmp_path / "w.gguf")
    wr = gguf.GGUFWriter(path, "llama")
    wr.add_tensor("w", raw, raw_dtype=t)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    q = jqx.load_gguf(path).tensors["w"]
    DN = (((1,), (1,)), ((), ()))
    ref = np.asarray(q.dequantize(), np.float64)
    for rows, native_ok in ((1, True), (16, True), (17, False)):
        x = np.random.default_rng(rows).normal(size=(rows, 96)).astype(np.float32)
        expect = "native.gguf" if native_ok and native.gguf_available() else None
        got_impl = jqx.ops.explain(jnp.asarray(x), q, DN)
        if expect:
            assert got_impl == expect
        else:
            assert got_impl != "native.gguf"
        assert jqx.ops.explain(jnp.asarray(x), q, DN, backend="xla") != "native.gguf"
        y = np.asarray(jax.jit(lambda a: jqx.ops.dot_general(a, q, DN))(jnp.asarray(x)))
        bound = 1e-5 * (np.abs(x) @ np.abs(ref).T) + 1e-6
        assert (np.abs(y - x.astype(np.float64) @ ref.T) <= bound).all()


def test_per_block_int8_activations_on_gguf_layouts(tmp_path):
    """act=ActSpec(granularity="per_block") rounds x per block of 32 as llama.cpp does
    (float16 scale, ties to even), then multiplies the exact weight; other layouts refuse."""
    gguf = pytest.importorskip("gguf")
    from jqx.core.qarray import ActSpec

    t = gguf.GGMLQuantizationType.Q4_1
    w = np.random.default_rng(0).normal(size=(40, 64)).astype(np.float32)
    path = str(tmp_path / "w.gguf")
    wr = gguf.GGUFWriter(path, "llama")
    wr.add_tensor("w", gguf.quants.quantize(w, t), raw_dtype=t)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    spec = ActSpec(kind="dynamic", format="int8", granularity="per_block")
    q = jqx.load_gguf(path).tensors["w"].replace(act=spec)
    assert jqx.ops.gguf_layout(q) == "Q4_1"
    DN = (((1,), (1,)), ((), ()))
    x = np.random.default_rng(1).normal(size=(3, 64)).astype(np.float32)
    xb = x.reshape(3, 2, 32)
    amax = np.abs(xb).max(-1, keepdims=True)
    d = (amax / 127).astype(np.float16).astype(np.float64)
    xr = (np.round(xb * (127 / amax)) * d).reshape(3, 64)
    w = np.asarray(q.dequantize(), np.float64)
    # Q8_1 keeps each block's code sum as float16(d * sum(codes)) for the minimum term
    csum = np.round(xb * (127 / amax)).sum(-1)
    s16 = (amax[..., 0] / np.float32(127) * csum).astype(np.float16).astype(np.float64)
    delta = s16 - d[..., 0] * csum
    m = np.asarray(q.zero_point, np.float64)
    ref = xr @ w.T + delta @ m.T
    for backend in ("xla", None):  # None: the native kernel where it builds
        f = jax.jit(lambda a, b=backend: jqx.ops.dot_general(a, q, DN, backend=b))
        np.testing.assert_allclose(np.asarray(f(jnp.asarray(x))), ref, rtol=1e-5, atol=1e-5)
    got = np.asarray(jqx.ops.dot_general(jnp.asarray(x), q, DN))
    # the error against the exact product is the activations' rounding
    exact = x.astype(np.float64) @ w.T
    assert 0 < np.abs(got - exact).max() <= 0.05 * np.abs(exact).max()
    plain = jqx.int8_weight_only().quantize_weight(jnp.ones((64, 8))).replace(act=spec)
    with pytest.raises(NotImplementedError, match="per-block int8 activations"):
        jqx.ops.dot_general(jnp.ones((2, 64)), plain, (((1,), (0,)), ((), ())))
    with pytest.raises(ValueError, match="per_block' is dynamic int8 only"):
        ActSpec(kind="static", format="int8", granularity="per_block")


@pytest.mark.parametrize(
    "recipe",
    [jqx.int8_dynamic_activation_int8_weight(), jqx.int8_weight_only(), jqx.fp8_weight_only()],
    ids=lambda r: r.name,
)
def test_attention_kernels_run_as_2d_products(recipe):
    """(in, heads, head_dim) and (heads, head_dim, out) kernels run through the 2-D
    implementations on reshaped codes and scales: the same result as the 2-D kernel."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 16, 64)), jnp.float32)
    for shape, path, dn, xs in (
        ((64, 4, 16), "attn/query/kernel", (((2,), (0,)), ((), ())), x),
        ((4, 16, 64), "attn/out/kernel", (((2, 3), (0, 1)), ((), ())), x.reshape(4, 16, 4, 16)),
    ):
        w = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        q = recipe.quantize_weight(w, path=path)
        n = len(dn[0][1])
        k, m = int(np.prod(shape[:n])), int(np.prod(shape[n:]))
        x2 = xs.reshape(*xs.shape[: xs.ndim - n], k)
        q2 = recipe.quantize_weight(w.reshape(k, m), path="Dense_0/kernel")
        dn2 = (((x2.ndim - 1,), (0,)), ((), ()))
        assert jqx.ops.explain(xs, q, dn) == jqx.ops.explain(x2, q2, dn2)
        y = jax.jit(lambda a, b, dn=dn: jqx.ops.dot_general(a, b, dn))(xs, q)
        y2 = jax.jit(lambda a, b, dn=dn2: jqx.ops.dot_general(a, b, dn))(x2, q2)
        np.testing.assert_array_equal(np.asarray(y).reshape(y2.shape), np.asarray(y2))
        ref = jax.lax.dot_general(xs, q.dequantize(), dn)
        bound = 0.03 * float(jnp.abs(ref).max())
        assert y.shape == ref.shape and float(jnp.abs(y - ref).max()) <= bound


# ----------------------------------------------------------------- float products


DN = (((1,), (0,)), ((), ()))


def test_choose_float_dot_routing():
    """The native float32 GEMM takes float32 products laid out as one matrix product,
    from f32_kernel_min_rows rows and f32_kernel_min_work multiply-adds, on CPU with the
    kernels; everything else, backend 'xla' / 'pallas' and f32_kernel=False: XLA."""
    choose = jqx.ops.dispatch.choose_float_dot
    x, w = jnp.ones((2048, 384)), jnp.ones((384, 384))
    with jqx.ops.policy(platform="cpu", native_available=True):
        assert choose(x, w, DN) == "native"
        # nn.DenseGeneral's 3-D kernels: x (b, s, h, d) contracting (h, d) with W (h, d, n).
        x4, w3 = jnp.ones((2, 1024, 6, 64)), jnp.ones((6, 64, 384))
        assert choose(x4, w3, (((2, 3), (0, 1)), ((), ()))) == "native"
        assert choose(x, w, DN, preferred_element_type=jnp.float32) == "native"
        for other in (
            (x.astype(jnp.bfloat16), w, DN, None),  # not float32
            (x, w, DN, jnp.bfloat16),  # another output dtype
            (x, w, (((1,), (1,)), ((), ())), None),  # x @ W.T: W contracted on its last axis
            (x.reshape(2, 1024, 384), w[None].repeat(2, 0), (((2,), (1,)), ((0,), (0,))), None),
            (x[:2047], w, DN, None),  # fewer rows than f32_kernel_min_rows
            (x, w[:2, :1], DN, None),  # less work than f32_kernel_min_work
        ):
            assert choose(*other[:3], other[3]) == "xla", other[2:]
        assert choose(x[:16], w, DN, backend="native") == "native"  # no size rule
    with jqx.ops.policy(platform="cpu", native_available=True, f32_kernel_min_rows=16):
        assert choose(x[:16], w, DN) == "native"
        assert choose(x, w, DN, backend="xla") == choose(x, w, DN, backend="pallas") == "xla"
    with jqx.ops.policy(platform="cpu", native_available=True, f32_kernel=False):
        assert choose(x, w, DN) == choose(x, w, DN, backend="native") == "xla"
    with jqx.ops.policy(platform="cpu", native_available=False):
        assert choose(x, w, DN, backend="native") == "xla"  # never raises: XLA runs it
    with jqx.ops.policy(platform="cuda", native_available=True):
        assert choose(x, w, DN) == "xla"
    with pytest.raises(ValueError, match=r"backend='gpu' must be None, 'xla', 'native'"):
        choose(x, w, DN, backend="gpu")


# Float products the native GEMM takes as laid out: x @ W, two contracted dims, a 3-D W.
FLOAT_DOT_CASES = [
    ((64, 384), (384, 200), DN),
    ((2, 40, 6, 64), (6, 64, 100), (((2, 3), (0, 1)), ((), ()))),
    ((3, 50, 384), (384, 2, 48), (((2,), (0,)), ((), ()))),
]


@pytest.mark.skipif(not native.available(), reason=native.status())
@pytest.mark.parametrize("xs,ws,dn", FLOAT_DOT_CASES)
def test_float_dot_general_native_within_bound_and_xla_bit_for_bit(xs, ws, dn):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(xs), jnp.float32)
    w = jnp.asarray(rng.standard_normal(ws), jnp.float32)
    # backend="native": the kernel below f32_kernel_min_rows too.
    f = jax.jit(
        lambda x, w, dn: jqx.ops.float_dot_general(x, w, dn, backend="native"), static_argnums=2
    )
    assert "jqx_f32_gemm" in f.lower(x, w, dn).as_text()
    got = np.asarray(f(x, w, dn), np.float64)
    x64, w64, axes = np.asarray(x, np.float64), np.asarray(w, np.float64), dn[0]
    k = int(np.prod([xs[i] for i in dn[0][0]]))
    bound = k * 2.0**-24 / (1 - k * 2.0**-24) * np.tensordot(np.abs(x64), np.abs(w64), axes)
    assert np.all(np.abs(got - np.tensordot(x64, w64, axes)) <= bound)
    exact = np.asarray(lax.dot_general(x, w, dn))
    np.testing.assert_array_equal(
        np.asarray(jqx.ops.float_dot_general(x, w, dn, backend="xla")), exact
    )
    with jqx.ops.policy(f32_kernel=False):
        np.testing.assert_array_equal(np.asarray(jqx.ops.float_dot_general(x, w, dn)), exact)


@pytest.mark.skipif(not native.available(), reason=native.status())
@pytest.mark.parametrize("xs,ws,dn", FLOAT_DOT_CASES)
def test_float_dot_general_bias_and_gelu(xs, ws, dn):
    """On the native GEMM the bias is XLA's add bit for bit and the GELU within its bound,
    both inside the one kernel call; epilogue=False and the XLA route are the ops
    as a program writes them, bit for bit."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal(xs), jnp.float32)
    w = jnp.asarray(rng.standard_normal(ws) / 16, jnp.float32)
    tail = tuple(d for i, d in enumerate(ws) if i not in dn[0][1])
    bias = jnp.asarray(rng.standard_normal(tail), jnp.float32)
    fdg = jqx.ops.float_dot_general
    f = np.asarray(fdg(x, w, dn, backend="native")) + np.asarray(bias)
    np.testing.assert_array_equal(np.asarray(fdg(x, w, dn, backend="native", bias=bias)), f)
    fn = jax.jit(lambda x, w, b: fdg(x, w, dn, backend="native", bias=b, activation="gelu"))
    text = fn.lower(x, w, bias).as_text()
    assert text.count("jqx_f32_gemm") == 1 and "erf" not in text
    assert_gelu_within_bound(f, fn(x, w, bias))
    tanh_form = fdg(x, w, dn, backend="native", bias=bias, activation="gelu_tanh")
    assert_gelu_tanh_within_bound(f, tanh_form)
    np.testing.assert_array_equal(  # ReLU: bit for bit
        np.asarray(fdg(x, w, dn, backend="native", bias=bias, activation="relu")),
        np.asarray(jax.jit(jax.nn.relu)(f)),
    )
    np.testing.assert_array_equal(
        np.asarray(fdg(x, w, dn, backend="xla", bias=bias, activation="gelu_tanh")),
        np.asarray(jax.nn.gelu(lax.dot_general(x, w, dn) + bias)),
    )
    gelu = functools.partial(jax.nn.gelu, approximate=False)
    with jqx.ops.policy(epilogue=False):
        np.testing.assert_array_equal(
            np.asarray(fdg(x, w, dn, backend="native", bias=bias, activation="gelu")),
            np.asarray(gelu(fdg(x, w, dn, backend="native") + bias)),
        )
    np.testing.assert_array_equal(
        np.asarray(fdg(x, w, dn, backend="xla", bias=bias, activation="gelu")),
        np.asarray(gelu(lax.dot_general(x, w, dn) + bias)),
    )

    # Differentiable: the tangents are XLA's dot, add and GELU's.
    def loss(backend, x, w, b):
        return jnp.sum(jnp.sin(fdg(x, w, dn, backend=backend, bias=b, activation="gelu")))

    got = jax.grad(functools.partial(loss, "native"), (0, 1, 2))(x, w, bias)
    want = jax.grad(functools.partial(loss, "xla"), (0, 1, 2))(x, w, bias)
    for g, h in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not native.available(), reason=native.status())
@pytest.mark.parametrize(
    "recipe",
    [jqx.int8_dynamic_activation_int8_weight(), jqx.int8_weight_only()],
    ids=["w8a8", "int8_weight_only"],
)
@pytest.mark.parametrize("prepack", [False, True], ids=["plain", "packed"])
def test_dot_general_bias_and_gelu_in_the_int8_kernels(recipe, prepack):
    """On the VNNI W8A8 and two-level kernels (the packed weight's route here) the bias
    and GELU run as the outputs are stored: the bias bit for bit on the route's product,
    the GELU within its bound. Every other route (XLA, the int8 GEMM without an epilogue)
    and epilogue=False run the program's own ops after the product, bit for bit."""
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((2, 40, 96)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((96, 80)) / 10, jnp.float32)
    bias = jnp.asarray(rng.standard_normal(80), jnp.float32)
    q = jqx.quantize({"kernel": w}, recipe, prepack=prepack)["kernel"]
    dn = (((2,), (0,)), ((), ()))
    gelu = functools.partial(jax.nn.gelu, approximate=False)
    for backend in ("xla", None, "native"):
        dg = functools.partial(jqx.ops.dot_general, x, q, dn, backend=backend)
        f = np.asarray(dg()) + np.asarray(bias)  # the route's own product, plus the bias
        np.testing.assert_array_equal(np.asarray(dg(bias=bias)), f)
        fn = jax.jit(lambda x, b, dg=dg: dg(bias=b, activation="gelu"))
        text = fn.lower(x, bias).as_text()
        route = jqx.ops.explain(x, q, dn, backend=backend)
        if route in ("native.w8a8_vnni", "native.two_level_vnni"):
            assert text.count("jqx_w8a8_vnni") == 1 and "erf" not in text
            assert_gelu_within_bound(f, fn(x, bias))
        else:  # the program's ops, compiled as the program is
            assert "erf" in text, route
            ref = jax.jit(lambda x, b, dg=dg: gelu(dg() + b))
            np.testing.assert_array_equal(np.asarray(fn(x, bias)), np.asarray(ref(x, bias)))
        with jqx.ops.policy(epilogue=False):
            np.testing.assert_array_equal(
                np.asarray(dg(bias=bias, activation="gelu")), np.asarray(gelu(f))
            )
    assert prepack == (jqx.ops.explain(x, q, dn) in ("native.w8a8_vnni", "native.two_level_vnni"))
    with pytest.raises(ValueError, match=r"dot_general: bias has shape \(8,\)"):
        jqx.ops.dot_general(x, q, dn, bias=jnp.ones((8,)))


def test_activation_names_are_the_kernels():
    """jqx.ops and the native kernels name the same activations (the kernels cannot
    import jqx.ops, so each keeps its table)."""
    assert set(jqx.ops.matmul.FLOAT_ACTIVATIONS) == set(native.EPILOGUE_ACTIVATIONS) - {None}


def test_float_dot_general_epilogue_bad_input():
    x, w = jnp.ones((4, 8)), jnp.ones((8, 3))
    with pytest.raises(ValueError, match=r"bias has shape \(1, 3\).*rhs's free dims \(3,\)"):
        jqx.ops.float_dot_general(x, w, DN, bias=jnp.ones((1, 3)))
    with pytest.raises(
        ValueError,
        match=r"activation='silu' must be None or one of \['gelu', 'gelu_tanh', 'relu'\]",
    ):
        jqx.ops.float_dot_general(x, w, DN, activation="silu")


@pytest.mark.skipif(not native.available(), reason=native.status())
def test_float_dot_general_native_is_differentiable():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((64, 96)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((96, 80)), jnp.float32)

    def loss(fn, x, w):
        return jnp.sum(jnp.tanh(fn(x, w, DN)))

    native_dot = functools.partial(jqx.ops.float_dot_general, backend="native")
    assert "jqx_f32_gemm" in jax.jit(lambda x, w: native_dot(x, w, DN)).lower(x, w).as_text()
    got = jax.grad(lambda x, w: loss(native_dot, x, w), (0, 1))(x, w)
    want = jax.grad(lambda x, w: loss(lax.dot_general, x, w), (0, 1))(x, w)
    for g, h in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-4, atol=1e-4)
    jvp = jax.jvp(lambda x: native_dot(x, w, DN), (x,), (jnp.ones_like(x),))[1]
    np.testing.assert_allclose(np.asarray(jvp), np.asarray(jnp.ones_like(x) @ w), rtol=1e-5)


# --------------------------------------------------------------------------- mlp

_MLP_SPECS = {
    "w8a8": jqx.int8_dynamic_activation_int8_weight,
    "w8a8_static": jqx.int8_static_activation_int8_weight,
    "int8_weight_only": jqx.int8_weight_only,
}


def _mlp_case(spec: str, seed=0, lead=(3, 100), k=64, f=256, n=48):
    """x, float weights and biases, and the weights quantized with ``spec`` (packed
    for the native GEMM: "vnni", as jqx.quantize packs them where it runs)."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((*lead, k)), jnp.float32)
    w1 = jnp.asarray(rng.standard_normal((k, f)) / np.sqrt(k), jnp.float32)
    w2 = jnp.asarray(rng.standard_normal((f, n)) / np.sqrt(f), jnp.float32)
    b1 = jnp.asarray(rng.standard_normal(f) * 0.5, jnp.float32)
    b2 = jnp.asarray(rng.standard_normal(n), jnp.float32)
    qs = []
    for w, amax in ((w1, 4.5), (w2, 3.0)):
        q = _MLP_SPECS[spec]().quantize_weight(w)
        if spec == "w8a8_static":
            q = q.replace(act_scale=jnp.asarray([amax / 127], jnp.float32))
        qs.append(jqx.ops.prepack(q, layout="vnni"))
    return x, w1, w2, b1, b2, qs


def _mlp_bound(x, w1, w2, b1, spec, activation):
    """|jqx.ops.mlp - float32 MLP| <= this, per output, for x's rows: each layer's
    activation quantization error (half a step per element, a whole step of the second
    level for int8 weight-only, the clip beyond a static scale), times the weight's
    magnitudes, the first layer's through the activation's slope (<= 1.13 for GELU),
    the weights' own rounding (half a step per element), and float32 rounding."""
    xr = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    slope = 1.13 if activation in ("gelu", "gelu_tanh") else 1.0

    def layer(v, w, static_amax):
        w = np.asarray(w, np.float64)
        ws = np.max(np.abs(w), axis=0) / 127  # per-channel weight step
        amax = np.max(np.abs(v), axis=1, keepdims=True)
        if spec == "int8_weight_only":
            step = amax / 127 / 256 * 2
        elif spec == "w8a8_static":
            step = np.full_like(amax, static_amax / 127)
        else:
            step = amax / 127
        err_x = np.broadcast_to(step / 2, v.shape)
        if spec == "w8a8_static":  # and the clip beyond the static scale's range
            err_x = err_x + np.maximum(np.abs(v) - 127.5 * step, 0)
        absw = np.abs(w) + ws / 2
        return err_x @ absw + np.sum(np.abs(v), 1, keepdims=True) * (ws / 2), np.abs(v) @ absw

    h = np.asarray(x, np.float64).reshape(-1, x.shape[-1]) @ np.asarray(w1, np.float64)
    h = h + np.asarray(b1, np.float64)
    e1, mag1 = layer(xr, w1, 4.5)
    h_ref = np.asarray(
        jqx.ops.matmul.FLOAT_ACTIVATIONS[activation](jnp.asarray(h)) if activation else h,
        np.float64,
    )
    hv = np.abs(h_ref) + slope * e1  # the hidden rows as computed, at most this large
    e2, mag2 = layer(hv, w2, 3.0)
    e = slope * e1 @ (np.abs(np.asarray(w2, np.float64))) + e2
    return e + 1e-5 * (mag1 @ np.abs(np.asarray(w2, np.float64)) + mag2) + 1e-5


@pytest.mark.parametrize("spec", list(_MLP_SPECS))
@pytest.mark.parametrize("activation", [None, "gelu", "gelu_tanh", "relu"])
def test_mlp_is_the_two_products_and_within_the_float_bound(spec, activation):
    """jqx.ops.mlp gives dot_general twice, each with its epilogue, bit for bit (one
    native call where both run on the VNNI kernel, two otherwise: both checked), and
    is within the quantization bound of the float32 MLP."""
    x, w1, w2, b1, b2, (q1, q2) = _mlp_case(spec)
    dn = (((2,), (0,)), ((), ()))

    def two(x):
        h = jqx.ops.dot_general(x, q1, dn, bias=b1, activation=activation)
        return jqx.ops.dot_general(h, q2, dn, bias=b2)

    def one(x):
        return jqx.ops.mlp(x, q1, q2, bias1=b1, activation=activation, bias2=b2)

    want = jax.jit(two)(x)
    np.testing.assert_array_equal(np.asarray(jax.jit(one)(x)), np.asarray(want))
    with jqx.ops.policy(mlp_kernel=False):
        np.testing.assert_array_equal(np.asarray(jax.jit(one)(x)), np.asarray(want))
    h = x @ w1 + b1
    ref = (jqx.ops.matmul.FLOAT_ACTIVATIONS[activation](h) if activation else h) @ w2 + b2
    bound = _mlp_bound(x, w1, w2, b1, spec, activation)
    err = np.abs(np.asarray(want, np.float64) - np.asarray(ref, np.float64)).reshape(bound.shape)
    assert np.all(err <= bound), float(np.max(err / bound))
    assert np.max(err) > 0  # the bound is not vacuous: the quantized MLP differs


@pytest.mark.skipif(not native.available(), reason=native.status())
@pytest.mark.parametrize("spec", list(_MLP_SPECS))
def test_mlp_runs_as_one_native_call_where_both_products_take_the_kernel(spec):
    """The fused call is made exactly when both products run on the VNNI kernel with
    their epilogues and x has mlp_kernel_min_rows rows (packed weights or plain): not
    below it, not for a float weight, backend="xla", policy(mlp_kernel=False) or
    policy(epilogue=False)."""
    x, w1, w2, b1, b2, (q1, q2) = _mlp_case(spec)

    def calls(x, a=q1, b=q2, **kw):
        f = functools.partial(jqx.ops.mlp, bias1=b1, activation="gelu", bias2=b2, **kw)
        return jax.jit(lambda x: f(x, a, b)).lower(x).as_text().count("jqx_w8a8_mlp")

    assert calls(x) == 1
    assert calls(x[:, :80]) == 0  # 240 rows, below 256
    with jqx.ops.policy(mlp_kernel_min_rows=200):
        assert calls(x[:, :80]) == 1
    plain1, plain2 = q1.with_code_layout("plain"), q2.with_code_layout("plain")
    # Fused where the dispatcher sends the plain weight's product to the kernel (W8A8 at
    # this small size stays on XLA, int8 weight-only does not).
    route = jqx.ops.explain(x, plain1, (((2,), (0,)), ((), ())))
    assert calls(x, a=plain1) == (route in ("native.w8a8_vnni", "native.two_level_vnni"))
    with jqx.ops.policy(native_min_work=0):  # on the kernel: packed in the call
        assert calls(x, a=plain1) == 1
        assert calls(x, a=plain1, b=plain2) == 1
    assert calls(x, b=w2) == 0
    assert calls(x, backend="xla") == 0
    for off in ({"mlp_kernel": False}, {"epilogue": False}):
        with jqx.ops.policy(**off):
            assert calls(x) == 0


@pytest.mark.parametrize("activation", [None, "gelu", "relu"])
def test_mlp_with_float_weights_is_float_dot_general_twice(activation):
    """Float weights: float_dot_general twice, bit for bit; where both products take
    the native float32 GEMM (here from 128 rows), one jqx_f32_mlp call; its gradients
    are XLA's."""
    x, w1, w2, b1, b2, (q1, _) = _mlp_case("w8a8")
    dn = (((2,), (0,)), ((), ()))

    def two(x, w1, w2):
        h = jqx.ops.float_dot_general(x, w1, dn, bias=b1, activation=activation)
        return jqx.ops.float_dot_general(h, w2, dn, bias=b2)

    def one(x, w1, w2):
        return jqx.ops.mlp(x, w1, w2, bias1=b1, activation=activation, bias2=b2)

    small = {"f32_kernel_min_rows": 128, "f32_kernel_min_work": 0}
    want = jax.grad(lambda *a: two(*a).sum(), argnums=(0, 1, 2))(x, w1, w2)
    for pol in ({}, small, {**small, "mlp_kernel": False}):
        with jqx.ops.policy(**pol):  # read while tracing: a new function each time
            f, g = jax.jit(lambda *a: one(*a)), jax.jit(lambda *a: two(*a))
            np.testing.assert_array_equal(np.asarray(f(x, w1, w2)), np.asarray(g(x, w1, w2)))
            fused = f.lower(x, w1, w2).as_text().count("jqx_f32_mlp")
            assert fused == (pol == small and native.available()), pol
            grads = jax.grad(lambda *a: one(*a).sum(), argnums=(0, 1, 2))(x, w1, w2)
        chex.assert_trees_all_close(grads, want, rtol=1e-5, atol=1e-4)
    mixed = jqx.ops.mlp(x, q1, w2)  # one quantized weight: two calls, no biases
    np.testing.assert_array_equal(
        np.asarray(mixed),
        np.asarray(jqx.ops.float_dot_general(jqx.ops.dot_general(x, q1, dn), w2, dn)),
    )


def test_mlp_bad_input_names_the_argument():
    x, w1, w2, b1, b2, (q1, q2) = _mlp_case("w8a8", lead=(4,))
    with pytest.raises(
        ValueError,
        match=r"jqx.ops.mlp: x \(4, 64\), w1 \(64, 256\) and w2 \(64, 256\) do not chain",
    ):
        jqx.ops.mlp(x, q1, q1)
    with pytest.raises(ValueError, match="do not chain"):
        jqx.ops.mlp(x, w1[None], w2)
    with pytest.raises(ValueError, match=r"jqx.ops.mlp: bias has shape \(48,\).*\(256,\)"):
        jqx.ops.mlp(x, q1, q2, bias1=b2)
    with pytest.raises(ValueError, match=r"jqx.ops.mlp: bias has shape \(256,\).*\(48,\)"):
        jqx.ops.mlp(x, q1, q2, bias2=b1)
    with pytest.raises(ValueError, match="activation='swish' must be None or one of"):
        jqx.ops.mlp(x, q1, q2, activation="swish")
    with pytest.raises(ValueError, match="backend"):
        jqx.ops.mlp(x, q1, q2, backend="gpu")

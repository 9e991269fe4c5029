"""int8 W8A8 Pallas kernels against their plain-jnp references (interpret on CPU; native on GPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jqx.kernels.pallas.int8_matmul import (
    BlockSizes,
    int8_matmul,
    int8_matmul_dynamic,
    int8_matmul_dynamic_reference,
    int8_matmul_reference,
    quantize_rows,
    quantize_rows_reference,
)

ON_GPU = jax.default_backend() == "gpu"
# The native twins carry the "gpu" marker: `pytest -m gpu` runs only them on a GPU.
MODES = [
    True,
    pytest.param(
        False, marks=[pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="needs a GPU")]
    ),
]
OUT_EPS = {"bfloat16": 2.0**-8, "float16": 2.0**-11, "float32": 2.0**-22}


def _operands(m, k, n, seed=0):
    rng = np.random.default_rng(seed)
    xq = jnp.asarray(rng.integers(-128, 128, (m, k)), jnp.int8)
    wq = jnp.asarray(rng.integers(-128, 128, (k, n)), jnp.int8)
    xs = jnp.asarray(rng.uniform(0.001, 0.1, (m, 1)), jnp.float32)
    ws = jnp.asarray(rng.uniform(0.001, 0.1, (n,)), jnp.float32)
    b = jnp.asarray(rng.standard_normal(n), jnp.float32)
    return xq, wq, xs, ws, b


def _exact(xq, wq, xs, ws, b):
    """f64 numpy: the int products are exact, so this is the true value."""
    acc = np.asarray(xq, np.int64) @ np.asarray(wq, np.int64)
    out = (
        acc * np.asarray(xs, np.float64).reshape(-1, 1) * np.asarray(ws, np.float64).reshape(1, -1)
    )
    return out + (0.0 if b is None else np.asarray(b, np.float64).reshape(1, -1))


# (M, K, N, out dtype, with bias): ragged M, K and N multiples of 128 and not.
def _dynamic_bound(x, wq, ws, b):
    """Exact f64 ``x @ (wq * ws) + b`` and a per-element bound for dynamic W8A8: each
    activation is off by at most half a step (amax/254); one full step also covers a
    tie that rounds the other way under GPU division."""
    w = np.asarray(wq, np.float64) * np.asarray(ws, np.float64).reshape(1, -1)
    xf = np.asarray(x.astype(jnp.float32), np.float64)
    exact = xf @ w + np.asarray(b, np.float64)
    step = np.abs(xf).max(axis=1, keepdims=True) / 127.0
    return exact, step * np.abs(w).sum(axis=0, keepdims=True) + 1e-5 * np.abs(exact) + 1e-6


CASES = [
    (1, 256, 256, jnp.float32, True),
    (3, 256, 128, jnp.bfloat16, True),
    (17, 200, 96, jnp.float32, False),
    (100, 384, 130, jnp.bfloat16, False),
]


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "m{}k{}n{}".format(*c[:3]))
def test_int8_matmul(case, interpret):
    m, k, n, out_dtype, with_bias = case
    xq, wq, xs, ws, b = _operands(m, k, n)
    bias = b if with_bias else None
    y = int8_matmul(xq, wq, xs, ws, bias, out_dtype=out_dtype, interpret=interpret)
    ref = int8_matmul_reference(xq, wq, xs, ws, bias, out_dtype=out_dtype)
    assert y.shape == (m, n) and y.dtype == jnp.dtype(out_dtype)
    exact = _exact(xq, wq, xs, ws, bias)
    terms = np.abs(_exact(xq, wq, xs, ws, None)) + (np.abs(np.asarray(b)) if with_bias else 0.0)
    eps = OUT_EPS[jnp.dtype(out_dtype).name]
    # int32 accumulation is exact; the f32 epilogue adds a few ulps of its terms; then one
    # output rounding.
    bound = eps * np.abs(exact) + 2.0**-21 * terms + 1e-6
    assert np.all(np.abs(np.asarray(y, np.float64) - exact) <= bound)
    assert np.all(np.abs(np.asarray(ref, np.float64) - exact) <= bound)


@pytest.mark.parametrize("interpret", MODES)
def test_per_tensor_scales_and_small_blocks(interpret):
    m, k, n = 17, 256, 96
    xq, wq, _, _, _ = _operands(m, k, n, seed=3)
    xs, ws = jnp.float32(0.02), jnp.ones((1, 1), jnp.bfloat16)
    bs = BlockSizes(block_m=16, block_n=32, block_k=32, quant_block_m=16, quant_block_k=64)
    y = int8_matmul(xq, wq, xs, ws, out_dtype=jnp.float32, block_sizes=bs, interpret=interpret)
    exact = _exact(xq, wq, np.full((m, 1), 0.02, np.float32), np.ones(n), None)
    assert np.all(np.abs(np.asarray(y, np.float64) - exact) <= 2.0**-21 * np.abs(exact) + 1e-6)


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize(
    "shape, x_dtype, fuse",
    [
        ((1, 256, 128), jnp.bfloat16, "prologue"),
        ((17, 200, 96), jnp.bfloat16, "prologue"),
        ((100, 256, 256), jnp.float32, "prologue"),
        ((1, 256, 128), jnp.float32, "inline"),
        ((17, 200, 96), jnp.bfloat16, "inline"),
        ((100, 256, 256), jnp.bfloat16, "inline"),
    ],
    ids=lambda v: "m{}k{}n{}".format(*v) if isinstance(v, tuple) else str(v),
)
def test_int8_matmul_dynamic(shape, x_dtype, fuse, interpret):
    m, k, n = shape
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((m, k)) * 3.0, x_dtype)
    _, wq, _, ws, b = _operands(m, k, n)
    q, s = quantize_rows(x, interpret=interpret)
    qr, sr = quantize_rows_reference(x)
    assert q.dtype == jnp.int8 and s.shape == (m, 1)
    # Same formula; a tie may round the other way only under GPU approximate division.
    assert int(jnp.max(jnp.abs(q.astype(jnp.int32) - qr.astype(jnp.int32)))) <= (
        1 if not interpret else 0
    )
    # GPU f32 division may be 2 ulp off the IEEE quotient.
    np.testing.assert_allclose(np.asarray(s), np.asarray(sr), rtol=1e-7 if interpret else 1e-6)
    y = int8_matmul_dynamic(x, wq, ws, b, out_dtype=jnp.float32, interpret=interpret, fuse=fuse)
    ref = int8_matmul_dynamic_reference(x, wq, ws, b, out_dtype=jnp.float32)
    exact, bound = _dynamic_bound(x, wq, ws, b)
    assert np.all(np.abs(np.asarray(y, np.float64) - exact) <= bound)
    assert np.all(np.abs(np.asarray(ref, np.float64) - exact) <= bound)
    if interpret:
        np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_quantizer_zero_and_constant_rows():
    x = jnp.stack([jnp.zeros(64), jnp.full(64, -2.5), jnp.linspace(-1, 1, 64)]).astype(jnp.float32)
    q, s = quantize_rows(x, interpret=True)
    recon = np.asarray(q, np.float32) * np.asarray(s)
    assert np.all(np.isfinite(np.asarray(s)))
    np.testing.assert_array_equal(recon[0], 0.0)
    np.testing.assert_allclose(recon[1], -2.5, rtol=1e-6)
    assert np.max(np.abs(recon[2] - np.asarray(x[2]))) <= float(s[2, 0]) / 2 + 1e-7


@settings(max_examples=4)
@given(seed=st.integers(0, 2**31 - 1), mag=st.sampled_from([1e-4, 1.0, 1e4]))
def test_property_dynamic_fixed_shape(seed, mag):
    m, k, n = 3, 128, 64
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k)) * mag, jnp.float32)
    _, wq, _, ws, _ = _operands(m, k, n, seed=seed)
    y = int8_matmul_dynamic(x, wq, ws, out_dtype=jnp.float32, interpret=True)
    ref = int8_matmul_dynamic_reference(x, wq, ws, out_dtype=jnp.float32)
    tol = 1e-5 * np.abs(np.asarray(ref)).max() + 1e-30
    assert np.max(np.abs(np.asarray(y) - np.asarray(ref))) <= tol


@pytest.mark.parametrize(
    "args, match",
    [
        (dict(xq=jnp.zeros((2, 64), jnp.uint8)), "x_q has dtype uint8"),
        (dict(wq=jnp.zeros((64, 32), jnp.float32)), "w_q has dtype float32"),
        (dict(xs=jnp.ones((3, 1))), "x_scale has shape"),
        (dict(ws=jnp.ones((2, 32))), "w_scale has shape"),
        (dict(out_dtype=jnp.int8), "out_dtype has dtype int8"),
        (dict(bs=BlockSizes(block_n=48)), "block_n=48"),
    ],
)
def test_bad_input_raises_not_implemented(args, match):
    xq = args.get("xq", jnp.zeros((2, 64), jnp.int8))
    wq = args.get("wq", jnp.zeros((64, 32), jnp.int8))
    xs = args.get("xs", jnp.ones((2, 1)))
    ws = args.get("ws", jnp.ones((32,)))
    with pytest.raises(NotImplementedError, match=match):
        int8_matmul(
            xq,
            wq,
            xs,
            ws,
            out_dtype=args.get("out_dtype", jnp.float32),
            block_sizes=args.get("bs"),
            interpret=True,
        )


def test_dynamic_bad_fuse():
    with pytest.raises(NotImplementedError, match="fuse='epilogue'"):
        int8_matmul_dynamic(
            jnp.zeros((2, 64), jnp.bfloat16),
            jnp.zeros((64, 32), jnp.int8),
            jnp.ones((32,)),
            interpret=True,
            fuse="epilogue",
        )


def test_dynamic_bad_activation_dtype():
    with pytest.raises(NotImplementedError, match="x has dtype int8"):
        int8_matmul_dynamic(
            jnp.zeros((2, 64), jnp.int8),
            jnp.zeros((64, 32), jnp.int8),
            jnp.ones((32,)),
            interpret=True,
        )


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("fuse", ["prologue", "inline"])
def test_nk_weight_layout(fuse, interpret):
    """A (N, K) weight gives the same result as its (K, N) transpose."""
    m, k, n = 17, 200, 96
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    _, wq, _, ws, b = _operands(m, k, n, seed=5)
    y = int8_matmul_dynamic(
        x, wq.T, ws, b, out_dtype=jnp.float32, interpret=interpret, fuse=fuse, w_layout="nk"
    )
    ref = int8_matmul_dynamic_reference(x, wq, ws, b, out_dtype=jnp.float32)
    if interpret:
        np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-5)
    exact, bound = _dynamic_bound(x, wq, ws, b)
    assert np.all(np.abs(np.asarray(y, np.float64) - exact) <= bound)
    with pytest.raises(ValueError, match="w_layout='nk'"):
        int8_matmul(jnp.zeros((m, k), jnp.int8), wq, jnp.ones(()), ws, w_layout="nk")

"""FP8 E4M3 Pallas kernel against its plain-jnp reference (interpret on CPU; native on GPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jqx.kernels.pallas.fp8_matmul import BlockSizes, fp8_matmul, fp8_matmul_reference

ON_GPU = jax.default_backend() == "gpu"
# The native twins carry the "gpu" marker: `pytest -m gpu` runs only them on a GPU.
MODES = [
    True,
    pytest.param(
        False, marks=[pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="needs a GPU")]
    ),
]
OUT_EPS = {"bfloat16": 2.0**-8, "float16": 2.0**-11, "float32": 2.0**-22}
E4M3 = jnp.float8_e4m3fn


def _operands(m, k, n, seed=0):
    rng = np.random.default_rng(seed)
    xq = jnp.asarray(rng.standard_normal((m, k)) * 4, E4M3)
    wq = jnp.asarray(rng.standard_normal((k, n)) * 4, E4M3)
    return xq, wq


def _check(y, xq, wq, xs, ws, out_dtype, acc_rel):
    """|y - exact| <= acc_rel * (|x| @ |w|) * |scales| + output rounding; exact in f64."""
    x64 = np.asarray(xq.astype(jnp.float32), np.float64)
    w64 = np.asarray(wq.astype(jnp.float32), np.float64)
    m, n = x64.shape[0], w64.shape[1]
    sx = np.broadcast_to(np.asarray(xs, np.float64).reshape(-1, 1), (m, 1))
    sw = np.broadcast_to(np.asarray(ws, np.float64).reshape(1, -1), (1, n))
    exact = (x64 @ w64) * sx * sw
    absprod = (np.abs(x64) @ np.abs(w64)) * np.abs(sx) * np.abs(sw)
    bound = acc_rel * absprod + OUT_EPS[jnp.dtype(out_dtype).name] * np.abs(exact) + 1e-30
    err = np.abs(np.asarray(y.astype(jnp.float32), np.float64) - exact)
    assert np.all(err <= bound), float(np.max(err - bound))


CASES = [(1, 256, 256), (3, 256, 128), (17, 200, 96), (100, 384, 130)]
# Hopper's fp8 MMA keeps fewer accumulator bits than IEEE f32 inside one instruction.
ACC_REL = {True: 2.0**-20, False: 2.0**-12}


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", CASES, ids=lambda s: "m{}k{}n{}".format(*s))
def test_per_row_per_column_scales(shape, out_dtype, interpret):
    m, k, n = shape
    xq, wq = _operands(m, k, n)
    rng = np.random.default_rng(1)
    xs = jnp.asarray(rng.uniform(0.01, 1.0, (m, 1)), jnp.float32)
    ws = jnp.asarray(rng.uniform(0.01, 1.0, (n,)), jnp.float32)
    y = fp8_matmul(xq, wq, xs, ws, out_dtype=out_dtype, interpret=interpret)
    assert y.shape == (m, n) and y.dtype == jnp.dtype(out_dtype)
    _check(y, xq, wq, xs, ws, out_dtype, ACC_REL[interpret])
    _check(
        fp8_matmul_reference(xq, wq, xs, ws, out_dtype=out_dtype),
        xq,
        wq,
        xs,
        ws,
        out_dtype,
        2.0**-20,
    )


@pytest.mark.parametrize("interpret", MODES)
def test_per_tensor_scales_and_blocks(interpret):
    m, k, n = 17, 256, 96
    xq, wq = _operands(m, k, n, seed=2)
    xs, ws = jnp.float32(0.125), jnp.asarray([3.0], jnp.bfloat16)
    bs = BlockSizes(block_m=16, block_n=32, block_k=32)
    y = fp8_matmul(xq, wq, xs, ws, out_dtype=jnp.float32, block_sizes=bs, interpret=interpret)
    _check(y, xq, wq, np.float32(0.125), np.float32(3.0), jnp.float32, ACC_REL[interpret])


@settings(max_examples=5)
@given(seed=st.integers(0, 2**31 - 1), mag=st.sampled_from([1e-3, 1.0, 1e3]))
def test_property_fixed_shape(seed, mag):
    xq, wq = _operands(3, 128, 64, seed=seed)
    xs = jnp.full((3, 1), mag, jnp.float32)
    ws = jnp.full((64,), 0.5, jnp.float32)
    y = fp8_matmul(xq, wq, xs, ws, out_dtype=jnp.float32, interpret=True)
    _check(y, xq, wq, xs, ws, jnp.float32, 2.0**-20)


@pytest.mark.parametrize(
    "xq, wq, xs, match",
    [
        (
            jnp.zeros((2, 64), jnp.float8_e5m2),
            jnp.zeros((64, 32), E4M3),
            jnp.ones(()),
            "x_q has dtype float8_e5m2",
        ),
        (
            jnp.zeros((2, 64), E4M3),
            jnp.zeros((64, 32), jnp.bfloat16),
            jnp.ones(()),
            "w_q has dtype bfloat16",
        ),
        (jnp.zeros((2, 64), E4M3), jnp.zeros((64, 32), E4M3), jnp.ones((5,)), "x_scale has shape"),
        (
            jnp.zeros((2, 64), E4M3),
            jnp.zeros((64, 32), E4M3),
            jnp.ones((), jnp.int32),
            "x_scale has dtype int32",
        ),
    ],
)
def test_bad_input_raises_not_implemented(xq, wq, xs, match):
    with pytest.raises(NotImplementedError, match=match):
        fp8_matmul(xq, wq, xs, jnp.ones(()), interpret=True)


def test_mismatched_k_raises_value_error():
    with pytest.raises(ValueError, match="same K"):
        fp8_matmul(
            jnp.zeros((2, 64), E4M3),
            jnp.zeros((32, 32), E4M3),
            jnp.ones(()),
            jnp.ones(()),
            interpret=True,
        )


@pytest.mark.parametrize("interpret", MODES)
def test_nk_weight_layout(interpret):
    """A (N, K) weight gives the same result as its (K, N) transpose."""
    m, k, n = 17, 200, 96
    xq, wq = _operands(m, k, n, seed=4)
    xs, ws = jnp.float32(0.5), jnp.linspace(0.1, 1.0, n, dtype=jnp.float32)
    y = fp8_matmul(xq, wq.T, xs, ws, out_dtype=jnp.float32, interpret=interpret, w_layout="nk")
    _check(y, xq, wq, xs, ws, jnp.float32, ACC_REL[interpret])
    with pytest.raises(NotImplementedError, match="w_layout='kt'"):
        fp8_matmul(xq, wq, xs, ws, w_layout="kt")

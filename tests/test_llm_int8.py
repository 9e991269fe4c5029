"""LLM.int8(): equals W8A8 without outliers, the accuracy goal, jit/static shapes, errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jqx
from jqx.recipes.llm_int8 import llm_int8_matmul, outlier_columns

K, N, M = 1024, 256, 256


def _weight(seed=0):
    w = jax.random.normal(jax.random.key(seed), (K, N)) * 0.05
    return w, jqx.quantize({"kernel": w}, jqx.llm_int8(threshold=6.0))["kernel"]


def _inputs(seed=1, n_out=6):
    """N(0, 1) activations with ``n_out`` outlier feature columns of magnitude 8-20 (random sign)."""
    ks = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(ks[0], (M, K))
    cols = jax.random.choice(ks[1], K, (n_out,), replace=False)
    mag = jax.random.uniform(ks[2], (M, n_out), minval=8.0, maxval=20.0)
    sign = jnp.sign(jax.random.normal(ks[3], (M, n_out)))
    return x.at[:, cols].set(mag * sign), cols


def _w8a8(x, q):
    xc, xs = jqx.quantize_activation(x, "int8", "per_token")
    acc = jax.lax.dot_general(
        xc, q.qvalue, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32
    )
    return acc.astype(jnp.float32) * xs * q.scale.reshape(1, -1)


def test_no_outliers_equals_w8a8():
    _, q = _weight()
    x = jnp.clip(jax.random.normal(jax.random.key(2), (M, K)), -5.0, 5.0)
    assert not bool(jnp.any(outlier_columns(x, 6.0)))
    np.testing.assert_allclose(
        np.asarray(llm_int8_matmul(x, q)), np.asarray(_w8a8(x, q)), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_goal_outlier_columns(seed):
    """Issue goal: relative output error < 1% with outlier columns of magnitude
    8-20, where plain per-token W8A8 is > 2.5%.

    Measured (seeds 1/2/3): LLM.int8 0.95%/0.97%/0.95%, W8A8 2.9%/3.0%/2.9%
    (bf16 outlier product: 0.96%/0.98%/0.96%). About 0.6% of
    LLM.int8's error is the int8 weight error on the outlier rows (the outlier
    product uses the dequantized weight, as in bitsandbytes).
    """
    w, q = _weight()
    x, cols = _inputs(seed)
    mask = outlier_columns(x, 6.0)
    assert set(np.flatnonzero(np.asarray(mask))) == set(np.asarray(cols).tolist())
    y = jnp.matmul(x, w, precision="highest")
    rel = lambda a: float(jnp.linalg.norm(a - y) / jnp.linalg.norm(y))  # noqa: E731
    e_llm, e_w8a8 = rel(llm_int8_matmul(x, q)), rel(_w8a8(x, q))
    assert e_llm < 0.01 and e_w8a8 > 0.025, (e_llm, e_w8a8)
    # bf16 for the outlier product: about the same here
    assert rel(llm_int8_matmul(x, q, outlier_dtype=jnp.bfloat16)) < 0.012


@pytest.mark.parametrize("n_out", [0, 5, 40])
def test_gathered_outlier_rows_equal_the_dense_product(n_out):
    """max_outliers: the 16-bit product over the gathered outlier rows only (5 of them),
    or, with more outliers than that (40 > 32), over all K; the int8 part's codes and
    sums are the same, so without outliers the result is bit-identical and with them
    within float32 summation order of sum |x| |w|. Under jit, decode-sized rows."""
    _, q = _weight()
    x, _ = _inputs(seed=4, n_out=n_out)
    x = x[:3]
    ref = llm_int8_matmul(x, q)
    got = jax.jit(lambda a: llm_int8_matmul(a, q, max_outliers=32))(x)
    if n_out == 0:
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    with pytest.raises(ValueError, match="max_outliers=0 must be None"):
        llm_int8_matmul(x, q, max_outliers=0)
    mag = np.abs(np.asarray(x, np.float64)) @ np.abs(np.asarray(q.dequantize(), np.float64))
    assert np.all(np.abs(np.asarray(got, np.float64) - np.asarray(ref, np.float64)) <= 1e-6 * mag)


@pytest.mark.skipif(
    jqx.ops.native_status() != "available", reason="the native int8 GEMM does not run here"
)
def test_decode_rows_take_the_native_route_with_the_xla_paths_result():
    """jqx.ops sends LLM.int8() products of up to 16 rows to native.llm_int8 (the VNNI
    GEMM's exact int32 sums, the outlier rows gathered): the XLA route's result within
    float32 summation order; more rows stay on XLA."""
    _, q = _weight()
    x, _ = _inputs(seed=5, n_out=4)
    dn = (((1,), (0,)), ((), ()))
    for rows in (1, 16):
        assert jqx.ops.explain(x[:rows], q, dn) == "native.llm_int8"
        got = jax.jit(lambda a: jqx.ops.dot_general(a, q, dn))(x[:rows])
        ref = jqx.ops.dot_general(x[:rows], q, dn, backend="xla")
        mag = np.abs(np.asarray(x[:rows], np.float64)) @ np.abs(np.asarray(q.dequantize()))
        assert np.all(np.abs(np.asarray(got, np.float64) - np.asarray(ref)) <= 1e-6 * mag)
    assert jqx.ops.explain(x[:17], q, dn) == "xla.llm_int8"


def test_jit_static_shapes_and_threshold():
    w, q = _weight()
    x, _ = _inputs(1)
    f = jax.jit(chex.assert_max_traces(lambda x, q: llm_int8_matmul(x, q), n=1))
    y1 = f(x, q)
    y2 = f(x * 0.1, q)  # different outlier set (none), same trace
    np.testing.assert_allclose(
        np.asarray(y1), np.asarray(llm_int8_matmul(x, q)), rtol=1e-5, atol=1e-4
    )
    np.testing.assert_allclose(np.asarray(y2), np.asarray(_w8a8(x * 0.1, q)), rtol=1e-5, atol=1e-5)
    # leading dims and dtypes
    y3 = llm_int8_matmul(x.reshape(4, M // 4, K).astype(jnp.bfloat16), q)
    assert y3.shape == (4, M // 4, N) and y3.dtype == jnp.bfloat16
    # a threshold above every value: plain W8A8
    np.testing.assert_allclose(
        np.asarray(llm_int8_matmul(x, q, 100.0)), np.asarray(_w8a8(x, q)), rtol=1e-6, atol=1e-6
    )


def test_bad_input():
    _, q = _weight()
    with pytest.raises(ValueError, match=r"x has 512 features.*K=1024"):
        llm_int8_matmul(jnp.ones((2, 512)), q)
    q4 = jqx.quantize({"kernel": jnp.ones((K, N))}, jqx.int4_weight_only())["kernel"]
    with pytest.raises(NotImplementedError, match="per output channel"):
        llm_int8_matmul(jnp.ones((2, K)), q4)
    with pytest.raises(ValueError, match="outlier_dtype"):
        llm_int8_matmul(jnp.ones((2, K)), q, outlier_dtype=jnp.float32)
    with pytest.raises(TypeError, match="jqx.QArray"):
        llm_int8_matmul(jnp.ones((2, K)), jnp.ones((K, N)))

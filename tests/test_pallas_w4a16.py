"""W4A16 Pallas kernel against its plain-jnp reference (interpret mode on CPU; native on GPU)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jqx.kernels.pallas.w4a16_matmul import (
    BlockSizes,
    dequantize_w4,
    w4a16_matmul,
    w4a16_matmul_reference,
)

ON_GPU = jax.default_backend() == "gpu"
# The same test bodies run in interpret mode everywhere and natively when a GPU is present.
# The native twins carry the "gpu" marker: `pytest -m gpu` runs only them on a GPU.
MODES = [
    True,
    pytest.param(
        False, marks=[pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="needs a GPU")]
    ),
]
OUT_EPS = {"bfloat16": 2.0**-8, "float16": 2.0**-11, "float32": 2.0**-22}


def _inputs(m, k, n, g, signed, zeros, x_dtype, scale_dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k)), x_dtype)
    pw = jnp.asarray(rng.integers(0, 256, (k, (n + 1) // 2)), jnp.uint8)
    s = jnp.asarray(rng.uniform(0.01, 0.1, (k // g, n)), scale_dtype)
    z = jnp.asarray(rng.integers(0, 16, (k // g, n)), scale_dtype) if zeros else None
    return x, pw, s, z


@functools.partial(jax.jit, static_argnames="out_dtype")
def _bound(x, w, ref, out_dtype, rel):
    """Per-element bound: ``rel * (|x| @ |w|)`` (accumulation/rounding) + output rounding."""
    absprod = jnp.dot(jnp.abs(x.astype(jnp.float32)), jnp.abs(w), precision="highest")
    return rel * absprod + OUT_EPS[jnp.dtype(out_dtype).name] * jnp.abs(ref.astype(jnp.float32))


@functools.partial(
    jax.jit, static_argnames=("group_size", "signed", "out_dtype", "block_sizes", "interpret")
)
def _kernel_and_reference(x, pw, s, z, *, group_size, signed=False, out_dtype, **kw):
    """The kernel, the plain-jnp reference and the dequantized weight in one compiled
    program per case (each of the reference's ops would compile on its own eagerly)."""
    y = w4a16_matmul(x, pw, s, z, group_size=group_size, signed=signed, out_dtype=out_dtype, **kw)
    kind = dict(group_size=group_size, signed=signed)
    ref = w4a16_matmul_reference(x, pw, s, z, out_dtype=out_dtype, **kind)
    return y, ref, dequantize_w4(pw, s, z, **kind)


# (M, K, N, group, signed, zeros, x dtype, out dtype): ragged M, K and N multiples of 128
# and not, odd N, every group size, per-channel group, both code kinds.
CASES = [
    (1, 256, 256, 128, False, True, jnp.bfloat16, jnp.bfloat16),
    (3, 256, 256, 32, True, False, jnp.bfloat16, jnp.float32),
    (17, 192, 200, 64, False, True, jnp.float16, jnp.float16),
    (100, 384, 96, 384, False, True, jnp.bfloat16, jnp.float32),
    (16, 128, 130, 32, True, False, jnp.float32, jnp.float32),
    (5, 96, 33, 32, False, False, jnp.bfloat16, jnp.float32),
]


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "m{}k{}n{}g{}".format(*c[:4]))
def test_matches_reference(case, interpret):
    m, k, n, g, signed, zeros, xd, od = case
    x, pw, s, z = _inputs(m, k, n, g, signed, zeros, xd)
    y, ref, w = _kernel_and_reference(
        x, pw, s, z, group_size=g, signed=signed, out_dtype=od, interpret=interpret
    )
    assert y.shape == (m, n) and y.dtype == jnp.dtype(od)
    # The reference's arithmetic: only the f32 summation order differs, and then both
    # round to the output dtype (two roundings: up to one unit apart, seen on an H200).
    err = jnp.abs(y.astype(jnp.float32) - ref.astype(jnp.float32))
    eps = OUT_EPS[jnp.dtype(od).name]
    ref32 = ref.astype(jnp.float32)
    assert bool(
        jnp.all(err <= _bound(x, w, ref, jnp.float32, 1e-5) + 2 * eps * jnp.abs(ref32) + 1e-6)
    )
    # Against exact f32 math: the weight is never rounded to x's dtype, so the same bound
    # holds with one output rounding.
    exact = jnp.dot(x.astype(jnp.float32), w, precision="highest")
    err = jnp.abs(y.astype(jnp.float32) - exact)
    assert bool(jnp.all(err <= _bound(x, w, exact, od, 1e-5) + 1e-6))


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize(
    "bs",
    [
        BlockSizes(block_m=16, block_n=32, block_k=32, split_k=1),
        BlockSizes(block_m=32, block_n=64, block_k=128, split_k=2),
        BlockSizes(block_m=16, block_n=32, block_k=16, split_k=4),
    ],
    ids=["bk=g", "bk>g_split2", "bk<g_split4"],
)
def test_block_sizes_and_split_k(bs, interpret):
    m, k, n, g = 17, 256, 96, 64
    x, pw, s, z = _inputs(m, k, n, g, False, True, jnp.bfloat16, scale_dtype=jnp.bfloat16)
    y, ref, w = _kernel_and_reference(
        x, pw, s, z, group_size=g, out_dtype=jnp.float32, block_sizes=bs, interpret=interpret
    )
    assert bool(jnp.all(jnp.abs(y - ref) <= _bound(x, w, ref, jnp.float32, 1e-5) + 1e-6))


@settings(max_examples=8)
@given(seed=st.integers(0, 2**31 - 1), mag=st.sampled_from([1e-3, 1.0, 1e3]), signed=st.booleans())
def test_property_fixed_shape(seed, mag, signed):
    m, k, n, g = 3, 128, 64, 32
    x, pw, s, z = _inputs(m, k, n, g, signed, not signed, jnp.bfloat16, seed=seed)
    s = s * jnp.float32(mag)
    y, ref, w = _kernel_and_reference(
        x, pw, s, z, group_size=g, signed=signed, out_dtype=jnp.float32, interpret=True
    )
    assert bool(jnp.all(jnp.abs(y - ref) <= _bound(x, w, ref, jnp.float32, 1e-5) + 1e-30))


def test_jit_and_qarray_layout():
    """The kernel reads jqx's QArray layout as is (uint4 + zero point and int4 absmax)."""
    jqx = pytest.importorskip("jqx")
    from jqx.core.numerics import per_group, quantize_array

    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.standard_normal((256, 96)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((4, 256)), jnp.bfloat16)
    del jqx
    for fmt, scheme, signed in (("uint4", "zero_point", False), ("int4", "absmax", True)):
        q = quantize_array(w, fmt, scheme=scheme, granularity=per_group(32, axis=-2))
        f = jax.jit(
            functools.partial(
                w4a16_matmul, group_size=32, signed=signed, out_dtype=jnp.float32, interpret=True
            )
        )
        y = f(x, q.qvalue, q.scale, q.zero_point)
        wd = q.dequantize().astype(jnp.float32)
        exact = jnp.dot(x.astype(jnp.float32), wd, precision="highest")
        err = jnp.abs(y - exact)
        assert bool(jnp.all(err <= _bound(x, wd, exact, jnp.float32, 2.0**-8) + 1e-6)), fmt


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(x_dtype=jnp.int8), "x has dtype int8"),
        (dict(group_size=48, k=128), "group_size=48 does not divide"),
        (dict(group_size=24, k=96), "group_size=24 is not supported"),
        (dict(signed=True), "signed=True takes no zero points"),
        (dict(block_sizes=BlockSizes(block_m=24)), "block_m=24"),
        (dict(block_sizes=BlockSizes(block_n=16)), "block_n=16 .* >= 32"),
        (dict(block_sizes=BlockSizes(block_k=64), group_size=96, k=96), "block_k=64"),
        (dict(out_dtype=jnp.int32), "out_dtype has dtype int32"),
    ],
)
def test_bad_input_raises_not_implemented(kwargs, match):
    k = kwargs.pop("k", 128)
    g = kwargs.pop("group_size", 32)
    xd = kwargs.pop("x_dtype", jnp.bfloat16)
    x = jnp.zeros((2, k), xd)
    pw = jnp.zeros((k, 32), jnp.uint8)
    s = jnp.ones((max(k // g, 1), 64), jnp.float32)
    z = jnp.zeros_like(s)
    with pytest.raises(NotImplementedError, match=match):
        w4a16_matmul(x, pw, s, z, group_size=g, interpret=True, **kwargs)


def test_bad_shapes_raise_value_error():
    x = jnp.zeros((2, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="packed_w has shape"):
        w4a16_matmul(x, jnp.zeros((64, 32), jnp.uint8), jnp.ones((4, 64)), group_size=32)
    with pytest.raises(ValueError, match="expected ceil"):
        w4a16_matmul(x, jnp.zeros((128, 31), jnp.uint8), jnp.ones((4, 64)), group_size=32)

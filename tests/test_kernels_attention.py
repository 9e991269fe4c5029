"""jqx.kernels.cpu.native.decode_attention (gguf_gemv.cc's jqx_decode_attention): one
new token's attention over the visible slots of a float32 / float16 KV cache, against a
float64 numpy reference (grouped-query and multi-head, left padding, one visible slot,
the whole cache, several sequences with different ranges, caches cut into several
parts, nothing visible), with hypothesis over values and ranges; the jnp reference;
under jit with traced lengths (one trace), vmap; thread-count independence; the errors."""

import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jqx.kernels.cpu import native

needs_kernel = pytest.mark.skipif(
    not native.gguf_available(),
    reason=f"native attention kernel unavailable: {native.gguf_status()}",
)


def reference64(q, k, v, lo, hi, scale):
    """float64 attention over slots [clip(lo), clip(hi)) of each sequence (zeros when
    empty), and a per-(b, h) error bound for a float32 computation of it.

    The bound is 2e-6 * max|v| * (1 + max_s scale * sum_d |q_d k_sd|): float32 error in a
    score moves its weight relatively by about eps times the score's magnitude, and
    the weighted mean of v moves by at most that times max|v| (plus eps * max|v| for
    the sums)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b_, h_, d_ = q.shape
    kvh, s_ = k.shape[1], k.shape[2]
    g_ = h_ // kvh
    out = np.zeros((b_, h_, d_))
    bound = np.full((b_, h_, 1), 1e-30)
    for b in range(b_):
        lo_b = min(max(int(lo[b]), 0), s_)
        hi_b = min(max(int(hi[b]), lo_b), s_)
        if hi_b == lo_b:
            continue
        for h in range(h_):
            kk, vv = k[b, h // g_, lo_b:hi_b], v[b, h // g_, lo_b:hi_b]
            s = scale * (kk @ q[b, h])
            p = np.exp(s - s.max())
            out[b, h] = p @ vv / p.sum()
            mag = abs(scale) * (np.abs(kk) @ np.abs(q[b, h])).max()
            bound[b, h] = 2e-6 * np.abs(vv).max() * (1 + mag) + 1e-30
    return out, bound


def assert_close(y, q, k, v, lo, hi, scale):
    ref, bound = reference64(q, k, v, lo, hi, scale)
    y = np.asarray(y)
    assert y.dtype == np.float32 and y.shape == ref.shape
    assert np.isfinite(y).all()
    err = np.abs(y.astype(np.float64) - ref)
    worst = np.unravel_index(np.argmax(err / bound), err.shape)
    assert (err <= bound).all(), (
        f"|err| {err[worst]:.3g} > bound {bound[worst[:2]][0]:.3g} at {worst}"
    )


def make(rng, b, h, kvh, s, d, dtype, *, q_scale=1.0):
    q = (rng.standard_normal((b, h, d)) * q_scale).astype(np.float32)
    k = rng.standard_normal((b, kvh, s, d)).astype(dtype)
    v = rng.standard_normal((b, kvh, s, d)).astype(dtype)
    return q, k, v


def run(q, k, v, lo, hi, scale, fn=None):
    fn = fn or native.decode_attention
    return fn(
        jnp.asarray(q),
        jnp.asarray(k),
        jnp.asarray(v),
        jnp.asarray(np.asarray(lo, np.int32)),
        jnp.asarray(np.asarray(hi, np.int32)),
        scale=scale,
    )


# (B, H, KVH, S, D, lo, hi): SmolLM2's heads (9 over 3 kv heads of 64) with the whole
# cache, left padding, one visible slot; multi-head (H = KVH); two sequences with
# different ranges; D not a multiple of 8; G = 5 (a tile of 4 heads and one of 1);
# caches cut into several parts (more than 256 visible slots); nothing visible;
# out-of-range lo / hi (clipped).
CASES = [
    (1, 9, 3, 256, 64, [0], [256]),
    (1, 9, 3, 256, 64, [37], [200]),
    (1, 9, 3, 256, 64, [5], [6]),
    (1, 4, 4, 64, 64, [3], [64]),
    (2, 9, 3, 128, 64, [0, 17], [128, 90]),
    (2, 6, 2, 40, 12, [1, 0], [40, 7]),
    (1, 5, 1, 33, 16, [0], [33]),
    (2, 9, 3, 700, 64, [0, 100], [700, 613]),
    (2, 9, 3, 64, 64, [10, 0], [10, 64]),
    (2, 4, 2, 32, 8, [-5, 30], [50, 20]),
]


@needs_kernel
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:5])))
def test_against_float64(case, dtype):
    b, h, kvh, s, d, lo, hi = case
    rng = np.random.default_rng(b * 1000 + s + d)
    q, k, v = make(rng, b, h, kvh, s, d, dtype)
    scale = d**-0.5
    assert_close(run(q, k, v, lo, hi, scale), q, k, v, lo, hi, scale)


@needs_kernel
def test_nothing_visible_gives_zeros_and_invisible_slots_are_not_read():
    rng = np.random.default_rng(0)
    q, k, v = make(rng, 2, 9, 3, 300, 64, np.float16)
    lo, hi = [20, 7], [281, 7]  # sequence 1: hi == lo
    # NaN in every invisible slot: a kernel that reads them would return NaN.
    for c in (k, v):
        c[0, :, :20] = np.nan
        c[0, :, 281:] = np.nan
        c[1] = np.nan
    y = np.asarray(run(q, k, v, lo, hi, 0.125))
    assert (y[1] == 0).all()
    assert_close(y, q, k, v, lo, hi, 0.125)


@needs_kernel
def test_large_scores_stay_finite():
    # Scores in the thousands: without the max subtracted exp would overflow.
    rng = np.random.default_rng(1)
    q, k, v = make(rng, 1, 9, 3, 300, 64, np.float32, q_scale=300.0)
    y = run(q, k, v, [0], [300], 1.0)
    assert_close(y, q, k, v, [0], [300], 1.0)


@needs_kernel
@given(
    shape=st.sampled_from([(1, 9, 3, 64, 64), (2, 4, 2, 300, 12)]),
    dtype=st.sampled_from([np.float32, np.float16]),
    seed=st.integers(0, 2**32 - 1),
    q_exp=st.integers(-8, 3),
    data=st.data(),
)
def test_property_random_ranges(shape, dtype, seed, q_exp, data):
    b, h, kvh, s, d = shape
    lo = [data.draw(st.integers(0, s)) for _ in range(b)]
    hi = [data.draw(st.integers(lo_b, s)) for lo_b in lo]
    rng = np.random.default_rng(seed)
    q, k, v = make(rng, b, h, kvh, s, d, dtype, q_scale=2.0**q_exp)
    assert_close(run(q, k, v, lo, hi, d**-0.5), q, k, v, lo, hi, d**-0.5)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_reference_against_float64(dtype):
    rng = np.random.default_rng(2)
    q, k, v = make(rng, 3, 6, 2, 50, 16, dtype)
    lo, hi = [0, 9, 30], [50, 10, 30]
    y = run(q, k, v, lo, hi, 0.25, fn=native.decode_attention_reference)
    assert_close(y, q, k, v, lo, hi, 0.25)


# ----------------------------------------------------------------- jit, vmap, threads


@needs_kernel
def test_jit_traced_lengths_trace_once_and_show_the_target():
    rng = np.random.default_rng(3)
    q, k, v = make(rng, 1, 9, 3, 256, 64, np.float16)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(q, k, v, lo, hi):
        return native.decode_attention(q, k, v, lo, hi, scale=0.125) * 2.0

    args = (jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    for n in (1, 2, 17, 255, 256):  # one decode step after another: hi grows
        lo, hi = np.array([0], np.int32), np.array([n], np.int32)
        y = f(*args, jnp.asarray(lo), jnp.asarray(hi))
        assert_close(np.asarray(y) / 2, q, k, v, lo, hi, 0.125)
    jaxpr = str(jax.make_jaxpr(f)(*args, jnp.zeros(1, jnp.int32), jnp.ones(1, jnp.int32)))
    assert native.ATTENTION_TARGET in jaxpr


@needs_kernel
def test_under_vmap_loops():
    rng = np.random.default_rng(4)
    qs, ks, vs = zip(*(make(rng, 1, 4, 2, 40, 16, np.float32) for _ in range(3)), strict=True)
    lo, hi = np.array([[0], [5], [39]], np.int32), np.array([[40], [6], [40]], np.int32)
    y = jax.vmap(lambda q, k, v, lo, hi: native.decode_attention(q, k, v, lo, hi, scale=0.25))(
        *(jnp.asarray(np.stack(a)) for a in (qs, ks, vs)), jnp.asarray(lo), jnp.asarray(hi)
    )
    for i in range(3):
        assert_close(y[i], qs[i], ks[i], vs[i], lo[i], hi[i], 0.25)


_SAME_RESULT = """
    import numpy as np, jax.numpy as jnp
    from jqx.kernels.cpu import native
    rng = np.random.default_rng(0)
    out = []
    for dtype, s, lo, hi in ((np.float16, 2048, [0, 300], [2048, 1999]),
                             (np.float32, 1024, [3], [1024])):
        b = len(lo)
        q = jnp.asarray(rng.standard_normal((b, 9, 64)).astype(np.float32))
        k = jnp.asarray(rng.standard_normal((b, 3, s, 64)).astype(dtype))
        v = jnp.asarray(rng.standard_normal((b, 3, s, 64)).astype(dtype))
        y = native.decode_attention(q, k, v, jnp.asarray(lo, jnp.int32),
                                    jnp.asarray(hi, jnp.int32), scale=0.125)
        out.append(np.asarray(y).ravel())
    np.save("{path}", np.concatenate(out))
    print(native.gguf_num_threads())
"""


@needs_kernel
def test_results_independent_of_thread_count(tmp_path):
    # The cache is cut into parts by lo / hi only, and parts merge in a fixed order.
    got = {}
    for threads in ("1", "3"):
        path = tmp_path / f"y{threads}.npy"
        r = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(_SAME_RESULT.replace("{path}", str(path)))],
            capture_output=True,
            text=True,
            env={**os.environ, "JQX_NUM_THREADS": threads},
            timeout=600,
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == [threads]
        got[threads] = np.load(path)
    assert np.array_equal(got["1"].view(np.uint32), got["3"].view(np.uint32))


# ----------------------------------------------------------------- errors


def test_bad_input_names_the_argument():
    q = jnp.zeros((2, 9, 64), jnp.float32)
    k = jnp.zeros((2, 3, 16, 64), jnp.float16)
    lo = jnp.zeros((2,), jnp.int32)
    ok = dict(q=q, k_cache=k, v_cache=k, lo=lo, hi=lo, scale=0.125)
    cases = [
        (
            dict(q=q.astype(jnp.bfloat16)),
            r"q must be float32 \(B, H, D\).*got bfloat16 \(2, 9, 64\)",
        ),
        (dict(q=q[0]), r"q must be float32 \(B, H, D\).*got float32 \(9, 64\)"),
        (
            dict(k_cache=k.astype(jnp.bfloat16), v_cache=k.astype(jnp.bfloat16)),
            r"k_cache must be float32 or float16 \(B, KVH, S, D\), got bfloat16",
        ),
        (dict(k_cache=k[..., :32], v_cache=k[..., :32]), r"head_dim D=64 of q"),
        (dict(k_cache=k[:1], v_cache=k[:1]), r"batch B=2"),
        (
            dict(k_cache=jnp.zeros((2, 2, 16, 64), jnp.float16)),
            r"H=9 heads, which is not a multiple of k_cache's KVH=2",
        ),
        (dict(v_cache=k.astype(jnp.float32)), r"v_cache must have k_cache's shape and dtype"),
        (dict(v_cache=k[:, :, :8]), r"v_cache must have k_cache's shape"),
        (
            dict(lo=jnp.zeros((3,), jnp.int32)),
            r"lo must be an integer array of shape \(B,\) = \(2,\)",
        ),
        (dict(hi=jnp.zeros((2,), jnp.float32)), r"hi must be an integer array.*got float32 \(2,\)"),
        (dict(hi=[3, 4]), r"hi must be an array, got list"),
        (dict(scale=jnp.float32(0.1)), r"scale must be a Python float.*got ArrayImpl"),
    ]
    for change, pattern in cases:
        for fn in (native.decode_attention, native.decode_attention_reference):
            with pytest.raises(ValueError, match=pattern):
                fn(**{**ok, **change})


def test_traced_scale_is_rejected():
    q = jnp.zeros((1, 1, 8), jnp.float32)
    k = jnp.zeros((1, 1, 4, 8), jnp.float32)
    lo = jnp.zeros((1,), jnp.int32)
    f = jax.jit(lambda s: native.decode_attention_reference(q, k, k, lo, lo, scale=s))
    with pytest.raises(ValueError, match=r"scale must be a Python float known at trace time"):
        f(0.5)

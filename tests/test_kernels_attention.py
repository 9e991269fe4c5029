"""jqx.kernels.cpu.native.decode_attention (gguf_gemv.cc's jqx_decode_attention): one
new token's attention over the visible slots of a float32 / float16 KV cache, against a
float64 numpy reference (grouped-query and multi-head, left padding, one visible slot,
the whole cache, several sequences with different ranges, caches cut into several
parts, nothing visible), with hypothesis over values and ranges; the jnp reference;
under jit with traced lengths (one trace), vmap; thread-count independence; the errors.
Then native.softmax_dot (a softmax and its product with the values, AVX512 and AVX2
builds) against float64."""

import functools
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


def reference64(q, k, v, lo, hi, scale, kmag=None, vmag=None):
    """float64 attention over slots [clip(lo), clip(hi)) of each sequence (zeros when
    empty), and a per-(b, h) error bound for a float32 computation of it.

    The bound is 2e-6 * max|v| * (1 + max_s scale * sum_d |q_d k_sd|): float32 error in a
    score moves its weight relatively by about eps times the score's magnitude, and
    the weighted mean of v moves by at most that times max|v| (plus eps * max|v| for
    the sums). ``kmag`` and ``vmag`` replace |k| and |v| in the bound when the
    computation sums larger terms than the values (int4: ``(code + zero) * scale``)."""
    kmag = np.abs(np.asarray(k, np.float64)) if kmag is None else kmag
    vmag = np.abs(np.asarray(v, np.float64)) if vmag is None else vmag
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
            km, vm = kmag[b, h // g_, lo_b:hi_b], vmag[b, h // g_, lo_b:hi_b]
            mag = abs(scale) * (km @ np.abs(q[b, h])).max()
            bound[b, h] = 2e-6 * vm.max() * (1 + mag) + 1e-30
    return out, bound


def assert_close(y, q, k, v, lo, hi, scale, kmag=None, vmag=None):
    ref, bound = reference64(q, k, v, lo, hi, scale, kmag, vmag)
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
    # softmax_dot (both builds where they run): chunks of rows, one thread each.
    s = rng.standard_normal((6, 100, 90)).astype(np.float32)
    x = jnp.asarray(s - s.max(-1, keepdims=True))
    v = jnp.asarray(rng.standard_normal((6, 90, 24)).astype(np.float32))
    for isa in ("avx512", "avx2") if native.available() else ("avx2",):
        out.append(np.asarray(native.softmax_dot(x, v, isa=isa)).ravel())
    # scores_softmax_dot: chunks of query rows per batch index, one thread each.
    q = jnp.asarray(rng.standard_normal((5, 70, 3, 32)).astype(np.float32))
    kk = jnp.asarray(rng.standard_normal((5, 90, 3, 32)).astype(np.float32))
    vv = jnp.asarray(rng.standard_normal((5, 90, 3, 24)).astype(np.float32))
    ax = (0, 2, 1, 3)
    for isa in ("avx512", "avx2") if native.available() else ("avx2",):
        y = native.scores_softmax_dot(q, kk, vv, ax, ax, ax, steps=("div",),
                                      scale=jnp.float32(5.6), isa=isa)
        out.append(np.asarray(y).ravel())
    np.save("{path}", np.concatenate(out))
    print(native.gguf_num_threads())
"""


@needs_kernel
def test_results_independent_of_thread_count(tmp_path):
    # The cache is cut into parts by lo / hi only, and parts merge in a fixed order.
    # Both processes start at once: most of each one's time is importing jax.
    procs = {
        threads: subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(_SAME_RESULT.replace("{path}", str(path)))],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "JQX_NUM_THREADS": threads},
        )
        for threads, path in ((t, tmp_path / f"y{t}.npy") for t in ("1", "3"))
    }
    got = {}
    try:
        for threads, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=600)
            assert proc.returncode == 0, stderr
            assert stdout.split() == [threads]
            got[threads] = np.load(tmp_path / f"y{threads}.npy")
    finally:  # a failed or timed-out check leaves no process behind
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
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


# ----------------------------------------------------------------- 4-bit (KIVI) cache
#
# native.decode_attention_int4 (jqx_decode_attention_int4) over jqx.ops.attention's
# KVCodes("int4"): against a float64 attention over the cache dequantized in float64
# (the residual window at slots (hi - 1) // g * g ..), and against the XLA path
# (decode_attention(backend="xla")). The bound is reference64's with the magnitudes
# the kernel sums: (code + zero) * scale for a slot read from the codes (the zero
# points are subtracted after the products), |x| for the residual's; the XLA path is
# another float32 computation of the same, so the two may differ by twice it.


def int4_arrays(rng, b, kvh, s, d, grp, res_dtype=np.float32):
    """Random codes, scales, zero points and residual windows of an int4 cache, as
    (k, v) tuples (codes, scale, zero, residual)."""

    def one(role):
        meta = (b, kvh, s // grp, d) if role == "k" else (b, kvh, s, d // grp)
        codes = rng.integers(0, 256, (b, kvh, s, d // 2)).astype(np.uint8)
        scale = (rng.random(meta) * 0.3 + 0.01).astype(np.float16)
        zero = rng.integers(0, 16, meta).astype(np.float16)
        res = rng.standard_normal((b, kvh, grp, d)).astype(res_dtype)
        return codes, scale, zero, res

    return one("k"), one("v")


def int4_dequantize64(arrays, role, hi):
    """float64 values (B, KVH, S, D) and their bound magnitudes, the residual window
    placed at each sequence's slots (hi - 1) // g * g .. (hi clipped to [0, S]); values
    without a window (residual None) from their codes at every slot."""
    codes, scale, zero, res = (None if a is None else np.asarray(a) for a in arrays)
    b, kvh, s, _ = codes.shape
    grp = res.shape[2] if res is not None else 2 * codes.shape[3] // scale.shape[3]
    q4 = np.stack([codes & 15, codes >> 4], axis=-1).reshape(b, kvh, s, -1).astype(np.float64)
    sc, zp = scale.astype(np.float64), zero.astype(np.float64)
    axis = 2 if role == "k" else 3
    sc, zp = np.repeat(sc, grp, axis=axis), np.repeat(zp, grp, axis=axis)
    x, mag = (q4 - zp) * sc, (q4 + zp) * sc
    for i in range(b if res is not None else 0):
        h = min(max(int(hi[i]), 0), s)
        q0 = (h - 1) // grp * grp if h > 0 else 0
        r = res[i].astype(np.float64)[:, : s - q0]
        x[i, :, q0 : q0 + grp] = r
        mag[i, :, q0 : q0 + grp] = np.abs(r)
    return x, mag


def int4_run(q, k, v, lo, hi, scale, fn=None):
    fn = fn or native.decode_attention_int4
    args = [None if a is None else jnp.asarray(a) for a in (q, *k, *v)]
    lo, hi = (jnp.asarray(np.asarray(a, np.int32)) for a in (lo, hi))
    return fn(*args, lo, hi, scale=scale)


def int4_xla(q, k, v, lo, hi, scale):
    """decode_attention(backend="xla") on the same arrays (it takes D ** -0.5); jitted,
    so that each shape compiles once."""
    from jqx.ops import attention as A

    grp = k[3].shape[2]
    kc = A.KVCodes(*(jnp.asarray(a) for a in k), kind="int4", role="k", group=grp)
    vc = A.KVCodes(
        *(None if a is None else jnp.asarray(a) for a in v), kind="int4", role="v", group=grp
    )
    assert scale == q.shape[-1] ** -0.5
    lo, hi = (jnp.asarray(np.asarray(a, np.int32)) for a in (lo, hi))
    return _xla_attention()(jnp.asarray(q), kc, vc, lo, hi)


@functools.cache
def _xla_attention():
    from jqx.ops import attention as A

    return jax.jit(functools.partial(A.decode_attention, backend="xla"))


@functools.cache
def _int4_reference_jit():
    """The jnp reference jitted: eager, each of its many ops compiles for each new
    shape (seconds per case); jitted, one program per shape."""
    return jax.jit(native.decode_attention_int4_reference, static_argnames="scale")


def int4_reference64(q, k, v, lo, hi, scale):
    """reference64 over the int4 cache dequantized in float64, with its bound."""
    kx, kmag = int4_dequantize64(k, "k", hi)
    vx, vmag = int4_dequantize64(v, "v", hi)
    return reference64(q, kx, vx, lo, hi, scale, kmag, vmag)


def int4_assert_close(y, q, k, v, lo, hi, scale):
    kx, kmag = int4_dequantize64(k, "k", hi)
    vx, vmag = int4_dequantize64(v, "v", hi)
    assert_close(y, q, kx, vx, lo, hi, scale, kmag, vmag)


# (B, H, KVH, S, D, group, lo, hi): SmolLM2's heads and KIVI's group 32 with hi at a
# group boundary (the residual holds a whole group), one past it (one residual slot),
# inside a group; left padding (lo > 0) inside the first group and past several;
# everything in the residual (lo >= (hi - 1) // g * g); one visible slot; caches cut
# into several parts (a part boundary inside a key group); D not a multiple of 16
# and groups smaller than 16 (the kernel's scalar channels and per-lane scales);
# multi-head; nothing visible; hi past S (clipped).
INT4_CASES = [
    (1, 9, 3, 640, 64, 32, [0], [640]),
    (1, 9, 3, 640, 64, 32, [0], [609]),
    (1, 9, 3, 640, 64, 32, [5], [300]),
    (2, 9, 3, 640, 64, 32, [3, 70], [608, 613]),
    (2, 9, 3, 640, 64, 32, [40, 33], [50, 35]),
    (1, 9, 3, 64, 64, 32, [7], [8]),
    (2, 4, 2, 96, 32, 16, [1, 0], [96, 17]),
    (2, 6, 2, 40, 12, 4, [3, 0], [38, 5]),
    (1, 5, 1, 64, 16, 8, [2], [61]),
    (1, 4, 4, 48, 8, 2, [0], [47]),
    (2, 9, 3, 64, 64, 32, [10, 0], [10, 70]),
]


@needs_kernel
@pytest.mark.parametrize(
    "res_dtype,v_window",
    [(np.float32, True), (np.float16, True), (np.float32, False)],
    ids=["f32", "f16", "f32-no-value-window"],
)
@pytest.mark.parametrize("case", INT4_CASES, ids=lambda c: "x".join(map(str, c[:6])))
def test_int4_against_float64_and_xla(case, res_dtype, v_window):
    b, h, kvh, s, d, grp, lo, hi = case
    rng = np.random.default_rng(b * 1000 + s + d + grp)
    k, v = int4_arrays(rng, b, kvh, s, d, grp, res_dtype)
    if not v_window:  # values read from their codes at every slot
        v = (*v[:3], None)
    q = rng.standard_normal((b, h, d)).astype(np.float32)
    scale = d**-0.5
    y = int4_run(q, k, v, lo, hi, scale)
    int4_assert_close(y, q, k, v, lo, hi, scale)
    x = int4_xla(q, k, v, lo, np.minimum(hi, s), scale)
    int4_assert_close(x, q, k, v, lo, hi, scale)  # the XLA path meets the same bound
    ref = int4_run(q, k, v, lo, hi, scale, fn=_int4_reference_jit())
    int4_assert_close(ref, q, k, v, lo, hi, scale)


@needs_kernel
@pytest.mark.parametrize("v_window", [True, False])
def test_int4_reads_neither_invisible_slots_nor_the_codes_of_the_residual_group(v_window):
    rng = np.random.default_rng(5)
    k, v = int4_arrays(rng, 2, 3, 320, 64, 32)
    if not v_window:  # values from their codes, also in the keys' residual group
        v = (*v[:3], None)
    lo, hi = [20, 7], [281, 7]  # sequence 1: nothing visible
    q = rng.standard_normal((2, 9, 64)).astype(np.float32)
    y0 = np.asarray(int4_run(q, k, v, lo, hi, 0.125))
    # NaN scales outside [lo, (hi - 1) // 32 * 32) and NaN residual rows past hi: a
    # kernel that read them would return NaN; the codes of the group being filled
    # (slots 256 .. 280) come from the residual window.
    for arrays, role in ((k, "k"), (v, "v")):
        codes, scale, zero, res = arrays
        if role == "k":
            scale[0, :, 8:] = np.nan  # key groups from slot 256: the residual's and later
        else:
            scale[0, :, :20] = np.nan
            scale[0, :, 256 if res is not None else 281 :] = np.nan
        if res is not None:
            res[0, :, 25:] = np.nan  # rows of slots 281 ..
            res[1] = np.nan
            codes[0, :, 256:] = 0
        else:
            codes[0, :, 281:] = 0
        scale[1] = np.nan
    y = np.asarray(int4_run(q, k, v, lo, hi, 0.125))
    assert np.isfinite(y).all() and (y[1] == 0).all()
    np.testing.assert_array_equal(y, y0)


def _kv_written(kind_args, seed, value_window=True):
    """Keys and values written as jqx.ops.attention does: a prefill of `prefill`
    tokens (a Python int start), then `steps` decode writes (a traced start)."""
    from jqx.ops import attention as A

    b, kvh, s, d, grp, prefill, steps, pad = kind_args
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, b, kvh, prefill + steps, d)).astype(np.float32)
    x[:, :, :, :, 3] *= 20.0  # an outlier channel, as keys have
    pad = jnp.asarray(pad, jnp.int32)
    write, block = jax.jit(A.kv_write), jax.jit(A.kv_write, static_argnums=2)
    out = []
    for role, xi in zip("kv", x, strict=True):
        c = A.kv_init("int4", role, (b, kvh, s, d), group=grp, value_window=value_window)
        if prefill:
            c = block(c, jnp.asarray(xi[:, :, :prefill]), 0, pad)
        for t in range(prefill, prefill + steps):
            c = write(c, jnp.asarray(xi[:, :, t : t + 1]), jnp.int32(t), pad)
        out.append(c)
    return out


# (B, KVH, S, D, group, prefill, decode steps, pad): the residual window empty after
# the prefill (a whole number of groups) and filled by one decode write; a decode
# write that completes a group (hi at the boundary); several groups written token by
# token with left padding; GQA over 3 kv heads.
WRITTEN = [
    (1, 3, 128, 64, 32, 64, 1, [0]),
    (2, 3, 128, 64, 32, 40, 24, [5, 0]),
    (2, 2, 96, 32, 16, 0, 50, [3, 17]),
    (1, 1, 64, 16, 8, 17, 2, [0]),
]


@needs_kernel
@pytest.mark.parametrize("value_window", [True, False])
@pytest.mark.parametrize("case", WRITTEN, ids=lambda c: "x".join(map(str, c[:7])))
def test_int4_on_written_caches_equals_xla_and_the_dequantized_cache(case, value_window):
    from jqx.ops import attention as A

    b, kvh, s, d, grp, prefill, steps, pad = case
    k, v = _kv_written(case, seed=prefill + steps, value_window=value_window)
    assert (v.residual is None) != value_window
    n = prefill + steps
    q = np.random.default_rng(n).standard_normal((b, 3 * kvh, d)).astype(np.float32)
    lo, hi = jnp.asarray(pad, jnp.int32), jnp.full((b,), n, jnp.int32)
    y = jax.jit(functools.partial(A.decode_attention, backend="native"))(q, k, v, lo, hi)
    x = _xla_attention()(jnp.asarray(q), k, v, lo, hi)
    arrays = [(c.codes, c.scale, c.zero, c.residual) for c in (k, v)]
    int4_assert_close(y, q, *arrays, pad, [n] * b, d**-0.5)
    int4_assert_close(x, q, *arrays, pad, [n] * b, d**-0.5)
    # the residual window holds the slots from (n - 1) // g * g: kv_dequantize's view
    # when the last group is not complete
    if n % grp:
        kd = jax.jit(A.kv_dequantize, static_argnums=1)(k, n)
        kx, _ = int4_dequantize64(arrays[0], "k", [n] * b)
        np.testing.assert_allclose(np.asarray(kd), kx[:, :, :n], rtol=1e-6, atol=1e-6)
        vd = jax.jit(A.kv_dequantize, static_argnums=1)(v, n)
        vx, _ = int4_dequantize64(arrays[1], "v", [n] * b)
        np.testing.assert_allclose(np.asarray(vd), vx[:, :, :n], rtol=1e-6, atol=1e-6)


@needs_kernel
@given(  # fixed shapes (one compilation each); lengths and fill counts drawn
    shape=st.sampled_from([(1, 9, 3, 64, 32, 320), (2, 4, 2, 12, 4, 48), (1, 2, 1, 32, 16, 96)]),
    res_f16=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
    data=st.data(),
)
def test_int4_property_lengths_and_fill_counts(shape, res_f16, seed, data):
    b, h, kvh, d, grp, s = shape
    hi = [data.draw(st.integers(0, s), label="hi") for _ in range(b)]  # fill = hi - qhi
    lo = [data.draw(st.integers(0, max(hi_b, 1)), label="lo") for hi_b in hi]
    rng = np.random.default_rng(seed)
    k, v = int4_arrays(rng, b, kvh, s, d, grp, np.float16 if res_f16 else np.float32)
    q = rng.standard_normal((b, h, d)).astype(np.float32)
    y = np.asarray(int4_run(q, k, v, lo, hi, d**-0.5))
    int4_assert_close(y, q, k, v, lo, hi, d**-0.5)
    x = np.asarray(int4_xla(q, k, v, lo, hi, d**-0.5))
    _, bound = int4_reference64(q, k, v, lo, hi, d**-0.5)
    assert (np.abs(y - x) <= 2 * bound).all()  # two float32 computations of one value


@needs_kernel
def test_int4_jit_traced_lengths_trace_once_and_show_the_target():
    rng = np.random.default_rng(6)
    k, v = int4_arrays(rng, 1, 3, 256, 64, 32, np.float16)
    q = rng.standard_normal((1, 9, 64)).astype(np.float32)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(q, k, v, lo, hi):
        return native.decode_attention_int4(q, *k, *v, lo, hi, scale=0.125)

    args = (jnp.asarray(q), tuple(map(jnp.asarray, k)), tuple(map(jnp.asarray, v)))
    for n in (1, 31, 32, 33, 255, 256):
        lo, hi = np.array([0], np.int32), np.array([n], np.int32)
        y = f(*args, jnp.asarray(lo), jnp.asarray(hi))
        int4_assert_close(y, q, k, v, lo, hi, 0.125)
    jaxpr = str(jax.make_jaxpr(f)(*args, jnp.zeros(1, jnp.int32), jnp.ones(1, jnp.int32)))
    assert native.ATTENTION_INT4_TARGET in jaxpr


@needs_kernel
def test_int4_dispatch_picks_the_kernel_and_the_trace_holds_it():
    from jqx.ops import attention as A
    from jqx.ops import dispatch

    k, v = _kv_written((1, 3, 64, 64, 32, 0, 3, [0]), seed=0)
    q = jnp.zeros((1, 9, 64), jnp.float32)
    assert dispatch.choose_attention(q, k) == "native"
    lo, hi = jnp.zeros((1,), jnp.int32), jnp.full((1,), 3, jnp.int32)
    jaxpr = str(jax.make_jaxpr(lambda *a: A.decode_attention(*a))(q, k, v, lo, hi))
    assert native.ATTENTION_INT4_TARGET in jaxpr
    xla = str(jax.make_jaxpr(lambda *a: A.decode_attention(*a, backend="xla"))(q, k, v, lo, hi))
    assert native.ATTENTION_INT4_TARGET not in xla


def test_int4_bad_input_names_the_argument():
    rng = np.random.default_rng(7)
    k, v = (tuple(map(jnp.asarray, c)) for c in int4_arrays(rng, 2, 3, 64, 64, 32))
    q = jnp.zeros((2, 9, 64), jnp.float32)
    lo = jnp.zeros((2,), jnp.int32)
    names = ("k_codes", "k_scale", "k_zero", "k_residual", "v_codes", "v_scale", "v_zero")
    ok = dict(zip(names, (*k, *v[:3]), strict=True), v_residual=v[3], q=q, lo=lo, hi=lo)
    cases = [
        (dict(q=q.astype(jnp.bfloat16)), r"q must be float32 \(B, H, D\)"),
        (dict(k_codes=k[0].astype(jnp.int8)), r"k_codes must be uint8, two codes per byte"),
        (dict(k_scale=k[1][:, :, :1]), r"k_scale must be float16, per channel and group"),
        (dict(v_zero=v[2].astype(jnp.float32)), r"v_zero must be float16, per slot and group"),
        (dict(v_residual=v[3][:1]), r"v_residual must be float32, float16 or bfloat16"),
        (dict(k_residual=k[3][:, :, :24]), r"head size D=64 a multiple of the group 24"),
        (dict(q=jnp.zeros((2, 8, 64), jnp.float32)), r"H=8 must be a multiple of KVH=3"),
        (dict(hi=jnp.zeros((3,), jnp.int32)), r"hi must be an integer array of shape"),
        (dict(k_codes=list(k[0].shape)), r"k_codes must be an array, got list"),
    ]
    for change, pattern in cases:
        for fn in (native.decode_attention_int4, native.decode_attention_int4_reference):
            with pytest.raises(ValueError, match=pattern):
                fn(**{**ok, **change}, scale=0.125)


# ----------------------------------------------------------------- softmax, then matmul
#
# native.softmax_dot (softmax_dot.h's jqx_softmax_dot[_avx512]): softmax(s) @ v per batch,
# against float64 within (2K + 8) u max|v| (u = 2^-24: the K-term dot and row sum, exp's
# and the division's rounding) of the value from the same shifted scores s - max(s),
# which the kernel forms with jax.nn.softmax's one subtraction.

U = 2.0**-24


def _softmax_dot64(s, v):
    x = np.asarray(s, np.float32) - np.max(s, -1, keepdims=True)  # float32, as the kernel
    e = np.exp(x.astype(np.float64))
    return np.einsum("gqk,gkd->gqd", e, np.asarray(v, np.float64)) / e.sum(-1, keepdims=True)


def _scores(rng, shape, scale=4.0, offset=0.0):
    return (scale * rng.standard_normal(shape) + offset).astype(np.float32)


SD_SHAPES = [(12, 128, 128, 32), (3, 5, 7, 3), (2, 17, 9, 40), (1, 1, 1, 1), (4, 33, 200, 64)]


# Both builds of the kernel: AVX512 (int8_gemm.cc's library) and AVX2 (gguf_gemv.cc's).
ISAS = [
    pytest.param(
        "avx512",
        marks=pytest.mark.skipif(not native.available(), reason=f"AVX512: {native.status()}"),
    ),
    pytest.param("avx2", marks=needs_kernel),
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", SD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_softmax_dot_against_float64(shape, isa):
    g, q, k, d = shape
    rng = np.random.default_rng(sum(shape))
    x = _scores(rng, (g, q, k), offset=50.0)  # the kernel subtracts each row's maximum
    v = rng.standard_normal((g, k, d)).astype(np.float32)
    bound = (2 * k + 8) * U * np.abs(v).max()
    ref = _softmax_dot64(x, v)
    kernel = functools.partial(native.softmax_dot, isa=isa)
    for fn in (kernel, native.softmax_dot_reference):
        got = np.asarray(jax.jit(fn)(jnp.asarray(x), jnp.asarray(v)))
        assert np.abs(got - ref).max() <= bound, (fn, np.abs(got - ref).max(), bound)


@pytest.mark.parametrize("isa", ISAS)
@given(
    shape=st.tuples(*(st.integers(1, n) for n in (3, 40, 70, 40))),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([0.1, 4.0, 100.0]),
)
def test_softmax_dot_property(isa, shape, seed, scale):
    g, q, k, d = shape
    rng = np.random.default_rng(seed)
    x = _scores(rng, (g, q, k), scale, offset=-scale)
    v = (scale * rng.standard_normal((g, k, d))).astype(np.float32)
    got = np.asarray(native.softmax_dot(jnp.asarray(x), jnp.asarray(v), isa=isa))
    err = np.abs(got - _softmax_dot64(x, v)).max()
    assert err <= (2 * k + 8) * U * np.abs(v).max() + 1e-37


@pytest.mark.parametrize("isa", ISAS)
def test_softmax_dot_under_vmap_is_one_call(isa):
    rng = np.random.default_rng(12)
    s = jnp.asarray(_scores(rng, (3, 2, 9, 11)))
    v = jnp.asarray(rng.standard_normal((3, 2, 11, 5)), jnp.float32)
    f = jax.vmap(functools.partial(native.softmax_dot, isa=isa))
    text = str(jax.make_jaxpr(f)(s, v))
    assert text.count("ffi_call") == 1 and "while" not in text
    got = np.asarray(jax.jit(f)(s, v))
    for i in range(3):  # the same bits as each example's own call
        np.testing.assert_array_equal(got[i], np.asarray(native.softmax_dot(s[i], v[i], isa=isa)))
    # vmap over the values only (the scores shared) broadcasts them.
    got = np.asarray(jax.vmap(lambda v: native.softmax_dot(s[0], v, isa=isa))(v))
    np.testing.assert_array_equal(got[1], np.asarray(native.softmax_dot(s[0], v[1], isa=isa)))


@pytest.mark.parametrize("isa", ISAS)
def test_softmax_dot_masked_keys_nan_and_empty(isa):
    # flax.linen's mask (finfo.min scores) and -inf: those keys get no weight.
    sd = functools.partial(native.softmax_dot, isa=isa)
    v = jnp.arange(12, dtype=jnp.float32).reshape(1, 4, 3)
    low = float(np.finfo(np.float32).min)
    x = jnp.array([[[0.0, low, low, low], [low, 0.0, -jnp.inf, 0.0], [0.0] * 4]])
    got = np.asarray(sd(x, v))
    np.testing.assert_array_equal(got[0, 0], [0.0, 1.0, 2.0])
    np.testing.assert_allclose(got[0, 1], [6.0, 7.0, 8.0], rtol=2 * U)
    np.testing.assert_allclose(got[0, 2], [4.5, 5.5, 6.5], rtol=4 * U)
    # A NaN in a row makes that row NaN, and only that row.
    y = np.asarray(sd(x.at[0, 1, 3].set(jnp.nan), v))
    assert np.isnan(y[0, 1]).all() and np.isfinite(y[0, [0, 2]]).all()
    # NaN in v reaches the rows that weigh it.
    assert np.isnan(np.asarray(sd(x, v.at[0, 3, 0].set(jnp.nan)))[0, 1, 0])
    # A row of -inf, or one holding +inf, is NaN, as jax.nn.softmax makes it.
    for bad in (-jnp.inf, jnp.inf):
        y = np.asarray(sd(x.at[0, 2].set(bad), v))
        assert np.isnan(y[0, 2]).all() and np.isfinite(y[0, :2]).all()
        ref = jax.nn.softmax(x.at[0, 2].set(bad)[0, 2])
        assert np.isnan(np.asarray(ref)).all()
    # The maximum is subtracted: large scores neither overflow nor change the result.
    np.testing.assert_array_equal(np.asarray(sd(x[:, 2:] + 1000.0, v)), got[:, 2:])
    # No keys: 0 / 0, as XLA's reference gives.
    empty = sd(jnp.zeros((2, 3, 0)), jnp.zeros((2, 0, 5)))
    assert empty.shape == (2, 3, 5) and np.isnan(np.asarray(empty)).all()
    assert np.isnan(
        np.asarray(native.softmax_dot_reference(jnp.zeros((2, 3, 0)), jnp.zeros((2, 0, 5))))
    ).all()


def test_softmax_dot_bad_input_names_the_argument():
    x, v = jnp.zeros((2, 3, 4)), jnp.zeros((2, 4, 5))
    cases = [
        ((x.astype(jnp.float16), v), r"s must be a float32 3-D array, got float16 \(2, 3, 4\)"),
        ((x, v[0]), r"v must be a float32 3-D array, got float32 \(4, 5\)"),
        ((x, [[1.0]]), r"v must be a float32 3-D array, got list"),
        ((x, v[:1]), r"s \(2, 3, 4\) and v \(1, 4, 5\) do not agree"),
        ((x, v[:, :3]), r"s \(2, 3, 4\) and v \(2, 3, 5\) do not agree.*same G and K"),
    ]
    for args, pattern in cases:
        for fn in (native.softmax_dot, native.softmax_dot_reference):
            with pytest.raises(ValueError, match=pattern):
                fn(*args)
    with pytest.raises(ValueError, match="isa='sse' must be None, 'avx512' or 'avx2'"):
        native.softmax_dot(x, v, isa="sse")


# ----------------------------------------------------------------- scores, softmax, matmul
#
# native.scores_softmax_dot (softmax_dot.h's jqx_scores_softmax_dot[_avx512]): attention
# from q and k. Each score is one FMA chain over d (within gamma_D sum|q k| of the exact
# dot), then the steps (one float32 operation each); a score error delta moves each
# probability by at most exp(2 delta) - 1 relative. So per query row, against float64:
#   |y - y64| <= ((2 Tk + 8) u + 2 (exp(2 Delta) - 1)) max|v|,
# Delta the row's largest score error over the keys that carry weight.


def _gamma(n):
    return n * U / (1 - n * U)


def _scores64(q, k, v, axes, steps=(), scale=None, bias=None, mask=None, fill=0.0):
    """(y64, bound): the float64 attention and the bound above, per query row. Each
    score's error: gamma_D sum|q k| from the dot, then each step's rounding (u |out|;
    none where the mask puts the fill), then the subtraction of the row's maximum."""
    qa, ka, va = axes
    q64 = np.transpose(np.asarray(q, np.float64), qa)
    k64 = np.transpose(np.asarray(k, np.float64), ka)
    v64 = np.transpose(np.asarray(v, np.float64), va)
    s = np.einsum("...qd,...kd->...qk", q64, k64)
    err = _gamma(q64.shape[-1]) * np.einsum("...qd,...kd->...qk", np.abs(q64), np.abs(k64))
    for step in steps:
        if step == "mul":
            s, err = s * float(scale), err * abs(float(scale))
        elif step == "div":
            s, err = s / float(scale), err / abs(float(scale))
        elif step == "add":
            s = s + np.asarray(bias, np.float64)
        else:
            keep = np.asarray(mask) != 0
            s, err = np.where(keep, s, float(fill)), np.where(keep, err, 0.0)
            continue
        err = err + U * np.abs(s)
    m = s.max(-1, keepdims=True)
    e = np.exp(s - m)
    y = np.einsum("...qk,...kd->...qd", e, v64) / e.sum(-1, keepdims=True)
    weighty = (s - m) > -87.0
    top = np.where(weighty, err, 0.0).max(-1, keepdims=True)
    delta = np.where(weighty, err + top + U * np.abs(s - m), 0.0).max(-1)
    tk = k64.shape[-2]
    bound = ((2 * tk + 8) * U + 2 * np.expm1(2 * delta)) * np.abs(v64).max() + 1e-37
    return y, bound[..., None]


# (q shape, q axes, k shape, k axes, v shape, v axes): the scores (batch..., q, k).
SC_LAYOUTS = {
    "bthd": (
        (2, 40, 3, 32),
        (0, 2, 1, 3),
        (2, 45, 3, 32),
        (0, 2, 1, 3),
        (2, 45, 3, 24),
        (0, 2, 1, 3),
    ),
    "2-D": ((7, 5), (0, 1), (33, 5), (0, 1), (33, 9), (0, 1)),
    "one batch": ((4, 17, 64), (0, 1, 2), (4, 100, 64), (0, 1, 2), (4, 100, 40), (0, 1, 2)),
    "three batch": (
        (2, 2, 3, 6, 8),
        (0, 1, 2, 3, 4),
        (2, 2, 3, 15, 8),
        (0, 1, 2, 3, 4),
        (2, 2, 3, 15, 1),
        (0, 1, 2, 3, 4),
    ),
    "d first": ((3, 8, 20), (0, 2, 1), (3, 8, 16), (0, 2, 1), (3, 5, 16), (0, 2, 1)),
    "k one": ((1, 3, 2, 4), (0, 2, 1, 3), (1, 1, 2, 4), (0, 2, 1, 3), (1, 1, 2, 33), (0, 2, 1, 3)),
}


def _sc_operands(layout, seed):
    qs, qa, ks, ka, vs, va = SC_LAYOUTS[layout]
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal(x), jnp.float32) for x in (qs, ks, vs))
    return q, k, v, (qa, ka, va)


def _sc_shape(q, k, axes):
    qa, ka, _ = axes
    return (*[q.shape[a] for a in qa[:-2]], q.shape[qa[-2]], k.shape[ka[-2]])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("layout", list(SC_LAYOUTS))
def test_scores_softmax_dot_layouts_against_float64(layout, isa):
    q, k, v, axes = _sc_operands(layout, len(layout))
    sshape = _sc_shape(q, k, axes)
    rng = np.random.default_rng(3)
    # Keys pushed 30 below (a padding bias); finfo.min biases are checked below.
    bias = np.where(
        rng.random((sshape[0], *[1] * (len(sshape) - 2), sshape[-1])) < 0.2, -30.0, 0.0
    ).astype(np.float32)
    bias = bias.reshape((1,) * (len(sshape) - bias.ndim) + bias.shape)
    mask = rng.random((*[1] * (len(sshape) - 1), sshape[-1])) < 0.8
    mask = mask.reshape((1,) * (len(sshape) - mask.ndim) + mask.shape)
    cases = [
        {},
        {
            "steps": ("div", "add"),
            "scale": jnp.float32(np.sqrt(q.shape[axes[0][-1]])),
            "bias": bias,
        },
        {
            "steps": ("mul", "where"),
            "scale": jnp.float32(0.3),
            "mask": mask,
            "fill": float(np.finfo(np.float32).min),
        },
        {"steps": ("where", "add"), "mask": mask, "fill": -1e30, "bias": bias * 0 + 0.5},
    ]
    for kw in cases:
        y64, bound = _scores64(q, k, v, axes, **kw)
        for fn in (
            functools.partial(native.scores_softmax_dot, isa=isa),
            native.scores_softmax_dot_reference,
        ):
            call = functools.partial(fn, **kw)
            got = np.asarray(jax.jit(lambda q, k, v, call=call: call(q, k, v, *axes))(q, k, v))
            assert got.shape == y64.shape
            err = np.abs(got - y64)
            assert np.all(err <= bound), (kw.get("steps"), fn, err.max(), bound.min())


@pytest.mark.parametrize("isa", ISAS)
@given(
    dims=st.tuples(*(st.integers(1, n) for n in (3, 2, 20, 40, 40, 20))),
    steps=st.sampled_from([(), ("div",), ("mul", "add"), ("add", "where"), ("where", "div")]),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([0.1, 1.0, 8.0]),
)
def test_scores_softmax_dot_property(isa, dims, steps, seed, scale):
    b, h, tq, tk, d, dv = dims
    rng = np.random.default_rng(seed)
    q = jnp.asarray(scale * rng.standard_normal((b, tq, h, d)), jnp.float32)
    k = jnp.asarray(scale * rng.standard_normal((b, tk, h, d)), jnp.float32)
    v = jnp.asarray(scale * rng.standard_normal((b, tk, h, dv)), jnp.float32)
    axes = ((0, 2, 1, 3),) * 3
    kw = {"steps": steps}
    if "div" in steps or "mul" in steps:
        kw["scale"] = jnp.float32(1.0 + rng.random())
    if "add" in steps:
        kw["bias"] = jnp.asarray(rng.standard_normal((b, 1, tq, tk)), jnp.float32)
    if "where" in steps:
        kw["mask"], kw["fill"] = rng.random((1, h, 1, tk)) < 0.7, -1e9
    got = np.asarray(native.scores_softmax_dot(q, k, v, *axes, isa=isa, **kw))
    y64, bound = _scores64(q, k, v, axes, **kw)
    assert np.all(np.abs(got - y64) <= bound)


@pytest.mark.parametrize("isa", ISAS)
def test_scores_softmax_dot_nan_masked_and_empty(isa):
    f = functools.partial(native.scores_softmax_dot, isa=isa)
    rng = np.random.default_rng(5)
    q, k, v = (
        jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((2, 4, 8), (2, 6, 8), (2, 6, 3))
    )
    ax = (0, 1, 2)
    y = np.asarray(f(q.at[1, 2, 0].set(jnp.nan), k, v, ax, ax, ax))
    assert np.isnan(y[1, 2]).all() and np.isfinite(np.delete(y.reshape(8, 3), 6, 0)).all()
    # Every key masked: -inf fill gives NaN rows (as jax.nn.softmax), a finite fill the
    # mean of v; the reference agrees.
    mask = jnp.zeros((1, 1, 6), bool)
    for fill, want in ((-jnp.inf, None), (-1e30, np.asarray(v).mean(1))):
        for fn in (f, native.scores_softmax_dot_reference):
            y = np.asarray(fn(q, k, v, ax, ax, ax, steps=("where",), mask=mask, fill=fill))
            if want is None:
                assert np.isnan(y).all()
            else:
                np.testing.assert_allclose(y, np.broadcast_to(want[:, None], y.shape), rtol=1e-6)
    # No keys: 0 / 0. No queries, no batch, no value columns: empty.
    assert np.isnan(np.asarray(f(q, k[:, :0], v[:, :0], ax, ax, ax))).all()
    assert f(q[:, :0], k, v, ax, ax, ax).shape == (2, 0, 3)
    assert f(q[:0], k[:0], v[:0], ax, ax, ax).shape == (0, 4, 3)
    assert f(q, k, v[..., :0], ax, ax, ax).shape == (2, 4, 0)
    # Hugging Face's padding bias, finfo.min: those keys get no weight; a row of them
    # all, the mean of v (the same in the reference).
    low = float(np.finfo(np.float32).min)
    bias = jnp.asarray([[[0.0, low, 0.0, low, 0.0, 0.0]], [[low] * 6]], jnp.float32)
    y = np.asarray(f(q, k, v, ax, ax, ax, steps=("add",), bias=bias))
    ref = np.asarray(
        native.scores_softmax_dot_reference(q, k, v, ax, ax, ax, steps=("add",), bias=bias)
    )
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y[1], np.broadcast_to(np.asarray(v[1]).mean(0), (4, 3)), rtol=1e-5)
    # A -inf bias before the division: -inf / c is -inf (no weight), not NaN.
    inf_bias = jnp.asarray([[[0.0, -np.inf, 0.0, -np.inf, 0.0, 0.0]]], jnp.float32)
    kw = {"steps": ("add", "div"), "scale": jnp.float32(2.0), "bias": inf_bias}
    y = np.asarray(f(q, k, v, ax, ax, ax, **kw))
    ref = np.asarray(native.scores_softmax_dot_reference(q, k, v, ax, ax, ax, **kw))
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
    # Large scores neither overflow nor change the result (the maximum is subtracted)
    # beyond the rounding of s + 1e4: half a spacing per score, through exp, to y.
    big = np.asarray(f(q, k, v, ax, ax, ax, steps=("add",), bias=jnp.full((1, 1, 6), 1e4)))
    delta = float(np.spacing(np.float32(1e4 + 10)))  # both orders' scores, half each
    bound = (2 * np.expm1(2 * delta) + 2 * (2 * 6 + 8) * U) * float(np.abs(v).max())
    assert np.abs(big - np.asarray(f(q, k, v, ax, ax, ax))).max() <= bound


@pytest.mark.parametrize("isa", ISAS)
def test_scores_softmax_dot_skips_masked_keys(isa):
    # Keys a where step masks at either end of every row of a tile are skipped (causal
    # attention, padding, sliding windows). The result must be the whole rows': the same steps with the mask
    # as an additive bias of 0 / fill (s + fill rounds to fill for these fills; nothing
    # is skipped on that route) give the same bits, and float64 bounds the error.
    f = functools.partial(native.scores_softmax_dot, isa=isa)
    rng = np.random.default_rng(11)
    b, h, tq, tk, d, dv = 2, 3, 37, 70, 24, 20
    q, k, v = (
        jnp.asarray(rng.standard_normal(s), jnp.float32)
        for s in ((b, tq, h, d), (b, tk, h, d), (b, tk, h, dv))
    )
    axes = ((0, 2, 1, 3),) * 3
    causal = np.tri(tq, tk, tk - tq, dtype=bool)[None, None]  # a cache: the last tq keys new
    lengths = np.asarray([tk, 23])[:, None, None, None]
    padding = np.arange(tk)[None, None, None] < lengths  # (b, 1, 1, tk), right padding
    none_kept = causal & (np.arange(tq) >= 5)[None, None, :, None]  # rows 0-4 keep no key
    # A float mask: nonzero and NaN keep a key, as in the where step.
    diagonal = np.eye(tq, tk, tk - tq, dtype=bool)[None, None]
    floats = np.where(diagonal, np.nan, np.where(causal, 2.5, 0.0)).astype(np.float32)
    starts = np.asarray([0, 41])[:, None, None, None]
    left = np.arange(tk)[None, None, None] >= starts  # (b, 1, 1, tk), left padding
    offset = np.arange(tk)[None, :] - (np.arange(tq)[:, None] + tk - tq)
    window = ((offset <= 0) & (offset > -20))[None, None]  # a sliding window of 20 keys
    masks = {
        "causal": causal,
        "padding": padding,
        "both": causal & padding,
        "empty": none_kept,
        "float": floats,
        "left": left,
        "window": window,
    }
    scale = jnp.float32(np.sqrt(d))
    low = float(np.finfo(np.float32).min)
    for name, mask in masks.items():
        for fill in (-1e30, low, -np.inf):
            where = f(q, k, v, *axes, steps=("div", "where"), scale=scale, mask=mask, fill=fill)
            bias = np.where(mask != 0, 0.0, fill).astype(np.float32)
            add = f(q, k, v, *axes, steps=("div", "add"), scale=scale, bias=bias)
            np.testing.assert_array_equal(np.asarray(where), np.asarray(add), err_msg=name)
            if fill == -np.inf and name == "empty":
                assert np.isnan(np.asarray(where)[:, :, :5]).all()  # -inf - -inf, as jax
                continue
            kw = {"steps": ("div", "where"), "scale": scale, "mask": mask, "fill": fill}
            y64, bound = _scores64(q, k, v, axes, **kw)
            assert np.all(np.abs(np.asarray(where) - y64) <= bound), (name, fill)
    # A fill whose exp is not 0 beside the kept scores: those keys carry weight, and the
    # rows run whole.
    kw = {"steps": ("div", "where"), "scale": scale, "mask": causal, "fill": -3.0}
    y64, bound = _scores64(q, k, v, axes, **kw)
    assert np.all(np.abs(np.asarray(f(q, k, v, *axes, **kw)) - y64) <= bound)
    # An inf in v at a key masked for all but the last row: 0 * inf is NaN, as on XLA,
    # in that value column of every row of that (batch, head) (inf in the last row's).
    v_inf = v.at[0, tk - 1, 1, 0].set(jnp.inf)
    kw = {"steps": ("div", "where"), "scale": scale, "mask": causal, "fill": -1e30}
    got = np.asarray(f(q, k, v_inf, *axes, **kw))  # (b, h, tq, dv)
    ref = np.asarray(native.scores_softmax_dot_reference(q, k, v_inf, *axes, **kw))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    assert np.isnan(got[0, 1, :-1, 0]).all() and np.isinf(got[0, 1, -1, 0])
    assert np.isfinite(got).sum() == got.size - tq
    # The same before the keys a sliding window keeps: NaN in that column of every row
    # that does not keep the key (all but the first 20 rows' windows, here every row).
    v_inf = v.at[0, 2, 1, 0].set(jnp.inf)
    kw = {"steps": ("div", "where"), "scale": scale, "mask": window, "fill": -1e30}
    got = np.asarray(f(q, k, v_inf, *axes, **kw))
    ref = np.asarray(native.scores_softmax_dot_reference(q, k, v_inf, *axes, **kw))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    assert np.isnan(got[0, 1, :, 0]).all() and np.isfinite(got).sum() == got.size - tq


@pytest.mark.parametrize("isa", ISAS)
def test_scores_softmax_dot_skips_additively_masked_keys(isa):
    # An additive mask (the add step last, after the scale): keys at either end whose
    # biases are far below every score's reach are skipped. Against the same scores with a
    # division by 1 after the add (nothing skipped) bit for bit, and float64.
    f = functools.partial(native.scores_softmax_dot, isa=isa)
    rng = np.random.default_rng(12)
    b, h, tq, tk, d, dv = 2, 3, 37, 70, 24, 20
    q = rng.standard_normal((b, tq, h, d))
    q = jnp.asarray(3.0 * q / np.linalg.norm(q, axis=-1, keepdims=True), jnp.float32)
    k, v = (
        jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((b, tk, h, d), (b, tk, h, dv))
    )
    axes = ((0, 2, 1, 3),) * 3
    causal = np.tri(tq, tk, tk - tq, dtype=bool)[None, None]
    lengths = np.asarray([tk, 23])[:, None, None, None]
    padding = np.arange(tk)[None, None, None] < lengths
    none_kept = causal & (np.arange(tq) >= 5)[None, None, :, None]
    left = np.arange(tk)[None, None, None] >= np.asarray([0, 41])[:, None, None, None]
    offset = np.arange(tk)[None, :] - (np.arange(tq)[:, None] + tk - tq)
    window = ((offset <= 0) & (offset > -20))[None, None]
    # |scores| <= |q| max|k| (all rows of q have norm 3) per (batch, head): beta, the
    # kernel's threshold for a skipped key's bias, is -(2 S + 200).
    s_max = 3.0 * np.linalg.norm(np.asarray(k), axis=-1).max(1) * 1.001**2  # (b, h)
    beta = -(2 * s_max + 200)[:, :, None, None]
    # Live biases just above beta: the skipped keys' scores would carry weight, so the
    # check after the live scores fails and the kernel computes the rest.
    near = np.where(np.arange(tk) < 40, beta + 1, beta - 1)
    low = float(np.finfo(np.float32).min)
    biases = {
        "causal -1e30": np.where(causal, 0.0, -1e30),
        "causal finfo.min": np.where(causal, 0.0, low),
        "padding -10000": np.where(padding, 0.0, -10000.0),
        "both -inf": np.where(causal & padding, 0.0, -np.inf),
        "empty rows -1e30": np.where(none_kept, 0.0, -1e30),
        "left padding finfo.min": np.where(left, 0.0, low),
        "window -1e30": np.where(window, 0.0, -1e30),
        "near the threshold": near,
        "near, reversed": near[..., ::-1],
    }
    one = jnp.float32(1.0)
    for name, bias in biases.items():
        bias = jnp.asarray(bias, jnp.float32)
        add = f(q, k, v, *axes, steps=("add",), bias=bias)
        whole = f(q, k, v, *axes, steps=("add", "div"), scale=one, bias=bias)
        np.testing.assert_array_equal(np.asarray(add), np.asarray(whole), err_msg=name)
        if name == "both -inf":
            continue  # rows of -inf scores beside finite ones: as the whole route
        rows = slice(5, None) if name.startswith("empty") else slice(None)
        if name.startswith("empty"):  # s - 1e30 rounds to -1e30: v's mean
            mean = np.broadcast_to(np.asarray(v).mean(1)[:, :, None], (b, h, 5, dv))
            np.testing.assert_allclose(np.asarray(add)[:, :, :5], mean, 1e-5, 1e-6)
        y64, bound = _scores64(q[:, rows], k, v, axes, steps=("add",), bias=bias[:, :, rows])
        assert np.all(np.abs(np.asarray(add)[:, :, rows] - y64) <= bound), name
    # The common form, the scale first: within the float64 bound.
    bias = jnp.asarray(np.where(causal & padding, 0.0, low), jnp.float32)
    kw = {"steps": ("div", "add"), "scale": jnp.float32(np.sqrt(d)), "bias": bias}
    y64, bound = _scores64(q, k, v, axes, **kw)
    assert np.all(np.abs(np.asarray(f(q, k, v, *axes, **kw)) - y64) <= bound)
    # NaN in q: that row is NaN, the others as the whole route.
    qn = q.at[1, 3, 2, 0].set(jnp.nan)
    bias = jnp.asarray(np.where(causal, 0.0, -1e30), jnp.float32)
    add = np.asarray(f(qn, k, v, *axes, steps=("add",), bias=bias))
    whole = np.asarray(f(qn, k, v, *axes, steps=("add", "div"), scale=one, bias=bias))
    np.testing.assert_array_equal(add, whole)
    assert np.isnan(add[1, 2, 3]).all() and np.isnan(add).sum() == dv


@pytest.mark.parametrize("isa", ISAS)
def test_scores_softmax_dot_under_vmap(isa):
    rng = np.random.default_rng(6)
    q, k, v = (
        jnp.asarray(rng.standard_normal(s), jnp.float32)
        for s in ((3, 2, 5, 8), (3, 2, 7, 8), (3, 2, 7, 4))
    )
    ax = (0, 1, 2)
    f = jax.vmap(lambda q, k, v: native.scores_softmax_dot(q, k, v, ax, ax, ax, isa=isa))
    got = np.asarray(jax.jit(f)(q, k, v))
    for i in range(3):
        want = native.scores_softmax_dot(q[i], k[i], v[i], ax, ax, ax, isa=isa)
        np.testing.assert_array_equal(got[i], np.asarray(want))


def test_scores_softmax_dot_bad_input_names_the_argument():
    q, k, v = jnp.zeros((2, 3, 4)), jnp.zeros((2, 5, 4)), jnp.zeros((2, 5, 6))
    ax = (0, 1, 2)
    cases = [
        ((q.astype(jnp.float16), k, v, ax, ax, ax), {}, r"q must be a float32 array, got float16"),
        ((q, k, v, (0, 1), ax, ax), {}, r"q_axes=\(0, 1\) must name each of q's 3 axes once"),
        ((q, k[:, :, :3], v, ax, ax, ax), {}, r"do not agree: the same batch sizes"),
        ((q, jnp.zeros((3, 5, 4)), v, ax, ax, ax), {}, r"the same batch sizes \(or 1"),
        ((q[0, 0], k[0, 0], v[0, 0], (0,), (0,), (0,)), {}, r"q has 1 axes; it takes 2 to 6"),
        ((q, k, v, ax, ax, ax), {"steps": ("cube",)}, r"steps=\('cube',\) must be distinct names"),
        ((q, k, v, ax, ax, ax), {"steps": ("div",)}, r"scale is missing but steps"),
        (
            (q, k, v, ax, ax, ax),
            {"steps": ("mul", "div"), "scale": 2.0},
            r"has both 'mul' and 'div'",
        ),
        ((q, k, v, ax, ax, ax), {"bias": jnp.zeros((2, 3, 5))}, r"bias is given but steps"),
        ((q, k, v, ax, ax, ax), {"steps": ("where",)}, r"give mask exactly when steps has 'where'"),
    ]
    for args, kw, pattern in cases:
        for fn in (native.scores_softmax_dot, native.scores_softmax_dot_reference):
            with pytest.raises(ValueError, match=pattern):
                fn(*args, **kw)
    with pytest.raises(
        ValueError, match=r"bias \(2, 3, 4\) does not broadcast to the scores \(2, 3, 5\)"
    ):
        native.scores_softmax_dot(q, k, v, ax, ax, ax, steps=("add",), bias=jnp.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match=r"scale must be a float32 scalar"):
        native.scores_softmax_dot(q, k, v, ax, ax, ax, steps=("div",), scale=jnp.ones(2))
    with pytest.raises(ValueError, match="isa='sse' must be None, 'avx512' or 'avx2'"):
        native.scores_softmax_dot(q, k, v, ax, ax, ax, isa="sse")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(
    "shape",
    [(2, 1, 5, 1), (1, 3, 1, 1), (2, 3, 5, 19), (1, 1, 1, 1)],
    ids=["per query", "per head", "full", "one value"],
)
def test_scores_softmax_dot_bias_and_mask_broadcast_any_dim(shape, isa):
    # A bias or mask of size 1 along the keys is one value per row (stride 0), full is
    # read per element; both against float64 within the bound.
    rng = np.random.default_rng(sum(shape))
    q, k, v = (
        jnp.asarray(rng.standard_normal(s), jnp.float32)
        for s in ((2, 5, 3, 8), (2, 19, 3, 8), (2, 19, 3, 4))
    )
    axes = ((0, 2, 1, 3),) * 3
    kw = {
        "steps": ("add", "where"),
        "bias": jnp.asarray(rng.standard_normal(shape), jnp.float32),
        "mask": rng.random(shape) > 0.3,
        "fill": -1e30,
    }
    got = np.asarray(native.scores_softmax_dot(q, k, v, *axes, isa=isa, **kw))
    y64, bound = _scores64(q, k, v, axes, **kw)
    assert np.all(np.abs(got - y64) <= bound)


@pytest.mark.parametrize("isa", ISAS)
def test_scores_softmax_dot_broadcasts_batch_axes_of_size_one(isa):
    # Grouped queries: k and v with a batch axis of size 1 are read at stride 0 for
    # each of q's groups: the kernel's result on the broadcast copies, bit for bit, and
    # within the float64 bound; the reference broadcasts too.
    rng = np.random.default_rng(8)
    q, k, v = (
        jnp.asarray(rng.standard_normal(s), jnp.float32)
        for s in ((2, 6, 3, 8), (2, 9, 1, 8), (2, 9, 1, 4))
    )
    axes = ((0, 2, 1, 3),) * 3  # (b, g, t, d): g = 3 queries per key head
    kw = {"steps": ("mul",), "scale": jnp.float32(0.5)}
    got = np.asarray(
        jax.jit(lambda *a: native.scores_softmax_dot(*a, *axes, isa=isa, **kw))(q, k, v)
    )
    assert got.shape == (2, 3, 6, 4)  # (b, g, t, dv)
    kb, vb = (jnp.broadcast_to(a, a.shape[:2] + (3, a.shape[3])) for a in (k, v))
    want = native.scores_softmax_dot(q, kb, vb, *axes, isa=isa, **kw)
    np.testing.assert_array_equal(got, np.asarray(want))
    y64, bound = _scores64(q, kb, vb, axes, **kw)
    assert np.all(np.abs(got - y64) <= bound)
    ref = native.scores_softmax_dot_reference(q, k, v, *axes, **kw)
    np.testing.assert_allclose(np.asarray(ref), got, rtol=0, atol=float(np.max(bound)))

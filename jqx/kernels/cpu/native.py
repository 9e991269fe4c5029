"""Native CPU kernels, built on first use: an AVX512-VNNI int8 GEMM, a 4-bit
weight-only kernel for decode-sized products, and AVX2 kernels for GGUF's
block layouts.

XLA:CPU's own ``int8 x int8 -> int32`` dot runs far from the 1/4 of the
float32 dot that VNNI's ``vpdpbusd`` (64 byte products per instruction)
allows (measurements: docs/internals/native-kernels.md). This module compiles
``int8_gemm.cc`` (beside it: a register-blocked VNNI GEMM, threaded over
rows) with the system C++ compiler into a cached shared library, registers it
as the XLA FFI target ``jqx_int8_gemm`` and exposes it as
:func:`int8_matmul`, an exact ``int8 x int8 -> int32`` matmul usable under
``jit``. The same library registers ``jqx_w4_gemv`` (:func:`w4_matmul`): f32
activations of up to :data:`W4_MAX_ROWS` rows times a packed 4-bit weight (any
4-bit format, group-wise along K), read in place; and ``jqx_fp8_gemv``
(:func:`fp8_matmul`): the same for FP8 E4M3 / E5M2 weights (per channel or
group-wise along K, MXFP8's E8M0 scales included).

A second library, ``gguf_gemv.cc`` (AVX2, FMA and F16C only, so it runs on
CPUs without AVX512), registers ``jqx_gguf_gemv`` (:func:`gguf_matmul`):
``x @ W.T`` for up to :data:`GGUF_MAX_ROWS` f32 rows of ``x`` straight from
the Q4_0, Q4_1 and Q8_0 blocks that ``jqx.load_gguf`` keeps;
``jqx_gguf_gemv_q8`` (:func:`gguf_matmul_q8`): the same product with ``x``
quantized to int8 per block of 32 and integer dot products, as llama.cpp
computes it (faster; the error of int8 activations); and
``jqx_decode_attention`` (:func:`decode_attention`): one new token's attention
over the visible slots of a float32 or float16 KV cache, with
``jqx_decode_attention_q`` (:func:`decode_attention_quantized`, int8 and fp8 caches)
and ``jqx_decode_attention_int4`` (:func:`decode_attention_int4`, the 4-bit KIVI
cache) reading quantized caches in place.

It also registers ``jqx_f32_gemm`` (:func:`f32_matmul`, ``f32_gemm.h``): the float32
matrix product, one fused multiply-add chain per output, close to MKL's speed.

Both libraries register :func:`softmax_dot` (``softmax_dot.h``: a softmax and its
product with the values in one pass, ``jqx.quantized``'s reordered attention), as
``jqx_softmax_dot_avx512`` and ``jqx_softmax_dot`` (AVX2).

A third library, ``conv_int8.cc`` (AVX2), registers the W8A8 int8 convolution
``jqx_conv_int8`` and ``jqx_w8a8_gemm`` (:func:`w8a8_matmul`): the dense W8A8
product with the per-token (or per-tensor, or static) activation quantization
inside the kernel, bit-identical to ``jqx.ops``' XLA W8A8 path.

Every kernel runs on one persistent thread pool per process (``pool.h``, shared
by the three libraries; ``$JQX_NUM_THREADS``, else the CPU affinity count;
:func:`pool_threads`). Each library has its own availability:
:func:`available`/:func:`status` for the first, :func:`gguf_available`/
:func:`gguf_status` for the second, :func:`conv_available`/:func:`conv_status`
for the third.

When ``jqx.ops`` uses them (W8A8 int8 and int8 weight-only products big
enough to pay for the per-call packing, 4-bit weight-only products at decode
sizes), and the ``JQX_NATIVE=0`` switch that turns that off, are decided in
``jqx.ops.dispatch`` (docs/internals/dispatch.md); this module only builds
the kernels and reports whether they work.

Availability needs: an x86-64 CPU with AVX512F/BW/VL/VNNI (the first
library), AVX2/FMA/F16C (the GGUF one) or AVX2/FMA (the third), a C++17
compiler (``$CXX``, else ``g++``/``clang++``) and a writable cache directory
(``$JQX_CACHE_DIR``, else ``~/.cache/jqx``). Each library is built once per
source (with the headers it includes), compiler and flags (a hash in its file
name), written to a temporary file and renamed into place, so a failed or
concurrent build never leaves a half-written library. :func:`status`,
:func:`gguf_status` and :func:`conv_status` say why one is unavailable.

Example:
    >>> import numpy as np, jax.numpy as jnp
    >>> from jqx.kernels.cpu import native
    >>> a = jnp.asarray(np.arange(-6, 6, dtype=np.int8).reshape(3, 4))
    >>> b = jnp.asarray(np.arange(8, dtype=np.int8).reshape(4, 2))
    >>> bool((native.int8_matmul(a, b) == a.astype(jnp.int32) @ b.astype(jnp.int32)).all()) \\
    ...     if native.available() else True
    True
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "available",
    "status",
    "amx",
    "int8_matmul",
    "w4_matmul",
    "fp8_matmul",
    "gguf_available",
    "gguf_status",
    "gguf_num_threads",
    "gguf_matmul",
    "gguf_matmul_reference",
    "gguf_matmul_q8",
    "gguf_matmul_q8_reference",
    "gguf_quantize_q8",
    "decode_attention",
    "decode_attention_reference",
    "decode_attention_quantized",
    "decode_attention_quantized_reference",
    "decode_attention_int4",
    "decode_attention_int4_reference",
    "softmax_dot",
    "softmax_dot_reference",
    "scores_softmax_dot",
    "scores_softmax_dot_reference",
    "SCORE_STEPS",
    "f32_matmul",
    "TARGET",
    "W4_TARGET",
    "FP8_TARGET",
    "W4_MAX_ROWS",
    "GGUF_TARGET",
    "GGUF_Q8_TARGET",
    "GGUF_MAX_ROWS",
    "GGUF_KINDS",
    "ATTENTION_TARGET",
    "ATTENTION_Q_TARGET",
    "SOFTMAX_DOT_TARGET",
    "SOFTMAX_DOT_AVX512_TARGET",
    "SCORES_SOFTMAX_DOT_TARGET",
    "SCORES_SOFTMAX_DOT_AVX512_TARGET",
    "F32_TARGET",
    "EPILOGUE_ACTIVATIONS",
    "CONV_INT8_TARGET",
    "W8A8_TARGET",
    "W8A8_VNNI_TARGET",
    "W8A8_MLP_TARGET",
    "F32_MLP_TARGET",
    "pack_int8",
    "unpack_int8",
    "packed_shape",
    "w8a8_matmul",
    "w8a8_matmul_vnni",
    "w8a8_matmul_reference",
    "two_level_matmul",
    "two_level_matmul_reference",
    "pool_threads",
    "conv_available",
    "conv_status",
]

TARGET = "jqx_int8_gemm"
W4_TARGET = "jqx_w4_gemv"
FP8_TARGET = "jqx_fp8_gemv"  # FP8 (E4M3 / E5M2) weight-only, up to W4_MAX_ROWS rows
W4_MAX_ROWS = 16  # kW4MaxRows in the kernel (register blocks of 8 rows)
GGUF_TARGET = "jqx_gguf_gemv"
GGUF_Q8_TARGET = "jqx_gguf_gemv_q8"  # int8 activations, llama.cpp's numerics
GGUF_MAX_ROWS = 16  # kMaxRows in gguf_gemv.cc
GGUF_KINDS = ("Q4_0", "Q4_1", "Q8_0")  # the kernel's `kind` attribute is the index
GGUF_BLOCK = 32
ATTENTION_TARGET = "jqx_decode_attention"  # in gguf_gemv.cc, on the same thread pool
SOFTMAX_DOT_TARGET = "jqx_softmax_dot"  # gguf_gemv.cc: softmax(s) @ v, one pass (AVX2)
SOFTMAX_DOT_AVX512_TARGET = "jqx_softmax_dot_avx512"  # the same in int8_gemm.cc (AVX512)
SCORES_SOFTMAX_DOT_TARGET = "jqx_scores_softmax_dot"  # gguf_gemv.cc: attention from q, k (AVX2)
SCORES_SOFTMAX_DOT_AVX512_TARGET = "jqx_scores_softmax_dot_avx512"  # int8_gemm.cc (AVX512)
F32_TARGET = "jqx_f32_gemm"  # int8_gemm.cc (f32_gemm.h): the float32 GEMM (AVX512)
F32_MLP_TARGET = "jqx_f32_mlp"  # the same library: two float32 dense layers in one call
ATTENTION_Q_TARGET = "jqx_decode_attention_q"  # the same over an int8 / fp8 quantized cache
ATTENTION_INT4_TARGET = "jqx_decode_attention_int4"  # the same over the 4-bit KIVI cache
CONV_INT8_TARGET = "jqx_conv_int8"  # conv_int8.cc: W8A8 NHWC x HWIO convolution (AVX2)
W8A8_TARGET = "jqx_w8a8_gemm"  # conv_int8.cc: W8A8 (M, K) x (K, N), activations quantized inside
W8A8_VNNI_TARGET = "jqx_w8a8_vnni"  # int8_gemm.cc: the same on the VNNI tiles (AVX512)
W8A8_MLP_TARGET = "jqx_w8a8_mlp"  # int8_gemm.cc: two such dense layers in one call
_W8A8_MODES = {"static": 0, "per_tensor": 1, "per_token": 2}  # the kernel's `mode`
_TWO_LEVEL_MODE = 3  # jqx_w8a8_vnni's kTwoLevel: int8 weight-only's two-level split

# -ffp-contract=off: a separate multiply and add stay two roundings (the XLA paths that
# the kernels must equal bit for bit round each); explicit FMA intrinsics are kept.
_COMMON_FLAGS = ("-O3", "-std=c++17", "-ffp-contract=off", "-shared", "-fPIC")


@dataclasses.dataclass(eq=False)
class _Library:
    """One kernel source: how to build it, what it registers, whether it works."""

    stem: str  # source file stem, also the cached library's name prefix
    flags: tuple[str, ...]
    cpu_check: str  # extern "C" int symbol: does this CPU run the code?
    cpu_needs: str  # for the message when it does not
    targets: dict[str, str]  # FFI target name -> handler symbol
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    ok: bool | None = None
    reason: str = "not built yet"
    handle: ctypes.CDLL | None = None

    @property
    def src(self) -> Path:
        return Path(__file__).parent / f"{self.stem}.cc"

    def source_bytes(self) -> bytes:
        """The source and every header beside it that it includes, directly or through
        another header (``pool.h``): the build cache key, so editing a shared header
        rebuilds the library."""
        text = self.src.read_bytes()
        parts, seen, todo = [text], set(), [text]
        while todo:
            for name in sorted(set(re.findall(rb'#include "([^"/]+)"', todo.pop()))):
                header = self.src.parent / name.decode()
                if name in seen or not header.exists():
                    continue
                seen.add(name)
                body = header.read_bytes()
                parts.append(b"\0" + name + b"\0" + body)
                todo.append(body)
        return b"".join(parts)


_INT8 = _Library(
    stem="int8_gemm",
    flags=(*_COMMON_FLAGS, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"),
    cpu_check="jqx_cpu_supported",
    cpu_needs="AVX512F/AVX512BW/AVX512VL/AVX512-VNNI",
    targets={
        TARGET: "JqxInt8Gemm",
        W4_TARGET: "JqxW4Gemv",
        FP8_TARGET: "JqxFp8Gemv",
        W8A8_VNNI_TARGET: "JqxW8A8Vnni",
        W8A8_MLP_TARGET: "JqxW8A8Mlp",
        SOFTMAX_DOT_AVX512_TARGET: "JqxSoftmaxDotAvx512",
        SCORES_SOFTMAX_DOT_AVX512_TARGET: "JqxScoresSoftmaxDotAvx512",
        F32_TARGET: "JqxF32Gemm",
        F32_MLP_TARGET: "JqxF32Mlp",
    },
)
_GGUF = _Library(
    stem="gguf_gemv",
    flags=(*_COMMON_FLAGS, "-mavx2", "-mfma", "-mf16c"),
    cpu_check="jqx_gguf_cpu_supported",
    cpu_needs="AVX2/FMA/F16C",
    targets={
        GGUF_TARGET: "JqxGgufGemv",
        GGUF_Q8_TARGET: "JqxGgufGemvQ8",
        ATTENTION_TARGET: "JqxDecodeAttention",
        ATTENTION_Q_TARGET: "JqxDecodeAttentionQ",
        ATTENTION_INT4_TARGET: "JqxDecodeAttentionInt4",
        SOFTMAX_DOT_TARGET: "JqxSoftmaxDot",
        SCORES_SOFTMAX_DOT_TARGET: "JqxScoresSoftmaxDot",
    },
)
_CONV = _Library(
    stem="conv_int8",
    flags=(*_COMMON_FLAGS, "-mavx2", "-mfma"),
    cpu_check="jqx_conv_cpu_supported",
    cpu_needs="AVX2",
    targets={CONV_INT8_TARGET: "JqxConvInt8", W8A8_TARGET: "JqxW8A8Gemm"},
)


def _threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _cache_dir() -> Path:
    d = os.environ.get("JQX_CACHE_DIR")
    return Path(d) if d else Path.home() / ".cache" / "jqx"


def _compiler() -> str | None:
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx) or (cxx if os.path.isfile(cxx) else None)
    return shutil.which("g++") or shutil.which("clang++")


def _build(lib: _Library) -> Path:
    """The shared library's path, compiling it if it is not cached yet."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set $CXX or install g++)")
    include = jax.ffi.include_dir()
    src = lib.source_bytes()
    try:
        version = subprocess.run(
            [cxx, "--version"], capture_output=True, text=True, timeout=30
        ).stdout.splitlines()[:1]
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"the C++ compiler {cxx} does not run: {e}") from e
    key = hashlib.sha256(src + repr((lib.flags, version, jax.__version__)).encode()).hexdigest()
    cache = _cache_dir()
    out = cache / f"{lib.stem}-{key[:16]}.so"
    if out.exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    # One build per library across processes (pytest -n workers, parallel jobs start
    # at once): the others wait here and then find it built.
    with open(cache / f".{out.name}.lock", "w") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:  # not POSIX: concurrent builds stay correct (atomic rename)
            pass
        if out.exists():
            return out
        _compile(cxx, lib, include, cache, out)
    return out


class _BuildError(RuntimeError):
    """The compiler ran and failed: a broken toolchain or source, not a missing feature."""


def _compile(cxx: str, lib: _Library, include: str, cache: Path, out: Path) -> None:
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    try:
        r = subprocess.run(
            [cxx, *lib.flags, f"-I{include}", str(lib.src), "-o", tmp, "-lpthread"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if r.returncode != 0:
            raise _BuildError(f"compiling {lib.src.name} failed:\n{r.stderr[-2000:]}")
        os.replace(tmp, out)  # atomic: never a half-written library under `out`
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# The process's one thread pool (pool.h): (abi, pointer, pid) of the first library
# loaded; the later ones adopt it.
_POOL_LOCK = threading.Lock()
_POOL: tuple[int, int, int] | None = None


def _share_pool(handle: ctypes.CDLL) -> None:
    """Makes ``handle``'s library run on the process's one pool: the first library
    loaded (after its CPU check, so its workers run code this CPU executes) creates
    it, each later one adopts it. A library of another pool layout (never the case
    for libraries built from one checkout) keeps its own."""
    global _POOL
    handle.jqx_pool_abi.restype = ctypes.c_int64
    handle.jqx_pool_handle.restype = ctypes.c_void_p
    handle.jqx_pool_adopt.argtypes = [ctypes.c_void_p]
    handle.jqx_pool_adopt.restype = ctypes.c_int
    with _POOL_LOCK:
        abi, pid = int(handle.jqx_pool_abi()), os.getpid()
        if _POOL is None or _POOL[2] != pid:
            _POOL = (abi, int(handle.jqx_pool_handle()), pid)
        elif _POOL[0] == abi:
            handle.jqx_pool_adopt(ctypes.c_void_p(_POOL[1]))


def _load(lib: _Library) -> None:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise RuntimeError(f"needs an x86-64 CPU, this is {platform.machine()}")
    handle = ctypes.CDLL(str(_build(lib)))
    if not getattr(handle, lib.cpu_check)():
        raise RuntimeError(f"this CPU lacks {lib.cpu_needs}")
    _share_pool(handle)
    for target, symbol in lib.targets.items():
        jax.ffi.register_ffi_target(
            target, jax.ffi.pycapsule(getattr(handle, symbol)), platform="cpu"
        )
    lib.handle = handle


def _available(lib: _Library) -> bool:
    """Builds, loads and registers ``lib`` on the first call; remembers a failure."""
    if lib.ok is None:
        with lib.lock:
            if lib.ok is None:
                try:
                    _load(lib)
                    lib.ok, lib.reason = True, "available"
                except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                    lib.ok, lib.reason = False, str(e)
                    if isinstance(e, _BuildError):
                        # Not a CPU or machine without the means: said once, loudly,
                        # since every product then runs on XLA, slower.
                        warnings.warn(
                            f"jqx: the native CPU kernels of {lib.src.name} failed to build, so "
                            "XLA runs the products they would run; the compiler's message is "
                            "in jqx.kernels.cpu.native.status() (and its siblings); set "
                            "JQX_NATIVE=0 to turn the kernels off.",
                            RuntimeWarning,
                            stacklevel=3,
                        )
    return bool(lib.ok)


def available() -> bool:
    """Whether the AVX512 kernels (:func:`int8_matmul`, :func:`w4_matmul`) are
    built, loaded and registered (builds them on the first call; a failure is
    remembered, see :func:`status`).

    Example:
        >>> from jqx.kernels.cpu import native
        >>> native.available() in (True, False)
        True
    """
    return _available(_INT8)


def status() -> str:
    """``"available"``, or why the AVX512 kernels are not used.

    Example:
        >>> from jqx.kernels.cpu import native
        >>> isinstance(native.status(), str)
        True
    """
    available()
    return _INT8.reason


def amx(enable: bool | None = None) -> bool:
    """Whether the int8 GEMMs (:func:`int8_matmul`, :func:`w8a8_matmul_vnni`, and so
    jqx.ops' W8A8 and int8 weight-only routes) run their blocks of 16 rows and more on
    the AMX tiles (Intel Sapphire Rapids and later: ``amx_int8`` in ``/proc/cpuinfo``)
    instead of the AVX512-VNNI registers. The sums are exact int32 either way, so the
    results are the same bit for bit; the tiles are faster on prefill and batch
    products (docs/guide/kernels.md).

    On by default where the CPU and the OS support it (Linux hands out the tile state
    on request); ``JQX_AMX=0`` in the environment before the kernels load turns it off.

    Args:
      enable: None asks; True or False turns the tile path on or off for the whole
        process (True does nothing where the CPU has no AMX).

    Returns:
      Whether the tiles are used now; False when the AVX512 kernels are not available
      (:func:`status`).

    Example:
        >>> from jqx.kernels.cpu import native
        >>> native.amx() in (True, False)
        True
    """
    if enable is not None and not isinstance(enable, bool):
        raise TypeError(f"amx(enable={enable!r}): expected None, True or False.")
    if not available():
        return False
    fn = _INT8.handle.jqx_amx
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return bool(fn(-1 if enable is None else int(enable)))


def gguf_available() -> bool:
    """Whether the GGUF block kernel (:func:`gguf_matmul`; AVX2, FMA, F16C) is
    built, loaded and registered. Builds it on the first call (a few seconds);
    a failure is remembered, see :func:`gguf_status`.

    Example:
        >>> from jqx.kernels.cpu import native
        >>> native.gguf_available() in (True, False)
        True
    """
    return _available(_GGUF)


def gguf_status() -> str:
    """``"available"``, or why the GGUF block kernel is not used (no compiler,
    not x86-64, no AVX2/FMA/F16C, a failed build).

    Example:
        >>> from jqx.kernels.cpu import native
        >>> isinstance(native.gguf_status(), str)
        True
    """
    gguf_available()
    return _GGUF.reason


def conv_available() -> bool:
    """Whether the W8A8 int8 convolution kernel (``conv_int8.cc``; AVX2, used by
    ``jqx.ops.conv_general_dilated`` as ``native.conv_int8``) is built, loaded and
    registered. Builds it on the first call; a failure is remembered, see
    :func:`conv_status`.

    Example:
        >>> from jqx.kernels.cpu import native
        >>> native.conv_available() in (True, False)
        True
    """
    return _available(_CONV)


def conv_status() -> str:
    """``"available"``, or why the int8 convolution kernel is not used (no compiler,
    not x86-64, no AVX2, a failed build).

    Example:
        >>> from jqx.kernels.cpu import native
        >>> isinstance(native.conv_status(), str)
        True
    """
    conv_available()
    return _CONV.reason


def gguf_num_threads() -> int:
    """Threads of the persistent pool the GGUF kernels run on (the process's one
    pool, shared with the other native kernels: :func:`pool_threads`):
    ``$JQX_NUM_THREADS`` when set to a positive integer before it is created, else
    the CPUs this process may run on (``sched_getaffinity``).

    Raises:
      RuntimeError: the kernel is not available (:func:`gguf_status` says why).

    Example:
        >>> from jqx.kernels.cpu import native
        >>> native.gguf_num_threads() >= 1 if native.gguf_available() else True
        True
    """
    if not gguf_available():
        raise RuntimeError(f"the native GGUF kernel is not available: {gguf_status()}")
    return int(_GGUF.handle.jqx_gguf_num_threads())


def pool_threads() -> int:
    """Threads of the persistent pool that every native kernel runs on (one per
    process, shared by the three libraries; created when the first library loads):
    ``$JQX_NUM_THREADS`` when set to a positive integer before that, else the CPUs
    this process may run on (``sched_getaffinity``).

    Raises:
      RuntimeError: no native library is available here (:func:`gguf_status`,
        :func:`conv_status` and :func:`status` say why).

    Example:
        >>> from jqx.kernels.cpu import native
        >>> native.pool_threads() >= 1 if native.gguf_available() else True
        True
    """
    for lib in (_GGUF, _CONV, _INT8):
        if _available(lib):
            lib.handle.jqx_pool_threads.restype = ctypes.c_int
            return int(lib.handle.jqx_pool_threads())
    raise RuntimeError(
        f"no native CPU kernel library is available: gguf: {_GGUF.reason}; conv: "
        f"{_CONV.reason}; int8: {_INT8.reason}."
    )


def packed_shape(k: int, n: int) -> tuple[int, int, int]:
    """The shape :func:`pack_int8` gives a (k, n) weight: ``(ceil(n/16), ceil(k/4), 64)``.

    Example:
        >>> from jqx.kernels.cpu import native
        >>> native.packed_shape(384, 1536)
        (96, 96, 64)
    """
    return (-(-n // 16), -(-k // 4), 64)


def pack_int8(w: jax.Array) -> jax.Array:
    """The int8 weight ``w`` (K, N) in the VNNI GEMM's panel layout, once, ahead of
    the calls: ``packed[q, kq, 4 * c + r] = w[4 * kq + r, 16 * q + c]``, zero beyond K
    and N (:func:`packed_shape`). :func:`int8_matmul` and :func:`w8a8_matmul_vnni` take
    it in place of ``w`` and then skip the packing they otherwise do on every call.
    Plain jnp (a pad, a reshape and a transpose), so it runs anywhere and is exact;
    :func:`unpack_int8` inverts it.

    Raises:
      TypeError: ``w`` is not 2-D int8.

    Example:
        >>> import jax.numpy as jnp
        >>> from jqx.kernels.cpu import native
        >>> w = jnp.arange(6, dtype=jnp.int8).reshape(2, 3)
        >>> p = native.pack_int8(w)
        >>> p.shape, p[0, 0, :8].tolist()  # columns 0 and 1: k = 0, 1, then the pad
        ((1, 1, 64), [0, 3, 0, 0, 1, 4, 0, 0])
        >>> bool((native.unpack_int8(p, (2, 3)) == w).all())
        True
    """
    if w.ndim < 2 or jnp.dtype(w.dtype) != jnp.int8:
        raise TypeError(
            f"pack_int8: w must be an int8 (K, N) weight, got {_describe(w)}; pass the codes "
            "of an int8 QArray (QArray.qvalue)."
        )
    *lead, k, n = w.shape  # leading axes (a stack of weights) are kept
    npan, kq, _ = packed_shape(k, n)
    wp = jnp.pad(w, [(0, 0)] * len(lead) + [(0, 4 * kq - k), (0, 16 * npan - n)])
    wp = wp.reshape(*lead, kq, 4, npan, 16)
    b = len(lead)
    wp = wp.transpose(*range(b), b + 2, b, b + 3, b + 1)
    return wp.reshape(*lead, npan, kq, 64)


def unpack_int8(packed: jax.Array, shape: tuple[int, int]) -> jax.Array:
    """The (K, N) int8 weight that :func:`pack_int8` packed into ``packed`` (leading
    axes of a stack kept).

    Raises:
      ValueError: ``packed`` is not the packed layout of a ``shape`` weight.
    """
    k, n = (int(d) for d in shape)
    want = packed_shape(k, n)
    if tuple(packed.shape[-3:]) != want or jnp.dtype(packed.dtype) != jnp.int8:
        raise ValueError(
            f"unpack_int8: packed must be int8 {want} for a {(k, n)} weight, got "
            f"{_describe(packed)}; pass the output of pack_int8 and the weight's shape."
        )
    lead = tuple(packed.shape[:-3])
    b = len(lead)
    npan, kq, _ = want
    w = packed.reshape(*lead, npan, kq, 16, 4).transpose(*range(b), b + 1, b + 3, b, b + 2)
    return w.reshape(*lead, 4 * kq, 16 * npan)[..., :k, :n]


def int8_matmul(a: jax.Array, b: jax.Array, *, n: int | None = None) -> jax.Array:
    """Exact ``a @ b`` for int8 ``a`` (M, K) and ``b`` (K, N): int32 (M, N).

    Runs the native VNNI kernel (call :func:`available` first; without it
    this raises RuntimeError). Works under ``jit``; under ``vmap`` it loops.
    ``b`` may also be :func:`pack_int8`'s layout of the weight, 3-D, with ``n`` its
    column count: then the call skips packing the weight.

    Raises:
      TypeError: operands that are not 2-D int8 of matching K, or a packed ``b``
        whose shape is not ``packed_shape(K, n)``.
    """
    if b.ndim == 3:
        if n is None or a.ndim != 2 or tuple(b.shape) != packed_shape(a.shape[1], n):
            raise TypeError(
                f"int8_matmul: a packed b {tuple(b.shape)} needs a (M, K) and n=N with "
                f"b.shape == packed_shape(K, N); got a {tuple(a.shape)}, n={n}."
            )
    elif a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise TypeError(
            f"int8_matmul: expected a (M, K) and b (K, N), got {tuple(a.shape)} and "
            f"{tuple(b.shape)}."
        )
    if a.dtype != jnp.int8 or b.dtype != jnp.int8:
        raise TypeError(f"int8_matmul: expected int8 operands, got {a.dtype} and {b.dtype}.")
    if not available():
        raise RuntimeError(f"the native int8 GEMM is not available: {status()}")
    m, k = a.shape
    n = b.shape[1] if b.ndim == 2 else n
    kp = -(-k // 4) * 4
    # int8 v -> uint8 v + 128 (vpdpbusd multiplies unsigned by signed bytes).
    au = lax.bitcast_convert_type(a, jnp.uint8) ^ jnp.uint8(0x80)
    if kp != k:
        au = jnp.pad(au, ((0, 0), (0, kp - k)))  # zero bytes meet zero weight rows
    acc = jax.ffi.ffi_call(
        TARGET,  # a 3-D b: the kernel takes it as packed
        jax.ShapeDtypeStruct((m, n), jnp.int32),
        vmap_method="sequential",
    )(au, b, threads=np.int64(_threads()))
    return acc  # the kernel already subtracted 128 * column sums


def _w8a8_check(x, w, w_scale, act, fn: str, packed_ok: bool = False) -> tuple[int, jax.Array]:
    """Validates :func:`w8a8_matmul`'s operands; returns (mode, act scale operand)."""
    for name, a in (("x", x), ("w", w), ("w_scale", w_scale)):
        if not hasattr(a, "shape") or not hasattr(a, "dtype"):
            raise ValueError(
                f"{fn}: {name} must be an array, got {type(a).__name__}; wrap it with "
                "jnp.asarray(...)."
            )
    if x.ndim != 2 or jnp.dtype(x.dtype) != jnp.float32:
        raise ValueError(
            f"{fn}: x must be float32 (M, K), got {_describe(x)}; reshape the rows to 2-D "
            "and cast with x.astype(jnp.float32)."
        )
    k = x.shape[1]
    if packed_ok and w.ndim == 3:
        n = w_scale.shape[0] if w_scale.ndim == 1 else -1
        if jnp.dtype(w.dtype) != jnp.int8 or tuple(w.shape) != packed_shape(k, n):
            raise ValueError(
                f"{fn}: a packed w must be int8 packed_shape(K, N) = {packed_shape(k, n)} "
                f"for x's K={k} and w_scale's N={n}, got {_describe(w)}; pack the (K, N) "
                "codes with pack_int8."
            )
    elif w.ndim != 2 or jnp.dtype(w.dtype) != jnp.int8 or w.shape[0] != k:
        raise ValueError(
            f"{fn}: w must be int8 (K, N) with x's K={k}, got {_describe(w)}; pass the "
            "weight codes (QArray.qvalue of an int8 per-channel weight)."
        )
    else:
        n = w.shape[1]
    if tuple(w_scale.shape) != (n,) or jnp.dtype(w_scale.dtype) != jnp.float32:
        raise ValueError(
            f"{fn}: w_scale must be float32 (N,) = ({n},), one scale per output column, got "
            f"{_describe(w_scale)}; reshape a (1, N) scale with .reshape(-1)."
        )
    if isinstance(act, str):
        if act not in ("per_token", "per_tensor"):
            raise ValueError(
                f"{fn}: act={act!r} must be 'per_token', 'per_tensor' or a float32 scale "
                "array of one element (a static scale)."
            )
        return _W8A8_MODES[act], jnp.ones((1,), jnp.float32)
    if not hasattr(act, "shape") or int(np.prod(act.shape)) != 1:
        raise ValueError(
            f"{fn}: act={act!r} must be 'per_token', 'per_tensor' or a float32 scale array of "
            "one element (a static scale)."
        )
    return _W8A8_MODES["static"], jnp.asarray(act, jnp.float32).reshape(1)


def w8a8_matmul(
    x: jax.Array, w: jax.Array, w_scale: jax.Array, *, act: str | jax.Array = "per_token"
) -> jax.Array:
    """W8A8 ``x @ W`` with the activation quantization inside the kernel (AVX2).

    ``x`` (M, K) float32 is quantized to int8 as ``jqx.ops``' XLA path quantizes it
    (``act="per_token"``: one absmax scale per row; ``"per_tensor"``: one for all of
    x; or a static scale array), multiplied by the int8 weight codes ``w`` (K, N)
    in exact int32 sums, and rescaled as ``(float(sum) * x_scale) * w_scale[n]``:
    for finite ``x`` the result equals the XLA path's bit for bit
    (:func:`w8a8_matmul_reference`). Each row's scale, codes and products are
    formed in one pass over the row, on the shared thread pool (:func:`pool_threads`;
    rows are split, so the result does not depend on the count). Works under
    ``jit``; under ``vmap`` it loops. Needs :func:`conv_available` (the kernel is in
    ``conv_int8.cc``'s library).

    Args:
      x: float32 (M, K).
      w: int8 (K, N), the weight codes.
      w_scale: float32 (N,), one scale per output column.
      act: ``"per_token"``, ``"per_tensor"`` or a one-element float32 static scale.

    Returns:
      float32 (M, N).

    Raises:
      ValueError: an operand of the wrong dtype or shape (named, with the fix).
      RuntimeError: the kernel is not available here (:func:`conv_status`).

    Example:
        >>> import jax.numpy as jnp
        >>> from jqx.kernels.cpu import native
        >>> x = jnp.array([[1.0, -2.0], [0.0, 0.0]])
        >>> w = jnp.array([[1, 0], [0, 127]], jnp.int8)
        >>> ws = jnp.array([1.0, 0.5], jnp.float32)
        >>> f = native.w8a8_matmul if native.conv_available() else native.w8a8_matmul_reference
        >>> f(x, w, ws).tolist()
        [[1.0078740119934082, -127.0], [0.0, 0.0]]
    """
    mode, s = _w8a8_check(x, w, w_scale, act, "w8a8_matmul")
    if not conv_available():
        raise RuntimeError(f"the native W8A8 kernel is not available: {conv_status()}")
    m, n = x.shape[0], w.shape[1]
    return jax.ffi.ffi_call(
        W8A8_TARGET, jax.ShapeDtypeStruct((m, n), jnp.float32), vmap_method="sequential"
    )(x, w, w_scale, s, mode=np.int64(mode))


# The epilogues of the float32 GEMM and the VNNI W8A8 GEMM (epilogue.h's EpAct): what
# runs on each output after the product and the bias. "gelu" is jax.nn.gelu(approximate=
# False) as jax traces it, (0.5 f) * erfc((-f) * 0.70710677), jqx's erfc (8 ulps);
# "gelu_tanh" jax.nn.gelu(approximate=True)'s trace, Cephes' tanh (2 ulps); "relu"
# jax.nn.relu, XLA's max(x, 0) bit for bit. jqx.ops.matmul.FLOAT_ACTIVATIONS names the
# same (a test keeps the two equal).
EPILOGUE_ACTIVATIONS = {None: 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}


def _check_float32(fn: str, arg: str, x) -> None:
    """A ValueError naming ``fn``'s argument ``arg`` unless ``x`` is a float32 array."""
    array = hasattr(x, "shape") and hasattr(x, "dtype")
    if not array or jnp.dtype(x.dtype) != jnp.float32:
        got = _describe(x) if array else type(x).__name__
        raise ValueError(
            f"{fn}: {arg} must be a float32 array, got {got}; cast it with "
            "jnp.asarray(...).astype(jnp.float32)."
        )


def _epilogue_args(name: str, bias, n: int, activation) -> tuple[jax.Array, np.int64]:
    """The kernel's bias operand ((n,), or (0,) for none) and activation code, after
    checking them (errors name ``name``'s arguments)."""
    if bias is not None:
        _check_float32(name, "bias", bias)
        if tuple(bias.shape) != (n,):
            raise ValueError(
                f"{name}: bias must be (N,) = ({n},), one value per output column, got "
                f"{tuple(bias.shape)}; reshape it, or add it after the product."
            )
    if activation not in EPILOGUE_ACTIVATIONS:
        raise ValueError(
            f"{name}: activation must be one of {sorted(map(repr, EPILOGUE_ACTIVATIONS))}, "
            f"got {activation!r}; apply other activations after the product."
        )
    if bias is None:
        bias = jnp.zeros((0,), jnp.float32)  # the kernels' "no bias"
    return bias, np.int64(EPILOGUE_ACTIVATIONS[activation])


def w8a8_matmul_vnni(
    x: jax.Array,
    w: jax.Array,
    w_scale: jax.Array,
    *,
    act: str | jax.Array = "per_token",
    bias: jax.Array | None = None,
    activation: str | None = None,
) -> jax.Array:
    """:func:`w8a8_matmul` on the AVX512-VNNI GEMM's tiles (``int8_gemm.cc``).

    The same operands, quantizer, exact int32 sums and rescale as :func:`w8a8_matmul`
    (so for finite ``x`` the XLA W8A8 path's result bit for bit): each chunk of rows
    is quantized into a per-thread buffer, multiplied on the VNNI register tiles and
    rescaled as each tile leaves the registers; XLA runs no pass over ``x`` or over the
    sums. The weight is packed per call, as for :func:`int8_matmul`, unless ``w`` is
    already :func:`pack_int8`'s 3-D layout (N is then ``w_scale``'s length). Needs
    :func:`available`.

    ``bias`` (float32 (N,)) and ``activation`` (``"gelu"``, ``"gelu_tanh"``,
    ``"relu"``): a dense layer's epilogue on each rescaled output before it is stored,
    as :func:`f32_matmul`'s: ``+ bias[n]``
    is XLA's add bit for bit, the GELU ``jax.nn.gelu(approximate=False)``'s trace with
    erfc within 8 ulps (``"gelu_tanh"``: ``jax.nn.gelu``'s tanh form, tanh within 2
    ulps; ``"relu"``: ``jax.nn.relu``, bit for bit).

    Raises:
      ValueError: an operand of the wrong dtype or shape (named, with the fix).
      RuntimeError: the kernel is not available here (:func:`status`).

    Example:
        >>> import jax.numpy as jnp
        >>> from jqx.kernels.cpu import native
        >>> f = native.w8a8_matmul_vnni if native.available() else native.w8a8_matmul_reference
        >>> x, w = jnp.array([[3.0, -1.0]]), jnp.array([[2], [1]], jnp.int8)
        >>> y = f(x, w, jnp.array([0.5]), act="per_tensor")  # codes 127, -42: sum 212
        >>> round(float(y[0, 0]), 5)  # 212 * (3 / 127) * 0.5
        2.50394
    """
    mode, s = _w8a8_check(x, w, w_scale, act, "w8a8_matmul_vnni", packed_ok=True)
    e, a = _epilogue_args("w8a8_matmul_vnni", bias, w_scale.shape[0], activation)
    return _w8a8_vnni_call(x, w, w_scale, s, mode, e, a)


def _w8a8_vnni_call(x, w, w_scale, act_scale, mode: int, bias, activation) -> jax.Array:
    """``jqx_w8a8_vnni`` on checked operands (a 3-D ``w``: the kernel takes it as packed,
    N is ``w_scale``'s length; the epilogue from :func:`_epilogue_args`)."""
    return _vnni_call(W8A8_VNNI_TARGET, w_scale.shape[0], mode, activation)(
        x, w, w_scale, act_scale, bias
    )


def _vnni_call(target: str, n: int, mode: int, activation):
    """``target`` (``jqx_w8a8_vnni``, ``jqx_w8a8_mlp``) as a call on its operands, x
    first: float32 (rows of x, ``n``), one call per index under ``vmap``."""
    if not available():
        raise RuntimeError(f"the native int8 GEMM is not available: {status()}")

    def call(x, *operands):
        return jax.ffi.ffi_call(
            target, jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32), vmap_method="sequential"
        )(
            x,
            *operands,
            mode=np.int64(mode),
            threads=np.int64(_threads()),
            activation=activation,
        )

    return call


def w8a8_mlp(
    x: jax.Array,
    w1: jax.Array,
    w1_scale: jax.Array,
    w2: jax.Array,
    w2_scale: jax.Array,
    *,
    act: str | tuple = "per_token",
    bias1: jax.Array | None = None,
    activation: str | None = None,
    bias2: jax.Array | None = None,
) -> jax.Array:
    """Two int8 dense layers in one call: ``act`` ``"per_token"`` or a static pair
    ``(scale1, scale2)`` gives ``w8a8_matmul_vnni(w8a8_matmul_vnni(x, w1, w1_scale,
    act=..., bias=bias1, activation=activation), w2, w2_scale, act=..., bias=bias2)``;
    ``"two_level"`` gives the same with :func:`two_level_matmul` (int8 weight-only).
    The result equals those two calls' bit for bit (``int8_gemm.cc``), packed weights or
    plain.

    Each chunk of rows runs both layers on one thread: its hidden rows (F floats each)
    stay in a per-thread buffer, are quantized again from there and multiplied by
    ``w2`` while in cache. The hidden activations are never written to memory XLA
    allocates (a transformer's (rows, 4 x hidden) intermediate: 25 MB for
    all-MiniLM-L6-v2 at batch 32 x 128). Needs :func:`available`.

    Args:
      x: float32 (M, K).
      w1, w2: the two weights' int8 codes, (K, F) and (F, N), or their :func:`pack_int8`
        panels (``packed_shape(K, F)``, ``packed_shape(F, N)``; a plain weight is packed
        per call, as :func:`w8a8_matmul_vnni` packs it).
      w1_scale, w2_scale: float32 (F,) and (N,), one scale per output column.
      act: ``"per_token"`` (dynamic W8A8), ``"two_level"`` (int8 weight-only), or a
        pair of float32 one-element arrays, each layer's static activation scale.
      bias1, activation: the first layer's epilogue (as :func:`w8a8_matmul_vnni`'s).
      bias2: None, or float32 (N,): the second layer's bias.

    Returns:
      float32 (M, N).

    Raises:
      ValueError: an operand of the wrong dtype or shape, an unknown ``act`` or
        ``activation``, K or F of 0 (named, with the fix).
      RuntimeError: the kernel is not available here (:func:`status`).

    Example:
        >>> import jax.numpy as jnp
        >>> from jqx.kernels.cpu import native
        >>> x = jnp.array([[3.0, -1.0]])
        >>> w1, w2 = jnp.array([[2], [1]], jnp.int8), jnp.array([[1, -1]], jnp.int8)
        >>> s1, s2 = jnp.array([0.5]), jnp.array([1.0, 2.0])
        >>> if native.available():
        ...     y = native.w8a8_mlp(x, native.pack_int8(w1), s1, w2, s2)
        ... else:
        ...     y = native.w8a8_matmul_reference(native.w8a8_matmul_reference(x, w1, s1), w2, s2)
        >>> [round(v, 4) for v in y[0].tolist()]  # h = 212 * (3 / 127) * 0.5; its code 127
        [2.5039, -5.0079]
    """
    fn = "w8a8_mlp"
    _check_float32(fn, "x", x)
    if x.ndim != 2:
        raise ValueError(f"{fn}: x must be float32 (M, K), got {_describe(x)}; reshape to 2-D.")
    if x.shape[1] == 0 or (hasattr(w1_scale, "shape") and w1_scale.shape[:1] == (0,)):
        raise ValueError(
            f"{fn}: K={x.shape[1]} and F={getattr(w1_scale, 'shape', ('?',))[0]} must be "
            "positive; run an empty layer with w8a8_matmul_vnni."
        )
    if isinstance(act, str) and act == "two_level":
        a1 = a2 = "per_token"
        mode = _TWO_LEVEL_MODE
    elif isinstance(act, str):
        if act != "per_token":
            raise ValueError(
                f"{fn}: act={act!r} must be 'per_token', 'two_level' or a pair of static "
                "scales; a per-tensor scale over the hidden rows needs them all (run two "
                "w8a8_matmul_vnni calls)."
            )
        a1 = a2 = act
        mode = _W8A8_MODES["per_token"]
    elif isinstance(act, (tuple, list)) and len(act) == 2:
        a1, a2 = act
        mode = _W8A8_MODES["static"]
    else:
        raise ValueError(
            f"{fn}: act={act!r} must be 'per_token', 'two_level' or a pair (scale1, "
            "scale2) of float32 one-element arrays."
        )
    layers = []
    for i, (v, w, ws, a) in enumerate(((x, w1, w1_scale, a1), (None, w2, w2_scale, a2)), 1):
        if v is None:  # the hidden activations, (M, F)
            v = jax.ShapeDtypeStruct((x.shape[0], w1_scale.shape[0]), jnp.float32)
        try:
            layers.append(_w8a8_check(v, w, ws, a, fn, packed_ok=True)[1])
        except ValueError as e:
            raise ValueError(
                f"{e} (layer {i}: w is w{i}, w_scale is w{i}_scale"
                + (", x is the hidden activations (M, F))" if i == 2 else ")")
            ) from None
    s1, s2 = layers
    f = w1_scale.shape[0]
    e1, code = _epilogue_args(fn, bias1, f, activation)
    e2, _ = _epilogue_args(fn, bias2, w2_scale.shape[0], None)
    return _vnni_call(W8A8_MLP_TARGET, w2_scale.shape[0], mode, code)(
        x, w1, w1_scale, s1, e1, w2, w2_scale, s2, e2
    )


def w8a8_matmul_reference(
    x: jax.Array, w: jax.Array, w_scale: jax.Array, *, act: str | jax.Array = "per_token"
) -> jax.Array:
    """Plain-jnp :func:`w8a8_matmul`: ``jqx.core.numerics``' activation quantizer,
    XLA's int8 x int8 -> int32 dot, then ``* x_scale * w_scale``. Same operands and
    errors; runs anywhere.

    Example:
        >>> import jax.numpy as jnp
        >>> from jqx.kernels.cpu import native
        >>> x = jnp.array([[2.0, -1.0]])
        >>> w = jnp.array([[1], [1]], jnp.int8)
        >>> native.w8a8_matmul_reference(x, w, jnp.array([1.0])).tolist()  # codes 127, -64
        [[0.9921259880065918]]
    """
    mode, s = _w8a8_check(x, w, w_scale, act, "w8a8_matmul_reference")
    # The formulas of jqx.core.numerics (absmax_scale, div_by_scale, the int8
    # encode), written out: this layer imports no other jqx module.
    if mode == _W8A8_MODES["static"]:
        # numerics.keep_nan_rows: a row holding NaN gets a NaN scale.
        s = jnp.where(jnp.any(jnp.isnan(x), axis=-1, keepdims=True), jnp.nan, s.reshape(1, 1))
    else:
        s = _ref_absmax_scale(x, per_row=mode == _W8A8_MODES["per_token"])
    codes = _ref_int8_codes(x, s)
    acc = lax.dot_general(codes, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    return acc.astype(jnp.float32) * s * w_scale[None, :]


def _ref_absmax_scale(x: jax.Array, per_row: bool = True) -> jax.Array:
    """numerics.absmax_scale for int8, (rows, 1) or (1, 1): ``max|x| / 127``, 1 for a zero
    row, a NaN counted as inf (numerics.nan_max: XLA:CPU's max can drop it)."""
    ax = jnp.where(jnp.isnan(x), jnp.inf, jnp.abs(x))
    amax = jnp.max(ax, axis=-1, keepdims=True) if per_row else jnp.max(ax)
    s = jnp.reshape(amax / 127.0, (-1, 1))
    return jnp.where(s == 0, 1.0, s).astype(jnp.float32)


def _ref_int8_codes(v: jax.Array, s: jax.Array) -> jax.Array:
    """numerics.div_by_scale and the int8 encode: ``clip(round(v / s))``, both sides
    scaled by 2^-64 where ``s`` is huge (as the kernels do)."""
    c = jnp.where(s > 2.0**100, 2.0**-64, 1.0).astype(jnp.float32)
    return jnp.clip(jnp.round((v * c) / (s * c)), -128, 127).astype(jnp.int8)


def two_level_matmul(
    x: jax.Array,
    w: jax.Array,
    w_scale: jax.Array,
    *,
    bias: jax.Array | None = None,
    activation: str | None = None,
) -> jax.Array:
    """int8 weight-only ``x @ W`` with x split into two int8 levels inside the kernel,
    on the AVX512-VNNI GEMM's tiles (``int8_gemm.cc``, as :func:`w8a8_matmul_vnni`).

    Each row is split as ``jqx.ops``' XLA path splits it
    (``jqx.ops.impl_xla.two_level_split``, ``jqx.core.numerics.two_level_scales``):
    ``s1 = max|x_row| / 127`` (1 for a zero row) rounded up to 16 significant bits,
    codes ``q1`` under ``s1``, the residual ``x - q1 * s1``, its codes ``q2`` under
    ``s2 = s1 * 2^-8``; both levels' exact int32 sums against the weight codes, then
    ``((sum1 + sum2 * 2^-8) * s1) * w_scale[n]``. The result equals that path's bit for
    bit (NaN and inf included) under any XLA compilation, and differs from ``x @
    (codes * w_scale)`` by at most ``max|x_row| / 32511 * sum_k |codes[k, n] *
    w_scale[n]|`` plus float32 rounding. ``x`` is read once, its codes stay in a
    per-thread buffer; the weight is packed per call unless ``w`` is
    :func:`pack_int8`'s 3-D layout (N is then ``w_scale``'s length). Needs
    :func:`available`. ``bias`` and ``activation``: the epilogue, as
    :func:`w8a8_matmul_vnni`'s.

    Args:
      x: float32 (M, K).
      w: int8 (K, N) weight codes, or their :func:`pack_int8` panels.
      w_scale: float32 (N,), one scale per output column.
      bias: None, or float32 (N,): added to every row.
      activation: None, ``"gelu"`` (the exact, erf form), ``"gelu_tanh"`` or ``"relu"``.

    Returns:
      float32 (M, N).

    Raises:
      ValueError: an operand of the wrong dtype or shape (named, with the fix).
      RuntimeError: the kernel is not available here (:func:`status`).

    Example:
        >>> import jax.numpy as jnp
        >>> from jqx.kernels.cpu import native
        >>> f = native.two_level_matmul if native.available() else native.two_level_matmul_reference
        >>> x, w = jnp.array([[0.3, -1.0]]), jnp.array([[2], [1]], jnp.int8)
        >>> round(float(f(x, w, jnp.array([0.5]))[0, 0]), 4)  # (0.6 - 1.0) * 0.5, to 2^-15
        -0.2
    """
    _w8a8_check(x, w, w_scale, "per_token", "two_level_matmul", packed_ok=True)
    e, a = _epilogue_args("two_level_matmul", bias, w_scale.shape[0], activation)
    one = jnp.ones((1,), jnp.float32)
    return _w8a8_vnni_call(x, w, w_scale, one, _TWO_LEVEL_MODE, e, a)


def two_level_matmul_reference(x: jax.Array, w: jax.Array, w_scale: jax.Array) -> jax.Array:
    """Plain-jnp :func:`two_level_matmul` (the formulas of ``jqx.core.numerics``
    written out: this layer imports no other jqx module). Same operands and errors,
    a (K, N) ``w`` only; runs anywhere.

    Example:
        >>> import jax.numpy as jnp
        >>> from jqx.kernels.cpu import native
        >>> x, w = jnp.array([[0.3, -1.0]]), jnp.array([[2], [1]], jnp.int8)
        >>> round(float(native.two_level_matmul_reference(x, w, jnp.array([0.5]))[0, 0]), 4)
        -0.2
    """
    _w8a8_check(x, w, w_scale, "per_token", "two_level_matmul_reference")
    # numerics.two_level_scales: s rounded up to 16 significant bits, s2 = s1 * 2^-8.
    bits = lax.bitcast_convert_type(_ref_absmax_scale(x), jnp.uint32)
    s1 = lax.bitcast_convert_type((bits + jnp.uint32(0xFF)) & jnp.uint32(0xFFFFFF00), jnp.float32)
    s2 = s1 * 2.0**-8
    q1 = _ref_int8_codes(x, s1)
    q2 = _ref_int8_codes(x - q1.astype(jnp.float32) * s1, s2)
    dn = (((1,), (0,)), ((), ()))
    acc1, acc2 = (
        lax.dot_general(q, w, dn, preferred_element_type=jnp.int32).astype(jnp.float32)
        for q in (q1, q2)
    )
    return ((acc1 + acc2 * 2.0**-8) * s1) * w_scale[None, :]


# The block scale dtypes the decode kernels read as they are stored (other dtypes are
# widened to float32 first): the FP8 kernel float32 and MX's E8M0, the 4-bit kernel
# also NVFP4's E4M3.
FP8_SCALE_DTYPES = (jnp.float32, jnp.float8_e8m0fnu)
W4_SCALE_DTYPES = (*FP8_SCALE_DTYPES, jnp.float8_e4m3fn)


def _decode_rows(x: jax.Array, group_size: int, fn: str) -> tuple[int, int]:
    """``(M, K)`` of a decode kernel's activations, checked: float32, 2-D, at most
    :data:`W4_MAX_ROWS` rows, ``group_size`` dividing K."""
    if x.ndim != 2 or x.shape[0] > W4_MAX_ROWS or x.dtype != jnp.float32:
        raise TypeError(
            f"{fn}: x must be float32 (M, K) with M <= {W4_MAX_ROWS}, got {x.dtype} "
            f"{tuple(x.shape)}."
        )
    m, k = x.shape
    if group_size <= 0 or k % group_size:
        raise TypeError(f"{fn}: group_size={group_size} must divide K={k}.")
    return m, k


def w4_matmul(
    x: jax.Array,
    packed: jax.Array,
    table: jax.Array,
    scale: jax.Array,
    zero: jax.Array | None,
    *,
    n: int,
    group_size: int,
    scale2: jax.Array | None = None,
) -> jax.Array:
    """``x @ W`` for a 4-bit group-wise weight, f32, for up to
    :data:`W4_MAX_ROWS` rows (decode), reading the packed weight in place.

    ``W[k, j] = (table[code[k, j]] - zero[g, j]) * s[g, j]`` with
    ``g = k // group_size`` and ``s = scale`` widened to float32 (times ``scale2``
    when given, rounded once: NVFP4's two-level scales, as ``QArray.dequantize``
    computes them); codes are packed two per byte along N, low nibble first (jqx's
    QArray layout). Sums are f32 (each group's codes first, then its zero and scale),
    so the result equals ``x @ W`` up to f32 rounding.

    Args:
      x: (M, K) float32, M <= W4_MAX_ROWS.
      packed: (K, ceil(n / 2)) uint8.
      table: (16,) float32, the value of each code.
      scale: (K // group_size, n) float32, float8_e8m0fnu (MXFP4's block scales) or
        float8_e4m3fn (NVFP4's), widened in the kernel exactly as ``astype(float32)``
        widens them.
      zero: (K // group_size, n) float32, or None.
      n: the weight's N.
      group_size: rows of K per scale; must divide K.
      scale2: float32 second-level scales that multiply the block scales: one (any
        shape of one element; NVFP4's per-tensor scale) or ``n``, one per column
        (weights of different per-tensor scales stacked along N), or None.

    Raises:
      TypeError: shapes or dtypes that do not match.
    """
    m, k = _decode_rows(x, group_size, "w4_matmul")
    want = {
        "packed": (packed, (k, -(-n // 2)), (jnp.uint8,)),
        "table": (table, (16,), (jnp.float32,)),
        "scale": (scale, (k // group_size, n), W4_SCALE_DTYPES),
    }
    if zero is not None:
        want["zero"] = (zero, (k // group_size, n), (jnp.float32,))
    if scale2 is not None:
        if scale2.size not in (1, n) or jnp.dtype(scale2.dtype) != jnp.dtype(jnp.float32):
            raise TypeError(
                f"w4_matmul: scale2 must be one float32 (the per-tensor scale) or n={n} "
                f"(one per column), got {scale2.dtype} {tuple(scale2.shape)}."
            )
        scale2 = scale2.reshape(-1)
    for name, (a, shape, dts) in want.items():
        if tuple(a.shape) != shape or jnp.dtype(a.dtype) not in [jnp.dtype(d) for d in dts]:
            names = " or ".join(jnp.dtype(d).name for d in dts)
            raise TypeError(
                f"w4_matmul: {name} must be {names} {shape}, got {a.dtype} {tuple(a.shape)}."
            )
    if not available():
        raise RuntimeError(f"the native kernels are not available: {status()}")
    return jax.ffi.ffi_call(
        W4_TARGET, jax.ShapeDtypeStruct((m, n), jnp.float32), vmap_method="sequential"
    )(
        x,
        packed,
        table,
        scale,
        table[:1] if scale2 is None else scale2,  # a float32 stand-in, not read
        table if zero is None else zero,  # a float32 stand-in, not read
        group=np.int64(group_size),
        has_zero=np.int64(zero is not None),
        has_scale2=np.int64(scale2 is not None),
        threads=np.int64(_threads()),
    )


def fp8_matmul(x: jax.Array, codes: jax.Array, scale: jax.Array, *, group_size: int) -> jax.Array:
    """``x @ W`` for an FP8 weight-only weight, f32, for up to :data:`W4_MAX_ROWS`
    rows (decode), reading the codes in place.

    ``W[k, j] = codes[k, j] * scale[g, j]`` with ``g = k // group_size``. Each code
    widens to float exactly (E4M3's NaN codes stay NaN); sums are f32 (each group's
    codes first, then its scale), so the result equals ``x @ W`` up to f32 rounding.

    Args:
      x: (M, K) float32, M <= W4_MAX_ROWS.
      codes: (K, N) ``float8_e4m3fn`` or ``float8_e5m2``.
      scale: (K // group_size, N) float32, or float8_e8m0fnu (MXFP8's block scales,
        widened in the kernel).
      group_size: rows of K per scale (K for one scale per column); must divide K.

    Raises:
      TypeError: shapes or dtypes that do not match.
    """
    m, k = _decode_rows(x, group_size, "fp8_matmul")
    kinds = (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2))
    if codes.ndim != 2 or codes.shape[0] != k or jnp.dtype(codes.dtype) not in kinds:
        raise TypeError(
            f"fp8_matmul: codes must be float8_e4m3fn or float8_e5m2 ({k}, N), got "
            f"{codes.dtype} {tuple(codes.shape)}."
        )
    n = codes.shape[1]
    if tuple(scale.shape) != (k // group_size, n) or jnp.dtype(scale.dtype) not in [
        jnp.dtype(d) for d in FP8_SCALE_DTYPES
    ]:
        raise TypeError(
            f"fp8_matmul: scale must be float32 or float8_e8m0fnu {(k // group_size, n)}, got "
            f"{scale.dtype} {tuple(scale.shape)}."
        )
    if not available():
        raise RuntimeError(f"the native kernels are not available: {status()}")
    return jax.ffi.ffi_call(
        FP8_TARGET, jax.ShapeDtypeStruct((m, n), jnp.float32), vmap_method="sequential"
    )(
        x,
        codes,  # in its own dtype: a bitcast to uint8 would copy it per call
        scale,
        group=np.int64(group_size),
        threads=np.int64(_threads()),
    )


def _gguf_kind(kind: str, fn: str = "gguf_matmul") -> str:
    k = str(kind).upper() if isinstance(kind, str) else kind
    if k not in GGUF_KINDS:
        raise ValueError(
            f"{fn}: kind={kind!r} is not a supported GGUF block type; pass one of "
            f"{', '.join(map(repr, GGUF_KINDS))} (the tensor's GGML type name, e.g. "
            "jqx.load_gguf(path).types[name])."
        )
    return k


def _describe(a) -> str:
    return f"{jnp.dtype(a.dtype).name} {tuple(a.shape)}"


def _gguf_check(
    x, qvalue, scale, minimum, kind: str, max_rows: int | None, fn: str = "gguf_matmul"
) -> str:
    """Validates the operands of :func:`gguf_matmul` (or ``fn``, which has the same
    operands); returns the canonical kind."""
    kind = _gguf_kind(kind, fn)
    for name, a in (("x", x), ("qvalue", qvalue), ("scale", scale)):
        if not hasattr(a, "shape") or not hasattr(a, "dtype"):
            raise ValueError(f"{fn}: {name} must be an array, got {type(a).__name__}.")
    if x.ndim != 2 or jnp.dtype(x.dtype) != jnp.float32:
        raise ValueError(
            f"{fn}: x must be float32 (M, K), got {_describe(x)}; reshape leading "
            "axes into M and cast with x.astype(jnp.float32)."
        )
    m, k = x.shape
    if max_rows is not None and m > max_rows:
        raise ValueError(
            f"{fn}: x has M={m} rows; the kernel takes at most {max_rows} (decode "
            f"sizes); split x into chunks of {max_rows} rows or use x @ W.dequantize().T."
        )
    if k % GGUF_BLOCK:
        raise ValueError(
            f"{fn}: K={k} (x.shape[1]) is not a multiple of the GGUF block size "
            f"{GGUF_BLOCK}; GGUF weights always have K a multiple of {GGUF_BLOCK}: pass x "
            "with the weight's number of input features."
        )
    n = qvalue.shape[0] if qvalue.ndim == 2 else None
    codes = (
        (jnp.int8, (n, k), "int8 codes, one per element")
        if kind == "Q8_0"
        else (jnp.uint8, (n, k // 2), "uint8, two 4-bit codes per byte")
    )
    if n is None or jnp.dtype(qvalue.dtype) != codes[0] or tuple(qvalue.shape) != codes[1]:
        raise ValueError(
            f"{fn}: for kind={kind!r} and K={k}, qvalue must be "
            f"{jnp.dtype(codes[0]).name} (N, {codes[1][1]}) ({codes[2]}), got "
            f"{_describe(qvalue)}; pass the QArray's qvalue as loaded by jqx.load_gguf, "
            "and x with the weight's K."
        )
    want = (n, k // GGUF_BLOCK)
    operands = [("scale", scale)]
    if kind == "Q4_1":
        if minimum is None:
            raise ValueError(
                f"{fn}: kind='Q4_1' needs minimum (the QArray's zero_point, float16 "
                f"{want}); got None."
            )
        operands.append(("minimum", minimum))
    elif minimum is not None:
        raise ValueError(
            f"{fn}: kind={kind!r} has no per-block minimum, got minimum "
            f"{_describe(minimum)}; pass minimum=None."
        )
    for name, a in operands:
        if jnp.dtype(a.dtype) != jnp.float16 or tuple(a.shape) != want:
            raise ValueError(
                f"{fn}: {name} must be float16 (N, K/{GGUF_BLOCK}) = {want}, got "
                f"{_describe(a)}; pass the QArray's {'zero_point' if name == 'minimum' else name}"
                " as loaded by jqx.load_gguf (fp16, one per block of 32)."
            )
    return kind


def _gguf_call(target: str, x, qvalue, scale, minimum, kind: str) -> jax.Array:
    """The FFI call of a checked GGUF matmul (``target``: exact or q8)."""
    if not gguf_available():
        raise RuntimeError(f"the native GGUF kernel is not available: {gguf_status()}")
    m, n = x.shape[0], qvalue.shape[0]
    return jax.ffi.ffi_call(
        target, jax.ShapeDtypeStruct((m, n), jnp.float32), vmap_method="sequential"
    )(
        x,
        qvalue,
        scale,
        scale if minimum is None else minimum,
        kind=np.int64(GGUF_KINDS.index(kind)),
    )


def gguf_matmul(
    x: jax.Array,
    qvalue: jax.Array,
    scale: jax.Array,
    minimum: jax.Array | None = None,
    *,
    kind: str,
) -> jax.Array:
    """``x @ W.T`` for a GGUF block-quantized weight ``W`` (N, K), read in place.

    The native AVX2 kernel (``gguf_gemv.cc``) for decode sizes: float32 ``x`` of up
    to :data:`GGUF_MAX_ROWS` rows, ``W`` as ``jqx.load_gguf`` keeps it (blocks of 32
    along K). Per block it sums ``q * x`` in float32, scales by the block's ``d`` and
    adds ``m * sum(x)``: ``x`` is never quantized, so the result equals
    ``x @ W.dequantize().T`` up to float32 summation. Works under ``jit`` (one FFI
    call); under ``vmap`` it loops. Threads: :func:`gguf_num_threads`; the result
    does not depend on their number. Speed against XLA's dequantize-then-dot and a
    float32 dot, per M: ``benchmarks/gguf_gemv.py``.

    Args:
      x: float32 (M, K), M <= GGUF_MAX_ROWS, K a multiple of 32.
      qvalue: the codes. Q4_0/Q4_1: uint8 (N, K/2), two per byte, adjacent elements
        share a byte, low nibble first (Q4_0 codes are int4 two's complement);
        Q8_0: int8 (N, K).
      scale: float16 (N, K/32), the block scales ``d``.
      minimum: Q4_1 only: float16 (N, K/32), the block minimum ``m`` (the QArray's
        ``zero_point``); None for Q4_0 and Q8_0.
      kind: ``"Q4_0"``, ``"Q4_1"`` or ``"Q8_0"`` (case-insensitive). ``w = d * q``,
        or ``d * q + m`` for Q4_1.

    Returns:
      float32 (M, N).

    Raises:
      ValueError: a kind, dtype or shape the kernel does not take (the message
        names the operand and what it must be).
      RuntimeError: the kernel is not available here (:func:`gguf_status`).

    Example:
        >>> import numpy as np, jax.numpy as jnp
        >>> from jqx.kernels.cpu import native
        >>> q = jnp.asarray(np.arange(-32, 32, dtype=np.int8).reshape(2, 32))
        >>> d = jnp.full((2, 1), 0.5, jnp.float16)
        >>> x = jnp.ones((1, 32), jnp.float32)
        >>> y = native.gguf_matmul(x, q, d, kind="Q8_0") if native.gguf_available() else None
        >>> y.tolist() if y is not None else [[-264.0, 248.0]]
        [[-264.0, 248.0]]
    """
    kind = _gguf_check(x, qvalue, scale, minimum, kind, GGUF_MAX_ROWS)
    return _gguf_call(GGUF_TARGET, x, qvalue, scale, minimum, kind)


def gguf_matmul_reference(
    x: jax.Array,
    qvalue: jax.Array,
    scale: jax.Array,
    minimum: jax.Array | None = None,
    *,
    kind: str,
) -> jax.Array:
    """Plain-jnp :func:`gguf_matmul` (any M): dequantize ``W`` to float32, then
    ``x @ W.T`` at HIGHEST precision. Same operands and errors, without the row
    limit; runs anywhere.

    Example:
        >>> import numpy as np, jax.numpy as jnp
        >>> from jqx.kernels.cpu import native
        >>> q = jnp.asarray(np.full((1, 16), 0x21, np.uint8))  # codes 1, 2, 1, 2, ...
        >>> d, m = jnp.ones((1, 1), jnp.float16), jnp.full((1, 1), -1.0, jnp.float16)
        >>> native.gguf_matmul_reference(jnp.ones((1, 32)), q, d, m, kind="Q4_1").tolist()
        [[16.0]]
    """
    kind = _gguf_check(x, qvalue, scale, minimum, kind, None)
    n, k = qvalue.shape[0], x.shape[1]
    if kind == "Q8_0":
        codes = qvalue.astype(jnp.float32)
    else:
        nib = jnp.stack([qvalue & jnp.uint8(0xF), qvalue >> jnp.uint8(4)], axis=-1)
        c = nib.reshape(n, k).astype(jnp.int32)
        if kind == "Q4_0":
            c = (c ^ 8) - 8  # two's complement nibble -> signed
        codes = c.astype(jnp.float32)
    blocks = codes.reshape(n, k // GGUF_BLOCK, GGUF_BLOCK)
    w = blocks * scale.astype(jnp.float32)[..., None]
    if minimum is not None:
        w = w + minimum.astype(jnp.float32)[..., None]
    return lax.dot_general(
        x,
        w.reshape(n, k),
        (((1,), (1,)), ((), ())),
        precision=lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )


def gguf_quantize_q8(x: jax.Array, *, kind: str = "Q8_0"):
    """``x`` quantized to int8 per block of 32 along its last axis, as llama.cpp
    quantizes a matmul's activations (``quantize_row_q8_0`` / ``quantize_row_q8_1``).

    Per block: ``amax = max|x|``, ``d = amax / 127`` (float32) rounded to float16,
    ``codes = round_half_even(x * (127 / amax))`` (0 for an all-zero block, and where
    ``127 / amax`` overflows float32, i.e. ``amax`` below about 3.7e-37, whose ``d``
    is 0 in float16 anyway: llama.cpp's codes are garbage there, its product the
    same 0). ``kind="Q8_1"`` also returns ``s = d * sum(codes)``, computed with the
    float32 ``d`` and rounded to float16. ``d`` overflows float16 (inf) where
    ``amax`` exceeds about 8.3e6, ``s`` where a block's sum exceeds 65504, as in
    llama.cpp. This is the quantizer of :func:`gguf_matmul_q8_reference`; the
    native kernel's is bit-identical (tests/test_kernels_gguf.py).

    Args:
      x: float32 (..., K), K a multiple of 32.
      kind: ``"Q8_0"`` (codes and ``d``) or ``"Q8_1"`` (also ``s``).

    Returns:
      ``(codes, d, s)``: int8 (..., K), float16 (..., K/32), and float16
      (..., K/32) for Q8_1 or None for Q8_0.

    Raises:
      ValueError: ``x`` not float32 with a last axis a multiple of 32, or another
        ``kind``.

    Example:
        >>> import jax.numpy as jnp
        >>> from jqx.kernels.cpu import native
        >>> x = jnp.linspace(-1.0, 1.0, 32, dtype=jnp.float32)[None]
        >>> codes, d, s = native.gguf_quantize_q8(x, kind="Q8_1")
        >>> codes[0, :3].tolist(), float(d[0, 0]), float(s[0, 0])  # d: 1/127 in float16
        ([-127, -119, -111], 0.00787353515625, 0.0)
    """
    k = str(kind).upper() if isinstance(kind, str) else kind
    if k not in ("Q8_0", "Q8_1"):
        raise ValueError(
            f"gguf_quantize_q8: kind={kind!r} is not an activation block type; pass "
            "'Q8_0' (codes and scale) or 'Q8_1' (also the scaled code sums)."
        )
    if not hasattr(x, "dtype") or jnp.dtype(x.dtype) != jnp.float32 or x.ndim < 1:
        raise ValueError(
            f"gguf_quantize_q8: x must be a float32 array, got "
            f"{_describe(x) if hasattr(x, 'dtype') else type(x).__name__}; cast with "
            "x.astype(jnp.float32)."
        )
    if x.shape[-1] % GGUF_BLOCK:
        raise ValueError(
            f"gguf_quantize_q8: the last axis of x has {x.shape[-1]} elements, not a "
            f"multiple of the block size {GGUF_BLOCK}; pad it or pass the weight's K."
        )
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // GGUF_BLOCK, GGUF_BLOCK)
    amax = jnp.max(jnp.abs(blocks), axis=-1)
    d = amax / jnp.float32(127.0)
    inv = jnp.float32(127.0) / jnp.where(amax != 0, amax, jnp.float32(1.0))
    inv = jnp.where((amax != 0) & jnp.isfinite(inv), inv, jnp.float32(0.0))
    c = jnp.round(blocks * inv[..., None])  # half to even, |c| <= 127
    codes = c.astype(jnp.int8).reshape(x.shape)
    s = None
    if k == "Q8_1":
        total = jnp.sum(c.astype(jnp.int32), axis=-1).astype(jnp.float32)
        s = (d * total).astype(jnp.float16)
    return codes, d.astype(jnp.float16), s


def gguf_matmul_q8(
    x: jax.Array,
    qvalue: jax.Array,
    scale: jax.Array,
    minimum: jax.Array | None = None,
    *,
    kind: str,
) -> jax.Array:
    """``x @ W.T`` for a GGUF block weight with ``x`` quantized to int8, as llama.cpp
    computes it on CPUs: the native kernel ``jqx_gguf_gemv_q8`` (``gguf_gemv.cc``).

    Each row of ``x`` is quantized once per call by :func:`gguf_quantize_q8` (Q8_1
    for Q4_1 weights, Q8_0 for the others); per weight block the kernel forms the
    exact integer dot of the codes (``vpmaddubsw``/``vpmaddwd``), then accumulates in
    float32 ``d_w * d_x * isum`` (+ ``m_w * s_x`` for Q4_1). It equals
    :func:`gguf_matmul_q8_reference` up to float32 summation; against the exact
    product ``x @ W.dequantize().T`` it differs by the rounding of ``x`` to int8
    (about ``d_x / 2`` per element) and of ``d_x``, ``s_x`` to float16. Blocks of
    ``x`` with ``max|x|`` above about 8.3e6 (Q4_1: a block sum above 65504) give
    inf/NaN, as in llama.cpp; ``x`` must be finite. Same operands and limits as
    :func:`gguf_matmul`; works under ``jit`` (one FFI call), loops under ``vmap``;
    the result does not depend on the number of threads. Speed against
    :func:`gguf_matmul`: ``benchmarks/gguf_gemv.py``.

    Args:
      x: float32 (M, K), M <= GGUF_MAX_ROWS, K a multiple of 32.
      qvalue: the codes, as for :func:`gguf_matmul`.
      scale: float16 (N, K/32), the block scales ``d``.
      minimum: Q4_1 only: float16 (N, K/32); None for Q4_0 and Q8_0.
      kind: ``"Q4_0"``, ``"Q4_1"`` or ``"Q8_0"`` (case-insensitive).

    Returns:
      float32 (M, N).

    Raises:
      ValueError: a kind, dtype or shape the kernel does not take (the message
        names the operand and what it must be).
      RuntimeError: the kernel is not available here (:func:`gguf_status`).

    Example:
        >>> import numpy as np, jax.numpy as jnp
        >>> from jqx.kernels.cpu import native
        >>> q = jnp.asarray(np.arange(-32, 32, dtype=np.int8).reshape(2, 32))
        >>> d = jnp.full((2, 1), 0.5, jnp.float16)
        >>> x = jnp.ones((1, 32), jnp.float32)  # quantizes exactly: codes 127, d = 1/127
        >>> f = native.gguf_matmul_q8 if native.gguf_available() else (
        ...     native.gguf_matmul_q8_reference)
        >>> np.round(np.asarray(f(x, q, d, kind="Q8_0")), 1).tolist()
        [[-264.0, 248.0]]
    """
    kind = _gguf_check(x, qvalue, scale, minimum, kind, GGUF_MAX_ROWS, "gguf_matmul_q8")
    return _gguf_call(GGUF_Q8_TARGET, x, qvalue, scale, minimum, kind)


def gguf_matmul_q8_reference(
    x: jax.Array,
    qvalue: jax.Array,
    scale: jax.Array,
    minimum: jax.Array | None = None,
    *,
    kind: str,
) -> jax.Array:
    """Plain-jnp :func:`gguf_matmul_q8` (any M): ``x`` through
    :func:`gguf_quantize_q8`, the exact int32 dot of the codes per block
    (``isum``), then ``sum_b f32(d_w * d_x) * isum (+ m_w * s_x)`` in float32.
    Same operands and errors, without the row limit; runs anywhere. It holds an
    (M, N, K/32) int32 array: meant for tests, not for speed.

    Example:
        >>> import numpy as np, jax.numpy as jnp
        >>> from jqx.kernels.cpu import native
        >>> q = jnp.asarray(np.full((1, 16), 0x21, np.uint8))  # codes 1, 2, 1, 2, ...
        >>> d, m = jnp.ones((1, 1), jnp.float16), jnp.full((1, 1), -1.0, jnp.float16)
        >>> x = jnp.full((1, 32), 127 / 256, jnp.float32)  # codes 127, d = 1/256 exactly
        >>> native.gguf_matmul_q8_reference(x, q, d, m, kind="Q4_1").tolist()
        [[7.9375]]
    """
    kind = _gguf_check(x, qvalue, scale, minimum, kind, None, "gguf_matmul_q8_reference")
    n, k = qvalue.shape[0], x.shape[1]
    m, nb = x.shape[0], k // GGUF_BLOCK
    codes, dx, sx = gguf_quantize_q8(x, kind="Q8_1" if kind == "Q4_1" else "Q8_0")
    if kind == "Q8_0":
        w = qvalue
    else:
        nib = jnp.stack([qvalue & jnp.uint8(0xF), qvalue >> jnp.uint8(4)], axis=-1)
        c = nib.reshape(n, k).astype(jnp.int8)
        w = (c ^ jnp.int8(8)) - jnp.int8(8) if kind == "Q4_0" else c  # int4 -> signed
    # (nb, M, 32) x (nb, N, 32) -> (nb, M, N): exact in int32 (|isum| <= 32 * 128 * 127).
    isum = lax.dot_general(
        codes.reshape(m, nb, GGUF_BLOCK).transpose(1, 0, 2),
        w.reshape(n, nb, GGUF_BLOCK).transpose(1, 0, 2),
        (((2,), (2,)), ((0,), (0,))),
        preferred_element_type=jnp.int32,
    )
    dd = dx.astype(jnp.float32).T[:, :, None] * scale.astype(jnp.float32).T[:, None, :]
    terms = dd * isum.astype(jnp.float32)
    if kind == "Q4_1":
        mx = sx.astype(jnp.float32).T[:, :, None] * minimum.astype(jnp.float32).T[:, None, :]
        terms = terms + mx
    return jnp.sum(terms, axis=0)


# ----------------------------------------------------------------- decode attention


def _attention_check(q, k_cache, v_cache, lo, hi, scale, fn: str):
    """Validates :func:`decode_attention`'s operands; returns (lo, hi) as int32 and
    the scale as a float."""
    for name, a in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("lo", lo), ("hi", hi)):
        if not hasattr(a, "shape") or not hasattr(a, "dtype"):
            raise ValueError(
                f"{fn}: {name} must be an array, got {type(a).__name__}; wrap it with "
                "jnp.asarray(...)."
            )
    if q.ndim != 3 or jnp.dtype(q.dtype) != jnp.float32:
        raise ValueError(
            f"{fn}: q must be float32 (B, H, D) (the new token's queries), got {_describe(q)}; "
            "reshape to (batch, heads, head_dim) and cast with q.astype(jnp.float32)."
        )
    b, h, d = q.shape
    if k_cache.ndim != 4 or jnp.dtype(k_cache.dtype) not in (jnp.float32, jnp.float16):
        raise ValueError(
            f"{fn}: k_cache must be float32 or float16 (B, KVH, S, D), got "
            f"{_describe(k_cache)}; cast the cache with .astype(jnp.float16) or "
            ".astype(jnp.float32) and lay it out as (batch, kv_heads, slots, head_dim)."
        )
    kb, kvh, _, kd = k_cache.shape
    if kb != b or kd != d:
        raise ValueError(
            f"{fn}: k_cache {_describe(k_cache)} does not match q {_describe(q)}: it must "
            f"have the batch B={b} and head_dim D={d} of q, as (B, KVH, S, D)."
        )
    if kvh == 0 or h % kvh:
        raise ValueError(
            f"{fn}: q has H={h} heads, which is not a multiple of k_cache's KVH={kvh} kv "
            "heads (axis 1); grouped-query attention needs H % KVH == 0 (query head i reads "
            "kv head i // (H // KVH))."
        )
    if tuple(v_cache.shape) != tuple(k_cache.shape) or v_cache.dtype != k_cache.dtype:
        raise ValueError(
            f"{fn}: v_cache must have k_cache's shape and dtype {_describe(k_cache)}, got "
            f"{_describe(v_cache)}; keep both caches in one layout and dtype."
        )
    out = []
    for name, a in (("lo", lo), ("hi", hi)):
        if not jnp.issubdtype(a.dtype, jnp.integer) or tuple(a.shape) != (b,):
            raise ValueError(
                f"{fn}: {name} must be an integer array of shape (B,) = ({b},) (one "
                f"{'first' if name == 'lo' else 'end'} visible slot per sequence), got "
                f"{_describe(a)}; pass e.g. jnp.full(({b},), value, jnp.int32)."
            )
        out.append(a.astype(jnp.int32))
    if isinstance(scale, jax.core.Tracer) or not np.isscalar(scale) or not np.isreal(scale):
        raise ValueError(
            f"{fn}: scale must be a Python float known at trace time (e.g. "
            f"1 / head_dim ** 0.5), got {type(scale).__name__}; fold a traced scale into q."
        )
    return out[0], out[1], float(scale)


def decode_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lo: jax.Array,
    hi: jax.Array,
    *,
    scale: float,
) -> jax.Array:
    """One new token's attention over a KV cache, reading only its visible slots.

    ``out[b, h] = softmax(scale * k[b, j, s] . q[b, h]) @ v[b, j, s]`` over the slots
    ``lo[b] <= s < hi[b]``, with ``j = h // (H // KVH)`` (grouped-query attention;
    ``H == KVH`` is multi-head). The native kernel (``gguf_gemv.cc``; AVX2, FMA,
    F16C) reads only those slots, so a cache allocated to its maximum length costs
    what its filled part does. Softmax with the maximum subtracted, float32 sums;
    a sequence with no visible slot gets zeros. Works under ``jit`` with ``lo`` and
    ``hi`` traced (a new length each step compiles nothing); under ``vmap`` it
    loops. Threads: :func:`gguf_num_threads` (over the (b, kv head) pairs; the
    result does not depend on their number). Speed against XLA's einsums:
    ``benchmarks/gguf_gemv.py``.

    Args:
      q: float32 (B, H, D), the new token's queries.
      k_cache: float32 or float16 (B, KVH, S, D), with H a multiple of KVH.
      v_cache: like ``k_cache`` (same shape and dtype).
      lo: integer (B,), each sequence's first visible slot (left padding).
      hi: integer (B,), one past each sequence's last visible slot. Both are
        clipped to [0, S]; ``hi <= lo`` means no slot is visible.
      scale: the scores' factor, a Python float (usually ``D ** -0.5``).

    Returns:
      float32 (B, H, D).

    Raises:
      ValueError: a dtype, shape or scale the kernel does not take (the message
        names the operand and what it must be).
      RuntimeError: the kernel is not available here (:func:`gguf_status`).

    Example:
        >>> import jax.numpy as jnp
        >>> from jqx.kernels.cpu import native
        >>> q = jnp.ones((1, 2, 4), jnp.float32)
        >>> k = jnp.zeros((1, 1, 8, 4), jnp.float16)  # equal scores: the mean of v
        >>> v = jnp.arange(32, dtype=jnp.float16).reshape(1, 1, 8, 4)
        >>> lo, hi = jnp.array([2], jnp.int32), jnp.array([4], jnp.int32)
        >>> f = native.decode_attention if native.gguf_available() else (
        ...     native.decode_attention_reference)
        >>> f(q, k, v, lo, hi, scale=0.5)[0].tolist()
        [[10.0, 11.0, 12.0, 13.0], [10.0, 11.0, 12.0, 13.0]]
    """
    lo, hi, scale = _attention_check(q, k_cache, v_cache, lo, hi, scale, "decode_attention")
    if not gguf_available():
        raise RuntimeError(f"the native attention kernel is not available: {gguf_status()}")
    return jax.ffi.ffi_call(
        ATTENTION_TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32), vmap_method="sequential"
    )(q, k_cache, v_cache, lo, hi, scale=np.float32(scale))


def decode_attention_reference(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lo: jax.Array,
    hi: jax.Array,
    *,
    scale: float,
) -> jax.Array:
    """Plain-jnp :func:`decode_attention`: XLA's einsums over the whole cache with
    the invisible slots masked out (so it reads all S slots), float32 at HIGHEST
    precision. Same operands and errors; runs anywhere.

    Example:
        >>> import jax.numpy as jnp
        >>> from jqx.kernels.cpu import native
        >>> q = jnp.ones((1, 1, 2), jnp.float32)
        >>> k = jnp.zeros((1, 1, 3, 2), jnp.float32)
        >>> v = jnp.arange(6, dtype=jnp.float32).reshape(1, 1, 3, 2)
        >>> native.decode_attention_reference(q, k, v, jnp.array([0]), jnp.array([2]),
        ...                                   scale=1.0).tolist()
        [[[1.0, 2.0]]]
        >>> native.decode_attention_reference(q, k, v, jnp.array([1]), jnp.array([1]),
        ...                                   scale=1.0).tolist()  # nothing visible
        [[[0.0, 0.0]]]
    """
    lo, hi, scale = _attention_check(
        q, k_cache, v_cache, lo, hi, scale, "decode_attention_reference"
    )
    b, h, d = q.shape
    kvh, s = k_cache.shape[1], k_cache.shape[2]
    hp = lax.Precision.HIGHEST
    qg = q.reshape(b, kvh, h // kvh, d)
    scores = jnp.einsum("bkgd,bksd->bkgs", qg, k_cache.astype(jnp.float32), precision=hp)
    pos = jnp.arange(s, dtype=jnp.int32)
    visible = ((pos >= lo[:, None]) & (pos < hi[:, None]))[:, None, None, :]
    scores = jnp.where(visible, scores * jnp.float32(scale), -jnp.inf)
    top = jnp.max(scores, axis=-1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)  # no visible slot: avoid -inf - -inf
    p = jnp.where(visible, jnp.exp(scores - top), 0.0)
    total = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bkgs,bksd->bkgd", p, v_cache.astype(jnp.float32), precision=hp)
    return (out / jnp.where(total > 0, total, 1.0)).reshape(b, h, d)


# ----------------------------------------------------------------- float32 GEMM


def f32_matmul(
    a: jax.Array, b: jax.Array, bias: jax.Array | None = None, activation: str | None = None
) -> jax.Array:
    """``a @ b`` in float32 on the native AVX512 GEMM (``f32_gemm.h``), optionally with a
    dense layer's bias and activation applied to each output block while it is in cache.

    ``a`` is (rows..., K) and ``b`` (K, N); the result is (rows..., N). Each output is
    one fused multiply-add chain over ``k = 0..K-1`` starting from 0, an order fixed by
    the shapes alone (the same bits for any thread count), so the result is within the
    sequential sum's bound ``gamma_K sum_k |a[m, k] b[k, n]|`` (``gamma_K = K u / (1 - K
    u)``, ``u = 2^-24``) of the exact product, as XLA's dot is; it is not XLA's bits
    (XLA's order depends on the shape). NaN and infinities propagate as in any sum.
    Register blocks of 14 rows x 32 columns; from 256 rows ``b`` is packed into
    32-column panels once per call (below, read in place, or packed per chunk at large
    N), ``a``'s rows are copied per block (docs/internals/native-kernels.md). Threads:
    :func:`pool_threads`, over chunks of rows or of columns.
    ``jqx.ops.float_dot_general`` (``jqx.quantized`` on float32 products) picks this or
    XLA (docs/internals/dispatch.md). Under ``jax.vmap`` it stays one call: a mapped
    ``a`` alone joins its rows; a mapped ``b`` (or bias) runs one product per index.

    The epilogue, on each product ``c`` (the bits above): with ``bias``, ``f = c +
    bias[n]``, one float32 add (XLA's ``c + bias``, bit for bit); with ``activation=
    "gelu"``, ``(0.5 f) * erfc((-f) * 0.70710677)``, ``jax.nn.gelu(f, approximate=False)``
    as jax traces it, each multiply rounded as there and erfc Cephes' float erfc (with
    ``exp(-x^2)`` carried to about 1 ulp, and a fit of its own on [0.5, 1)): within 8
    ulps of the exact erfc of its float argument where that is at least ``2^-100``
    (docs/internals/native-kernels.md), not XLA's bits; with
    ``activation="gelu_tanh"``, ``jax.nn.gelu(f)``'s tanh form as jax traces it, each
    operation rounded as there and tanh Cephes' float tanh, within 2 ulps of the exact
    tanh of its float argument; with ``activation="relu"``,
    ``jax.nn.relu(f)`` bit for bit (``f`` where ``f > 0`` or NaN, else +0). Either way
    no second pass over the output is made.

    Args:
      a: float32 (rows..., K), at least 2-D.
      b: float32 (K, N).
      bias: None, or float32 (N,): added to every row.
      activation: None, ``"gelu"`` (the exact, erf form), ``"gelu_tanh"`` or ``"relu"``.

    Returns:
      float32 (rows..., N).

    Raises:
      ValueError: a dtype, shape or activation the kernel does not take (the message
        names it).
      RuntimeError: the kernel is not available here (:func:`status` says why).

    Example:
        >>> import jax.numpy as jnp
        >>> from jqx.kernels.cpu import native
        >>> a = jnp.arange(6, dtype=jnp.float32).reshape(2, 3)
        >>> b = jnp.ones((3, 2), jnp.float32)
        >>> (native.f32_matmul(a, b) if native.available() else a @ b).tolist()
        [[3.0, 3.0], [12.0, 12.0]]
    """
    _check_float32("f32_matmul", "a", a)
    _check_float32("f32_matmul", "b", b)
    if a.ndim < 2 or b.ndim != 2 or a.shape[-1] != b.shape[0]:
        raise ValueError(
            f"f32_matmul: a {tuple(a.shape)} and b {tuple(b.shape)} do not fit: a is "
            "(rows..., K), at least 2-D, and b (K, N) with the same K; reshape the "
            "operands (jqx.ops.float_dot_general takes any dimension numbers)."
        )
    bias, act = _epilogue_args("f32_matmul", bias, b.shape[1], activation)
    if not available():
        raise RuntimeError(f"the native float32 GEMM is not available: {status()}")
    out = jax.ShapeDtypeStruct((*a.shape[:-1], b.shape[1]), jnp.float32)
    # Under vmap each operand gets the mapped axes in front (1 where not mapped): the
    # kernel broadcasts them.
    return jax.ffi.ffi_call(F32_TARGET, out, vmap_method="expand_dims")(
        a, b, bias, threads=np.int64(_threads()), activation=act
    )


def f32_mlp(
    x: jax.Array,
    w1: jax.Array,
    w2: jax.Array,
    *,
    bias1: jax.Array | None = None,
    activation: str | None = None,
    bias2: jax.Array | None = None,
) -> jax.Array:
    """Two float32 dense layers in one call: ``f32_matmul(f32_matmul(x, w1, bias1,
    activation), w2, bias2)``, bit for bit (``f32_gemm.h``'s ``jqx_f32_mlp``).

    Both weights are packed once per call; each chunk of 56 rows then runs both
    products on one thread, its hidden rows (F floats each) in a per-thread buffer, in
    cache. Every output is the same fused multiply-add chain over k as
    :func:`f32_matmul`'s, so the result is the same bits; the hidden activations are
    never written to memory XLA allocates. Needs :func:`available`.

    Args:
      x: float32 (M, K).
      w1: float32 (K, F), F > 0.
      w2: float32 (F, N).
      bias1, activation: the first layer's epilogue (as :func:`f32_matmul`'s).
      bias2: None, or float32 (N,).

    Returns:
      float32 (M, N).

    Raises:
      ValueError: a dtype, shape or activation the kernel does not take (named).
      RuntimeError: the kernel is not available here (:func:`status`).

    Example:
        >>> import jax.numpy as jnp
        >>> from jqx.kernels.cpu import native
        >>> x, w1, w2 = jnp.ones((2, 3)), jnp.ones((3, 4)), jnp.ones((4, 1))
        >>> y = native.f32_mlp(x, w1, w2) if native.available() else (x @ w1) @ w2
        >>> y.tolist()
        [[12.0], [12.0]]
    """
    fn = "f32_mlp"
    for name, a in (("x", x), ("w1", w1), ("w2", w2)):
        _check_float32(fn, name, a)
    if x.ndim != 2 or w1.ndim != 2 or w2.ndim != 2 or x.shape[1] != w1.shape[0]:
        raise ValueError(
            f"{fn}: x {tuple(x.shape)}, w1 {tuple(w1.shape)} and w2 {tuple(w2.shape)} must "
            "be (M, K), (K, F) and (F, N); reshape the rows to 2-D."
        )
    if w2.shape[0] != w1.shape[1] or w1.shape[1] == 0:
        raise ValueError(
            f"{fn}: w2 {tuple(w2.shape)} must be (F, N) for w1's F={w1.shape[1]}, and F > 0 "
            "(an empty hidden layer: run f32_matmul twice)."
        )
    e1, code = _epilogue_args(fn, bias1, w1.shape[1], activation)
    e2, _ = _epilogue_args(fn, bias2, w2.shape[1], None)
    if not available():
        raise RuntimeError(f"the native float32 GEMM is not available: {status()}")
    out = jax.ShapeDtypeStruct((x.shape[0], w2.shape[1]), jnp.float32)
    return jax.ffi.ffi_call(F32_MLP_TARGET, out, vmap_method="sequential")(
        x, w1, e1, w2, e2, threads=np.int64(_threads()), activation=code
    )


# ----------------------------------------------------------------- softmax, then matmul


def _softmax_dot_check(s, v, fn: str) -> None:
    for name, a in (("s", s), ("v", v)):
        if getattr(a, "ndim", None) != 3 or jnp.dtype(a.dtype) != jnp.float32:
            raise ValueError(
                f"{fn}: {name} must be a float32 3-D array, got "
                f"{getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}; "
                "give s as (G, Q, K) and v as (G, K, D) float32 (batch dims flattened into G)."
            )
    if v.shape[0] != s.shape[0] or v.shape[1] != s.shape[2]:
        raise ValueError(
            f"{fn}: s {tuple(s.shape)} and v {tuple(v.shape)} do not agree: s is (G, Q, K) "
            "and v (G, K, D), with the same G and K."
        )


def softmax_dot(s: jax.Array, v: jax.Array, *, isa: str | None = None) -> jax.Array:
    """``jax.nn.softmax(s, axis=-1) @ v`` per batch ``g``, in one pass.

    ``y[g, q] = (sum_k e[g, q, k] v[g, k]) / sum_k e[g, q, k]`` with ``e = exp(s - max_k
    s)``: attention's softmax and its product with the values. The native kernel
    (``softmax_dot.h``: AVX512 in ``int8_gemm.cc``'s library where that one runs, else
    AVX2 and FMA in ``gguf_gemv.cc``'s) writes neither the shifted scores nor the
    probabilities: each row's maximum and exps stay in cache, register tiles multiply
    the exps into ``v`` and divide by the row's sum. Numerics: ``s - max`` is the one
    subtraction ``jax.nn.softmax`` makes (the same bits); exp to about 1 ulp (shifted
    scores below -87, where exp is under 1.7e-38 beside a largest term of 1, count as
    0: masked keys get no weight); float32 sums; one FMA chain over k per output. A
    NaN or +inf in a row, or a row of -inf, gives NaN outputs for the row, as
    ``jax.nn.softmax`` does. Within ``(2K + 8) u max|v|`` of the exact value from the
    same shifted scores (``u = 2^-24``), as XLA's ``(exp(s - max) @ v) / sum``
    (docs/guide/run.md#attention). Threads: :func:`gguf_num_threads`, over chunks of
    rows (the result does not depend on their number). ``jqx.ops.attention.softmax_dot``
    takes any layout and picks this kernel or XLA. Under ``jax.vmap`` it stays one
    call (the mapped axis joins ``G``).

    Args:
      s: float32 (G, Q, K), the scores (a softmax over the last axis).
      v: float32 (G, K, D).
      isa: None (AVX512 where :func:`available`, else AVX2), ``"avx512"`` or ``"avx2"``.
        The two compute each output's product the same way and add a row's exps in
        another order.

    Returns:
      float32 (G, Q, D).

    Raises:
      ValueError: a dtype or shape the kernel does not take, or an unknown ``isa``
        (the message names it).
      RuntimeError: the kernel is not available here (:func:`gguf_status`, or
        :func:`status` for ``isa="avx512"``).

    Example:
        >>> import jax.numpy as jnp
        >>> from jqx.kernels.cpu import native
        >>> s = jnp.full((1, 2, 4), 3.0)  # equal scores: the mean of v's rows
        >>> v = jnp.arange(8, dtype=jnp.float32).reshape(1, 4, 2)
        >>> f = native.softmax_dot if native.gguf_available() else native.softmax_dot_reference
        >>> f(s, v)[0].tolist()
        [[3.0, 4.0], [3.0, 4.0]]
    """
    _softmax_dot_check(s, v, "softmax_dot")
    if isa not in (None, "avx512", "avx2"):
        raise ValueError(f"softmax_dot: isa={isa!r} must be None, 'avx512' or 'avx2'.")
    if isa == "avx512" or (isa is None and available()):
        target, name, why = SOFTMAX_DOT_AVX512_TARGET, "AVX512", None if available() else status()
    else:
        target, name = SOFTMAX_DOT_TARGET, "AVX2"
        why = None if gguf_available() else gguf_status()
    if why is not None:
        raise RuntimeError(f"the native softmax_dot kernel ({name}) is not available: {why}")
    g, q, _ = s.shape
    out = jax.ShapeDtypeStruct((g, q, v.shape[2]), jnp.float32)
    # Under vmap the kernel takes the batch axis as more leading dims: one call.
    return jax.ffi.ffi_call(target, out, vmap_method="broadcast_all")(s, v)


def softmax_dot_reference(s: jax.Array, v: jax.Array) -> jax.Array:
    """Plain-jnp :func:`softmax_dot`: ``(exp(s - max) @ v) / sum`` on XLA, float32 at
    HIGHEST precision. Same operands and errors; runs anywhere.

    Example:
        >>> import jax.numpy as jnp
        >>> from jqx.kernels.cpu import native
        >>> s = jnp.array([[[0.0, -jnp.inf]]])  # the second key masked out
        >>> native.softmax_dot_reference(s, jnp.array([[[1.0], [5.0]]])).tolist()
        [[[1.0]]]
    """
    _softmax_dot_check(s, v, "softmax_dot_reference")
    e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True, initial=-jnp.inf))
    y = jnp.einsum("gqk,gkd->gqd", e, v, precision=lax.Precision.HIGHEST)
    return y / jnp.sum(e, axis=-1, keepdims=True)


SCORE_STEPS = ("mul", "div", "add", "where")  # scores_softmax_dot's elementwise steps
_STEP_CODES = {"mul": 1, "div": 2, "add": 3, "where": 4}
_AT_MAX_BATCH = 4


def _nonzero(a: jax.Array) -> jax.Array:
    """``a != 0`` as bool, as ``jnp.where`` reads a mask (no dtype promotion)."""
    return a != jnp.zeros((), a.dtype)


def _row_major_strides(shape) -> list[int]:
    st, acc = [], 1
    for n in reversed(shape):
        st.append(acc)
        acc *= n
    return st[::-1]


def _check_axes(fn, name, a, axes, nb) -> None:
    if (
        len(axes) != nb + 2
        or sorted(axes) != list(range(a.ndim))
        or any(not isinstance(x, (int, np.integer)) for x in axes)
    ):
        raise ValueError(
            f"{fn}: {name}_axes={tuple(axes)!r} must name each of {name}'s {a.ndim} axes once, "
            f"as (batch axes ({nb}), row axis, column axis)."
        )


def _score_steps(fn, steps, scale, bias, mask) -> list[str]:
    steps = list(steps)
    if any(x not in SCORE_STEPS for x in steps) or len(set(steps)) != len(steps):
        raise ValueError(f"{fn}: steps={tuple(steps)!r} must be distinct names from {SCORE_STEPS}.")
    if "mul" in steps and "div" in steps:
        raise ValueError(f"{fn}: steps={tuple(steps)!r} has both 'mul' and 'div'; give one.")
    for name, val, step in (("scale", scale, ("mul", "div")), ("bias", bias, ("add",))):
        if (val is not None) != any(x in step for x in steps):
            raise ValueError(
                f"{fn}: {name} is {'given' if val is not None else 'missing'} but steps "
                f"{tuple(steps)!r} {'do not use' if val is not None else 'need'} it."
            )
    if (mask is not None) != ("where" in steps):
        raise ValueError(f"{fn}: give mask exactly when steps has 'where'.")
    return steps


def scores_softmax_dot(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_axes,
    k_axes,
    v_axes,
    *,
    steps=(),
    scale=None,
    bias=None,
    mask=None,
    fill: float = 0.0,
    isa: str | None = None,
) -> jax.Array:
    """Attention from q and k in one pass, the scores never written:
    ``softmax(steps(q k^T)) @ v`` per batch index, over float32 operands in any layout.

    For each batch index ``g`` and query row ``i``: ``s[i, j] = sum_d q[g, i, d] k[g, j,
    d]`` as one fused multiply-add chain over ``d`` from 0 (within ``gamma_D sum_d |q
    k|``, the bound of XLA's dot), then ``steps`` in order, each the one float32
    operation XLA would make: ``"mul"`` ``s * scale``, ``"div"`` ``s / scale``, ``"add"``
    ``s + bias``, ``"where"`` ``where(mask != 0, s, fill)``; then softmax and product
    with ``v`` exactly as :func:`softmax_dot` (within ``(2 Tk + 8) u max|v|`` of the
    exact value from the same shifted scores). ``*_axes`` say which axes of each operand
    are (batch axes..., row, column): the kernel reads them through strides, so the
    program's layouts (e.g. ``(b, t, h, d)`` projections) need no transposes.
    ``jqx.quantized`` runs this for attention written ``softmax(q @ k^T ...) @ v``
    (``jqx.ops.attention.scores_softmax_dot`` decides; docs/guide/run.md#attention).

    Args:
      q: float32, axes ``q_axes`` = (batch axes, query axis, d axis).
      k: float32, axes ``k_axes`` = (batch axes, key axis, d axis).
      v: float32, axes ``v_axes`` = (batch axes, key axis, value axis).
      q_axes, k_axes, v_axes: the axis maps (at most 4 batch axes, the same sizes or 1:
        an operand's batch axis of size 1 is read for every index of the others', as
        grouped-query attention's keys and values are for the group's queries).
      steps: names from ``SCORE_STEPS``, in the program's order.
      scale: a float32 scalar (array or number) for ``"mul"`` / ``"div"``.
      bias: float32, the scores' rank (batch..., query, key), each dim its size or 1.
      mask: the same for ``"where"`` (any dtype; nonzero keeps the score).
      fill: the score where the mask is 0.
      isa: None (AVX512 where :func:`available`, else AVX2), ``"avx512"`` or ``"avx2"``.

    Returns:
      float32 (batch..., query, value).

    Raises:
      ValueError: dtypes, shapes, axes or steps that do not fit (the message names them).
      RuntimeError: the kernel is not available here.

    Example:
        >>> import jax.numpy as jnp
        >>> from jqx.kernels.cpu import native
        >>> q = jnp.zeros((1, 2, 4)); k = jnp.ones((1, 3, 4))  # equal scores
        >>> v = jnp.arange(6, dtype=jnp.float32).reshape(1, 3, 2)
        >>> ax = (0, 1, 2)
        >>> f = native.scores_softmax_dot if native.gguf_available() else (
        ...     native.scores_softmax_dot_reference)
        >>> f(q, k, v, ax, ax, ax)[0].tolist()
        [[2.0, 3.0], [2.0, 3.0]]
    """
    fn = "scores_softmax_dot"
    nb, (bsz, tq, tk, d, dv) = _scores_check(fn, q, k, v, q_axes, k_axes, v_axes)
    steps = _score_steps(fn, steps, scale, bias, mask)
    if isa not in (None, "avx512", "avx2"):
        raise ValueError(f"{fn}: isa={isa!r} must be None, 'avx512' or 'avx2'.")
    if isa == "avx512" or (isa is None and available()):
        target, name = SCORES_SOFTMAX_DOT_AVX512_TARGET, "AVX512"
        why = None if available() else status()
    else:
        target, name = SCORES_SOFTMAX_DOT_TARGET, "AVX2"
        why = None if gguf_available() else gguf_status()
    if why is not None:
        raise RuntimeError(f"the native scores_softmax_dot kernel ({name}) is not available: {why}")
    s_shape = (*bsz, tq, tk)
    extra = {}
    for nm, a in (("bias", bias), ("mask", mask)):
        if a is None:
            extra[nm] = (jnp.zeros((0,), jnp.float32), [0] * (nb + 2))
            continue
        a = jnp.asarray(a)
        if a.ndim != nb + 2 or any(x not in (1, n) for x, n in zip(a.shape, s_shape, strict=True)):
            raise ValueError(
                f"{fn}: {nm} {tuple(a.shape)} does not broadcast to the scores {s_shape}: "
                "give it the scores' rank, each dim its size or 1."
            )
        if nm == "bias" and jnp.dtype(a.dtype) != jnp.float32:
            raise ValueError(f"{fn}: bias must be float32, got {a.dtype}.")
        if nm == "mask":
            a = _nonzero(a).astype(jnp.float32)
        st = _row_major_strides(a.shape)
        extra[nm] = (a, [0 if a.shape[i] == 1 else st[i] for i in range(nb + 2)])
    if scale is None:
        sc = jnp.zeros((0,), jnp.float32)
    else:
        sc = jnp.asarray(scale)
        if sc.shape != () or jnp.dtype(sc.dtype) != jnp.float32:
            raise ValueError(f"{fn}: scale must be a float32 scalar, got {_describe(sc)}.")
        sc = sc.reshape(1)
    # y's buffer: (batch0, query, other batch axes..., value) with two or more batch axes
    # (the (b, q, h, d) order attention's output takes next), else (batch..., query, value).
    canon = (*bsz, tq, dv)
    layout = (0, nb, *range(1, nb), nb + 1) if nb >= 2 else tuple(range(nb + 2))
    phys = tuple(canon[a] for a in layout)
    pst = _row_major_strides(phys)
    y_st = [0] * (nb + 2)
    for pos, a in enumerate(layout):
        y_st[a] = pst[pos]
    strides = []
    for a, axes in ((q, q_axes), (k, k_axes), (v, v_axes)):
        st = _row_major_strides(a.shape)
        # A batch axis of size 1 where another operand's is larger is read at stride 0.
        strides += [0 if i < nb and a.shape[x] == 1 else st[x] for i, x in enumerate(axes)]
    strides += extra["bias"][1] + extra["mask"][1] + y_st
    out = jax.ShapeDtypeStruct(phys, jnp.float32)
    y = jax.ffi.ffi_call(target, out, vmap_method="sequential")(
        q,
        k,
        v,
        extra["bias"][0],
        extra["mask"][0],
        sc,
        dims=np.array([nb, *bsz, tq, tk, d, dv], np.int64),
        strides=np.array(strides, np.int64),
        ops=np.array([_STEP_CODES[x] for x in steps], np.int64),
        fill=np.float32(fill),
    )
    inverse = tuple(layout.index(a) for a in range(nb + 2))
    return jnp.transpose(y, inverse) if inverse != tuple(range(nb + 2)) else y


def _scores_check(fn, q, k, v, q_axes, k_axes, v_axes):
    for name, a in (("q", q), ("k", k), ("v", v)):
        if not (hasattr(a, "shape") and hasattr(a, "dtype")) or jnp.dtype(a.dtype) != jnp.float32:
            got = _describe(a) if hasattr(a, "dtype") else type(a).__name__
            raise ValueError(
                f"{fn}: {name} must be a float32 array, got {got}; cast it with "
                ".astype(jnp.float32)."
            )
    nb = q.ndim - 2
    if nb < 0 or nb > _AT_MAX_BATCH:
        raise ValueError(
            f"{fn}: q has {q.ndim} axes; it takes 2 to {_AT_MAX_BATCH + 2} (batch axes, row, "
            "column): merge batch axes with a reshape."
        )
    for name, a, axes in (("q", q, q_axes), ("k", k, k_axes), ("v", v, v_axes)):
        _check_axes(fn, name, a, tuple(axes), nb)
    qs = [q.shape[x] for x in q_axes]
    ks = [k.shape[x] for x in k_axes]
    vs = [v.shape[x] for x in v_axes]
    bsz = tuple(max(sizes) for sizes in zip(qs[:nb], ks[:nb], vs[:nb], strict=True))
    broadcast = all(n in (1, b) for x in (qs, ks, vs) for n, b in zip(x[:nb], bsz, strict=True))
    if not broadcast or qs[-1] != ks[-1] or ks[-2] != vs[-2]:
        raise ValueError(
            f"{fn}: q {tuple(qs)}, k {tuple(ks)} and v {tuple(vs)} (in axes order) do not "
            "agree: the same batch sizes (or 1, broadcast), q and k the same d, k and v "
            "the same keys."
        )
    return nb, (bsz, qs[-2], ks[-2], qs[-1], vs[-1])


def scores_softmax_dot_reference(
    q, k, v, q_axes, k_axes, v_axes, *, steps=(), scale=None, bias=None, mask=None, fill=0.0
) -> jax.Array:
    """Plain-jnp :func:`scores_softmax_dot` on XLA (float32, HIGHEST precision): the
    scores, the steps, then ``(exp(s - max) @ v) / sum``. Same operands and errors;
    runs anywhere."""
    fn = "scores_softmax_dot_reference"
    nb, (bsz, *_) = _scores_check(fn, q, k, v, q_axes, k_axes, v_axes)
    steps = _score_steps(fn, steps, scale, bias, mask)
    qc, kc, vc = (
        jnp.broadcast_to(jnp.transpose(a, tuple(ax)), (*bsz, *(a.shape[x] for x in ax[nb:])))
        for a, ax in ((q, q_axes), (k, k_axes), (v, v_axes))
    )
    b = tuple(range(nb))
    hi = lax.Precision.HIGHEST
    s = lax.dot_general(qc, kc, (((nb + 1,), (nb + 1,)), (b, b)), precision=hi)
    for x in steps:
        if x == "mul":
            s = s * jnp.asarray(scale, jnp.float32)
        elif x == "div":
            s = s / jnp.asarray(scale, jnp.float32)
        elif x == "add":
            s = s + bias
        else:
            s = jnp.where(_nonzero(jnp.asarray(mask)), s, jnp.float32(fill))
    e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True, initial=-jnp.inf))
    y = lax.dot_general(e, vc, (((nb + 1,), (nb,)), (b, b)), precision=hi)
    return y / jnp.sum(e, axis=-1, keepdims=True)


# ----------------------------------------------------------------- quantized KV cache


def _quantized_cache_check(q, k_codes, k_scale, v_codes, v_scale, fn: str) -> str:
    """Validates the quantized cache operands; returns ``"int8"`` or ``"fp8"``."""
    for name, a in (
        ("k_codes", k_codes),
        ("k_scale", k_scale),
        ("v_codes", v_codes),
        ("v_scale", v_scale),
    ):
        if not hasattr(a, "shape") or not hasattr(a, "dtype"):
            raise ValueError(
                f"{fn}: {name} must be an array, got {type(a).__name__}; wrap it with "
                "jnp.asarray(...)."
            )
    kind = {jnp.dtype(jnp.int8): "int8", jnp.dtype(jnp.uint8): "fp8"}.get(jnp.dtype(k_codes.dtype))
    if kind is None or k_codes.ndim != 4:
        raise ValueError(
            f"{fn}: k_codes must be int8, or uint8 holding float8_e4m3fn bits, (B, KVH, S, "
            f"D), got {_describe(k_codes)}; an int4 cache has its own kernel, decode_attention_int4."
        )
    b, kvh, s, _ = k_codes.shape
    want = (
        ((b, kvh, s), jnp.dtype(jnp.float16), "float16 (B, KVH, S): one scale per slot")
        if kind == "int8"
        else ((b, kvh), jnp.dtype(jnp.float32), "float32 (B, KVH): one scale per kv head")
    )
    for name, a in (("k_scale", k_scale), ("v_scale", v_scale)):
        if tuple(a.shape) != want[0] or jnp.dtype(a.dtype) != want[1]:
            raise ValueError(
                f"{fn}: {name} of a {kind} cache must be {want[2]} = {want[0]}, got {_describe(a)}."
            )
    if tuple(v_codes.shape) != tuple(k_codes.shape) or v_codes.dtype != k_codes.dtype:
        raise ValueError(
            f"{fn}: v_codes must have k_codes' shape and dtype {_describe(k_codes)}, got "
            f"{_describe(v_codes)}; keep keys and values in one format."
        )
    return kind


def decode_attention_quantized(
    q: jax.Array,
    k_codes: jax.Array,
    k_scale: jax.Array,
    v_codes: jax.Array,
    v_scale: jax.Array,
    lo: jax.Array,
    hi: jax.Array,
    *,
    scale: float,
) -> jax.Array:
    """:func:`decode_attention` over a quantized KV cache, read in place.

    int8: codes (B, KVH, S, D) with one float16 scale per slot (B, KVH, S); fp8:
    float8_e4m3fn codes, their bits stored as uint8 (B, KVH, S, D), with one float32
    scale per kv head (B, KVH). The key scales
    multiply the scores, the value scales the softmax weights, so no float copy of the
    cache is formed; only the visible slots are read. Same threads, parts and
    guarantees as :func:`decode_attention`.

    Raises:
      ValueError: a dtype or shape the kernel does not take (named).
      RuntimeError: the kernel is not available here (:func:`gguf_status`).

    Example:
        >>> import jax.numpy as jnp
        >>> from jqx.kernels.cpu import native
        >>> q = jnp.ones((1, 2, 4), jnp.float32)
        >>> c = jnp.ones((1, 1, 8, 4), jnp.int8)
        >>> s = jnp.full((1, 1, 8), 0.5, jnp.float16)
        >>> f = native.decode_attention_quantized if native.gguf_available() else (
        ...     native.decode_attention_quantized_reference)
        >>> f(q, c, s, c, s, jnp.array([0]), jnp.array([3]), scale=0.5)[0, 0].tolist()
        [0.5, 0.5, 0.5, 0.5]
    """
    _quantized_cache_check(q, k_codes, k_scale, v_codes, v_scale, "decode_attention_quantized")
    lo, hi, scale = _attention_check_codes(q, k_codes, lo, hi, scale)
    if not gguf_available():
        raise RuntimeError(f"the native attention kernel is not available: {gguf_status()}")
    return jax.ffi.ffi_call(
        ATTENTION_Q_TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32), vmap_method="sequential"
    )(q, k_codes, k_scale, v_codes, v_scale, lo, hi, scale=np.float32(scale))


def _attention_check_codes(q, k_codes, lo, hi, scale):
    """:func:`_attention_check` for codes: the same q, lo, hi and scale rules, with a
    float stand-in of the codes' shape (nothing is computed)."""
    stand_in = jax.ShapeDtypeStruct(k_codes.shape, jnp.float16)
    return _attention_check(q, stand_in, stand_in, lo, hi, scale, "decode_attention_quantized")


def decode_attention_quantized_reference(
    q: jax.Array,
    k_codes: jax.Array,
    k_scale: jax.Array,
    v_codes: jax.Array,
    v_scale: jax.Array,
    lo: jax.Array,
    hi: jax.Array,
    *,
    scale: float,
) -> jax.Array:
    """Plain-jnp :func:`decode_attention_quantized`: the cache dequantized to float32,
    then :func:`decode_attention_reference`. Same operands and errors; runs anywhere.

    Example:
        >>> import jax.numpy as jnp
        >>> from jqx.kernels.cpu import native
        >>> c = jnp.full((1, 1, 2, 2), 2, jnp.int8)
        >>> s = jnp.full((1, 1, 2), 0.25, jnp.float16)
        >>> native.decode_attention_quantized_reference(
        ...     jnp.ones((1, 1, 2)), c, s, c, s, jnp.array([0]), jnp.array([2]), scale=1.0
        ... ).tolist()
        [[[0.5, 0.5]]]
    """
    kind = _quantized_cache_check(
        q, k_codes, k_scale, v_codes, v_scale, "decode_attention_quantized_reference"
    )

    def deq(c, s):
        s = s.astype(jnp.float32)
        if kind == "int8":
            return c.astype(jnp.float32) * s[..., None]
        return (
            lax.bitcast_convert_type(c, jnp.float8_e4m3fn).astype(jnp.float32) * s[..., None, None]
        )

    return decode_attention_reference(
        q, deq(k_codes, k_scale), deq(v_codes, v_scale), lo, hi, scale=scale
    )


# ----------------------------------------------------------------- 4-bit (KIVI) KV cache


def _int4_cache_check(q, k, v, fn: str) -> int:
    """Validates the int4 cache operands ``k`` and ``v`` (each ``(codes, scale, zero,
    residual)``); returns the group size (the residual window's rows)."""
    names = ("codes", "scale", "zero", "residual")
    if v[3] is None:  # values kept without a window: every slot from the codes
        v = v[:3]
    for role, arrays in (("k", k), ("v", v)):
        for name, a in zip(names, arrays, strict=False):
            if not hasattr(a, "shape") or not hasattr(a, "dtype"):
                raise ValueError(
                    f"{fn}: {role}_{name} must be an array, got {type(a).__name__}; wrap it "
                    "with jnp.asarray(...)."
                )
    if q.ndim != 3 or jnp.dtype(q.dtype) != jnp.float32:
        raise ValueError(
            f"{fn}: q must be float32 (B, H, D) (the new token's queries), got {_describe(q)}; "
            "reshape to (batch, heads, head_dim) and cast with q.astype(jnp.float32)."
        )
    b, h, d = q.shape
    res = k[3]
    if res.ndim != 4 or res.shape[2] < 2:
        raise ValueError(
            f"{fn}: k_residual must be the float residual window (B, KVH, group, D), got "
            f"{_describe(res)} (jqx.ops.attention.kv_init('int4', ...) allocates it)."
        )
    kvh, grp = res.shape[1], res.shape[2]
    s = k[0].shape[2] if k[0].ndim == 4 else -1
    if kvh == 0 or h % kvh or d % grp or d % 2 or s % grp:
        raise ValueError(
            f"{fn}: q {_describe(q)} with a residual window {_describe(res)} and codes "
            f"{_describe(k[0])}: the heads H={h} must be a multiple of KVH={kvh}, the head "
            f"size D={d} a multiple of the group {grp} (and even), the slots S={s} a "
            "multiple of the group; allocate the cache with jqx.ops.attention.kv_init."
        )
    want = {
        "codes": ((b, kvh, s, d // 2), (jnp.dtype(jnp.uint8),), "uint8, two codes per byte"),
        "residual": ((b, kvh, grp, d), _RESIDUAL_DTYPES, "float32, float16 or bfloat16"),
    }
    meta = {"k": (b, kvh, s // grp, d), "v": (b, kvh, s, d // grp)}
    for role, arrays in (("k", k), ("v", v)):
        for name, a in zip(names, arrays, strict=False):
            shape, dtypes, what = want.get(
                name,
                (
                    meta[role],
                    (jnp.dtype(jnp.float16),),
                    "float16, per channel and group of slots"
                    if role == "k"
                    else "float16, per slot and group of channels",
                ),
            )
            if tuple(a.shape) != shape or jnp.dtype(a.dtype) not in dtypes:
                raise ValueError(
                    f"{fn}: {role}_{name} must be {what} {shape} for q {_describe(q)} and "
                    f"group {grp}, got {_describe(a)}; pass the arrays of a KVCodes('int4') "
                    "as jqx.ops.attention.kv_init and kv_write make them."
                )
    return grp


_RESIDUAL_DTYPES = tuple(jnp.dtype(t) for t in (jnp.float32, jnp.float16, jnp.bfloat16))


def decode_attention_int4(
    q: jax.Array,
    k_codes: jax.Array,
    k_scale: jax.Array,
    k_zero: jax.Array,
    k_residual: jax.Array,
    v_codes: jax.Array,
    v_scale: jax.Array,
    v_zero: jax.Array,
    v_residual: jax.Array | None,
    lo: jax.Array,
    hi: jax.Array,
    *,
    scale: float,
) -> jax.Array:
    """:func:`decode_attention` over the 4-bit KIVI cache, read in place.

    The layout of ``jqx.ops.attention.KVCodes("int4")`` with group ``g`` (the
    residual window's rows): codes uint8 (B, KVH, S, D // 2), two per byte, the even
    channel in the low nibble, ``x = (code - zero) * scale``; keys with a float16
    scale and zero point per channel and group of ``g`` slots (B, KVH, S // g, D),
    values per slot and group of ``g`` channels (B, KVH, S, D // g). The slots from
    ``(hi - 1) // g * g`` to ``hi`` (the group being filled) are read from the float
    residual windows (B, KVH, g, D; slot ``s`` at row ``s % g``), whatever their
    codes hold; with ``v_residual=None`` (values kept without a window) every value
    slot is read from the codes. The key scales multiply the query once per group and
    the zero points enter as one dot per group and head; the value scales weight the
    softmax's probabilities; no float copy of the cache is formed and only the visible
    slots are read. ``hi`` is clipped to [0, S] first. Same threads, parts and
    guarantees as :func:`decode_attention`. A bfloat16 residual window is read as
    float32 (a copy of ``g`` slots).

    Args:
      q: float32 (B, H, D), H a multiple of KVH.
      k_codes, k_scale, k_zero, k_residual: the keys' arrays.
      v_codes, v_scale, v_zero, v_residual: the values' arrays (``v_residual`` None
        when the values have no window).
      lo, hi: integer (B,), the visible slots ``lo <= s < hi``.
      scale: the scores' factor, a Python float.

    Returns:
      float32 (B, H, D); zeros for a sequence with no visible slot.

    Raises:
      ValueError: a dtype or shape the kernel does not take (named).
      RuntimeError: the kernel is not available here (:func:`gguf_status`).

    Example:
        >>> import jax.numpy as jnp
        >>> from jqx.kernels.cpu import native
        >>> codes = jnp.full((1, 1, 4, 2), 0x33, jnp.uint8)  # every code 3
        >>> one = jnp.ones((1, 1, 2, 4), jnp.float16)  # scales 1 (keys; values alike)
        >>> zero = jnp.zeros((1, 1, 2, 4), jnp.float16)
        >>> res = jnp.full((1, 1, 2, 4), 5.0)  # the residual window: slots 2, 3
        >>> vsc, vz = jnp.ones((1, 1, 4, 2), jnp.float16), jnp.zeros((1, 1, 4, 2), jnp.float16)
        >>> f = native.decode_attention_int4 if native.gguf_available() else (
        ...     native.decode_attention_int4_reference)
        >>> q = jnp.zeros((1, 1, 4))  # equal scores: the mean of slots 0, 1, 2 (3, 3, 5)
        >>> y = f(q, codes, one, zero, res, codes, vsc, vz, res, jnp.array([0]), jnp.array([3]),
        ...       scale=0.5)
        >>> [round(x, 4) for x in y[0, 0].tolist()]
        [3.6667, 3.6667, 3.6667, 3.6667]
    """
    fn = "decode_attention_int4"
    k = (k_codes, k_scale, k_zero, k_residual)
    v = (v_codes, v_scale, v_zero, v_residual)
    _int4_cache_check(q, k, v, fn)
    stand_in = jax.ShapeDtypeStruct((*k_codes.shape[:3], q.shape[2]), jnp.float16)
    lo, hi, scale = _attention_check(q, stand_in, stand_in, lo, hi, scale, fn)
    if not gguf_available():
        raise RuntimeError(f"the native attention kernel is not available: {gguf_status()}")
    kr, vr = (
        r if jnp.dtype(r.dtype) in _RESIDUAL_DTYPES[:2] else r.astype(jnp.float32)
        for r in (k_residual, k_residual[:, :, :0] if v_residual is None else v_residual)
    )
    return jax.ffi.ffi_call(
        ATTENTION_INT4_TARGET,
        jax.ShapeDtypeStruct(q.shape, jnp.float32),
        vmap_method="sequential",
    )(
        q,
        k_codes,
        k_scale,
        k_zero,
        kr,
        v_codes,
        v_scale,
        v_zero,
        vr,
        lo,
        hi,
        scale=np.float32(scale),
    )


def decode_attention_int4_reference(
    q: jax.Array,
    k_codes: jax.Array,
    k_scale: jax.Array,
    k_zero: jax.Array,
    k_residual: jax.Array,
    v_codes: jax.Array,
    v_scale: jax.Array,
    v_zero: jax.Array,
    v_residual: jax.Array | None,
    lo: jax.Array,
    hi: jax.Array,
    *,
    scale: float,
) -> jax.Array:
    """Plain-jnp :func:`decode_attention_int4`: the cache dequantized to float32 (the
    residual window placed at each sequence's slots ``(hi - 1) // g * g ..``), then
    :func:`decode_attention_reference`. Same operands and errors; runs anywhere.

    Example:
        >>> import jax.numpy as jnp
        >>> from jqx.kernels.cpu import native
        >>> codes = jnp.full((1, 1, 2, 1), 0x21, jnp.uint8)  # codes 1 and 2
        >>> ks, kz = jnp.ones((1, 1, 1, 2), jnp.float16), jnp.zeros((1, 1, 1, 2), jnp.float16)
        >>> vs, vz = jnp.ones((1, 1, 2, 1), jnp.float16), jnp.zeros((1, 1, 2, 1), jnp.float16)
        >>> res = jnp.zeros((1, 1, 2, 2))
        >>> native.decode_attention_int4_reference(
        ...     jnp.zeros((1, 1, 2)), codes, ks, kz, res, codes, vs, vz, res,
        ...     jnp.array([0]), jnp.array([2]), scale=1.0).tolist()  # slots 0, 1: residual
        [[[0.0, 0.0]]]
    """
    fn = "decode_attention_int4_reference"
    k = (k_codes, k_scale, k_zero, k_residual)
    v = (v_codes, v_scale, v_zero, v_residual)
    grp = _int4_cache_check(q, k, v, fn)
    stand_in = jax.ShapeDtypeStruct((*k_codes.shape[:3], q.shape[2]), jnp.float16)
    lo, hi, scale = _attention_check(q, stand_in, stand_in, lo, hi, scale, fn)
    b, kvh, s, _ = k_codes.shape
    hi = jnp.clip(hi, 0, s)
    qhi = jnp.where(hi > 0, (hi - 1) // grp * grp, 0)

    def deq(codes, sc, zp, res, role):
        lo4 = (codes & 15).astype(jnp.float32)
        hi4 = (codes >> 4).astype(jnp.float32)
        x = jnp.stack([lo4, hi4], axis=-1).reshape(b, kvh, s, -1)
        sc, zp = sc.astype(jnp.float32), zp.astype(jnp.float32)
        if role == "k":
            sc, zp = jnp.repeat(sc, grp, axis=2), jnp.repeat(zp, grp, axis=2)
        else:
            sc, zp = jnp.repeat(sc, grp, axis=3), jnp.repeat(zp, grp, axis=3)
        x = (x - zp) * sc
        if res is None:
            return x
        row = jnp.arange(s)[None, :] - qhi[:, None]  # (b, s): the residual's row
        inres = (row >= 0) & (row < grp)
        r = jnp.take_along_axis(
            res.astype(jnp.float32), jnp.clip(row, 0, grp - 1)[:, None, :, None], axis=2
        )
        return jnp.where(inres[:, None, :, None], r, x)

    return decode_attention_reference(
        q,
        deq(k_codes, k_scale, k_zero, k_residual, "k"),
        deq(v_codes, v_scale, v_zero, v_residual, "v"),
        lo,
        hi,
        scale=scale,
    )

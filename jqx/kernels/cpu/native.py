"""Native CPU kernels, built on first use: an AVX512-VNNI int8 GEMM and a
4-bit weight-only kernel for decode-sized products.

XLA:CPU's own ``int8 x int8 -> int32`` dot runs far from the 1/4 of the
float32 dot that VNNI's ``vpdpbusd`` (64 byte products per instruction)
allows (measurements: docs/internals/native-kernels.md). This module compiles
``int8_gemm.cc`` (beside it: a register-blocked VNNI GEMM, threaded over
rows) with the system C++ compiler into a cached shared library, registers it
as the XLA FFI target ``jqx_int8_gemm`` and exposes it as
:func:`int8_matmul`, an exact ``int8 x int8 -> int32`` matmul usable under
``jit``. The same library registers ``jqx_w4_gemv`` (:func:`w4_matmul`): f32
activations of up to :data:`W4_MAX_ROWS` rows times a packed 4-bit weight (any
4-bit format, group-wise along K), read in place.

When ``jqx.ops`` uses them (W8A8 int8 and int8 weight-only products big
enough to pay for the per-call packing, 4-bit weight-only products at decode
sizes), and the ``JQX_NATIVE=0`` switch that turns that off, are decided in
``jqx.ops.dispatch`` (docs/internals/dispatch.md); this module only builds
the kernels and reports whether they work.

Availability needs: an x86-64 CPU with AVX512F/BW/VL/VNNI, a C++17 compiler
(``$CXX``, else ``g++``/``clang++``) and a writable cache directory
(``$JQX_CACHE_DIR``, else ``~/.cache/jqx``). The library is built once per
source, compiler and flags (a hash in its file name), written to a temporary
file and renamed into place, so a failed or concurrent build never leaves a
half-written library. :func:`status` says why it is unavailable.

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
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["available", "status", "int8_matmul", "w4_matmul", "TARGET", "W4_TARGET", "W4_MAX_ROWS"]

TARGET = "jqx_int8_gemm"
W4_TARGET = "jqx_w4_gemv"
W4_MAX_ROWS = 16  # kW4MaxRows in the kernel (register blocks of 8 rows)
_SRC = Path(__file__).parent / "int8_gemm.cc"
_FLAGS = (
    "-O3",
    "-std=c++17",
    "-shared",
    "-fPIC",
    "-mavx512f",
    "-mavx512bw",
    "-mavx512vl",
    "-mavx512vnni",
)
_lock = threading.Lock()
_state: dict = {"ok": None, "reason": "not built yet", "lib": None}


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


def _build() -> Path:
    """The shared library's path, compiling it if it is not cached yet."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set $CXX or install g++)")
    include = jax.ffi.include_dir()
    src = _SRC.read_bytes()
    try:
        version = subprocess.run(
            [cxx, "--version"], capture_output=True, text=True, timeout=30
        ).stdout.splitlines()[:1]
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"the C++ compiler {cxx} does not run: {e}") from e
    key = hashlib.sha256(src + repr((_FLAGS, version, jax.__version__)).encode()).hexdigest()[:16]
    cache = _cache_dir()
    out = cache / f"int8_gemm-{key}.so"
    if out.exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    try:
        r = subprocess.run(
            [cxx, *_FLAGS, f"-I{include}", str(_SRC), "-o", tmp, "-lpthread"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if r.returncode != 0:
            raise RuntimeError(f"compiling {_SRC.name} failed:\n{r.stderr[-2000:]}")
        os.replace(tmp, out)  # atomic: never a half-written library under `out`
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _load() -> None:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise RuntimeError(f"needs an x86-64 CPU, this is {platform.machine()}")
    lib = ctypes.CDLL(str(_build()))
    if not lib.jqx_cpu_supported():
        raise RuntimeError("this CPU lacks AVX512F/AVX512BW/AVX512VL/AVX512-VNNI")
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.JqxInt8Gemm), platform="cpu")
    jax.ffi.register_ffi_target(W4_TARGET, jax.ffi.pycapsule(lib.JqxW4Gemv), platform="cpu")
    _state["lib"] = lib


def available() -> bool:
    """Whether the native kernels are built, loaded and registered (builds them
    on the first call; a failure is remembered, see :func:`status`)."""
    if _state["ok"] is None:
        with _lock:
            if _state["ok"] is None:
                try:
                    _load()
                    _state["ok"], _state["reason"] = True, "available"
                except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                    _state["ok"], _state["reason"] = False, str(e)
    return bool(_state["ok"])


def status() -> str:
    """``"available"``, or why the native kernels are not used."""
    available()
    return _state["reason"]


def int8_matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """Exact ``a @ b`` for int8 ``a`` (M, K) and ``b`` (K, N): int32 (M, N).

    Runs the native VNNI kernel (call :func:`available` first; without it
    this raises RuntimeError). Works under ``jit``; under ``vmap`` it loops.

    Raises:
      TypeError: operands that are not 2-D int8 of matching K.
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise TypeError(
            f"int8_matmul: expected a (M, K) and b (K, N), got {tuple(a.shape)} and "
            f"{tuple(b.shape)}."
        )
    if a.dtype != jnp.int8 or b.dtype != jnp.int8:
        raise TypeError(f"int8_matmul: expected int8 operands, got {a.dtype} and {b.dtype}.")
    if not available():
        raise RuntimeError(f"the native int8 GEMM is not available: {status()}")
    m, k = a.shape
    n = b.shape[1]
    kp = -(-k // 4) * 4
    # int8 v -> uint8 v + 128 (vpdpbusd multiplies unsigned by signed bytes).
    au = lax.bitcast_convert_type(a, jnp.uint8) ^ jnp.uint8(0x80)
    if kp != k:
        au = jnp.pad(au, ((0, 0), (0, kp - k)))  # zero bytes meet zero weight rows
    acc = jax.ffi.ffi_call(
        TARGET, jax.ShapeDtypeStruct((m, n), jnp.int32), vmap_method="sequential"
    )(au, b, threads=np.int64(_threads()))
    return acc  # the kernel already subtracted 128 * column sums


def w4_matmul(
    x: jax.Array,
    packed: jax.Array,
    table: jax.Array,
    scale: jax.Array,
    zero: jax.Array | None,
    *,
    n: int,
    group_size: int,
) -> jax.Array:
    """``x @ W`` for a 4-bit group-wise weight, f32, for up to
    :data:`W4_MAX_ROWS` rows (decode), reading the packed weight in place.

    ``W[k, j] = (table[code[k, j]] - zero[g, j]) * scale[g, j]`` with
    ``g = k // group_size``; codes are packed two per byte along N, low nibble
    first (jqx's QArray layout). Sums are f32 (each group's codes first, then
    its zero and scale), so the result equals ``x @ W`` up to f32 rounding.

    Args:
      x: (M, K) float32, M <= W4_MAX_ROWS.
      packed: (K, ceil(n / 2)) uint8.
      table: (16,) float32, the value of each code.
      scale: (K // group_size, n) float32.
      zero: like ``scale``, or None.
      n: the weight's N.
      group_size: rows of K per scale; must divide K.

    Raises:
      TypeError: shapes or dtypes that do not match.
    """
    if x.ndim != 2 or x.shape[0] > W4_MAX_ROWS or x.dtype != jnp.float32:
        raise TypeError(
            f"w4_matmul: x must be float32 (M, K) with M <= {W4_MAX_ROWS}, got {x.dtype} "
            f"{tuple(x.shape)}."
        )
    m, k = x.shape
    if group_size <= 0 or k % group_size:
        raise TypeError(f"w4_matmul: group_size={group_size} must divide K={k}.")
    want = {
        "packed": (packed, (k, -(-n // 2)), jnp.uint8),
        "table": (table, (16,), jnp.float32),
        "scale": (scale, (k // group_size, n), jnp.float32),
    }
    if zero is not None:
        want["zero"] = (zero, (k // group_size, n), jnp.float32)
    for name, (a, shape, dt) in want.items():
        if tuple(a.shape) != shape or a.dtype != dt:
            raise TypeError(
                f"w4_matmul: {name} must be {jnp.dtype(dt).name} {shape}, got {a.dtype} "
                f"{tuple(a.shape)}."
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
        scale if zero is None else zero,
        group=np.int64(group_size),
        has_zero=np.int64(zero is not None),
        threads=np.int64(_threads()),
    )

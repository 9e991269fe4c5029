"""Host memory reuse for CPU inference: keep freed memory in the process (glibc malloc).

XLA:CPU allocates each call's temporaries anew and frees them at the end of the call.
With glibc's default settings, large allocations (above the dynamic mmap threshold, or
beyond what a worker thread's arena holds) are fresh ``mmap``s: their pages are
faulted in (and zeroed) by the kernel on first touch and returned to the OS on free.
So every call of a jitted model page-faults its temporaries in again. all-MiniLM-L6-v2
at batch 32 x 128, float32 under ``jax.jit``: about 135k minor page faults (530 MB)
per call; W8A8 through ``jqx.quantized``: 26k.

``JQX_REUSE_HOST_MEMORY=1`` in the environment makes ``import jqx`` keep what the
process frees: one malloc arena for every thread, no ``mmap`` below 1 GiB, no trimming
of the heap, 512 MiB of top padding (glibc's ``mallopt``). Steady-state calls then
fault no pages and run faster: 1.3-1.4x for the float32 model above and 1.03-1.2x for
its W8A8 form on a 2-core AVX512 machine (docs/benchmarks/bert_cpu.md). ONNX Runtime
gets the same effect from its own memory arena.

It must act before jax is imported (importing jaxlib starts threads that take malloc
arenas of their own; applied after that, a 32 MiB temporary still faulted 9.8k pages
per call): so import jqx before jax, or set glibc's own variables when the process
starts, which is equivalent: ``MALLOC_ARENA_MAX=1 MALLOC_MMAP_THRESHOLD_=1073741824
MALLOC_TRIM_THRESHOLD_=2147483647 MALLOC_TOP_PAD_=536870912``. When jax is already
loaded, ``import jqx`` applies the settings anyway and warns (``RuntimeWarning``).

The price: the process keeps its peak heap (memory is not returned to the OS until it
exits). The settings are process-wide and cannot be undone. Off by default; on
platforms without glibc the variable does nothing.

This module imports neither jax nor any other part of jqx; importing it applies the
variable (``jqx/__init__.py`` imports it first).

Example:
    >>> from jqx.kernels.cpu.host_memory import decide
    >>> decide({"JQX_REUSE_HOST_MEMORY": "1"}, jax_loaded=False)
    (True, None)
    >>> decide({}, jax_loaded=True)
    (False, None)
"""

from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["ENV", "apply_from_environment", "decide", "glibc_version", "reuse_host_memory"]

ENV = "JQX_REUSE_HOST_MEMORY"

_TOP_PAD = 512 << 20  # the default top_pad_bytes


def _settings(top_pad_bytes: int) -> tuple[tuple[str, int, str, int], ...]:
    """``(mallopt name, mallopt parameter (malloc.h), glibc environment variable, value)``
    of each setting."""
    return (
        ("M_ARENA_MAX", -8, "MALLOC_ARENA_MAX", 1),
        ("M_MMAP_THRESHOLD", -3, "MALLOC_MMAP_THRESHOLD_", 1 << 30),
        ("M_TRIM_THRESHOLD", -1, "MALLOC_TRIM_THRESHOLD_", 2**31 - 1),
        ("M_TOP_PAD", -2, "MALLOC_TOP_PAD_", top_pad_bytes),
    )


_APPLIED = False


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") else None


def glibc_version() -> tuple[int, ...] | None:
    """The GNU C library's version, e.g. ``(2, 36)``, or None when the process does not
    use glibc (macOS, musl, Windows): :func:`reuse_host_memory` then changes nothing."""
    libc = _libc()
    if libc is None:
        return None
    libc.gnu_get_libc_version.restype = ctypes.c_char_p
    return tuple(int(p) for p in libc.gnu_get_libc_version().decode().split(".")[:2])


def reuse_host_memory(*, top_pad_bytes: int = _TOP_PAD) -> bool:
    """Applies the settings (see the module docstring). Effective in full only before
    jax is imported; ``JQX_REUSE_HOST_MEMORY=1`` calls it at ``import jqx``.

    Args:
      top_pad_bytes: extra memory requested from the OS whenever the heap grows (glibc's
        ``M_TOP_PAD``), between 0 and 2**31 - 1.

    Returns:
      True when the settings were applied, False where the process does not use glibc
      (nothing changed).

    Raises:
      ValueError: ``top_pad_bytes`` outside 0 .. 2**31 - 1.
      RuntimeError: glibc refused a setting (the message names it).
    """
    global _APPLIED
    if not isinstance(top_pad_bytes, int) or not 0 <= top_pad_bytes < 2**31:
        raise ValueError(
            f"top_pad_bytes={top_pad_bytes!r} must be an int from 0 to 2**31 - 1 "
            "(bytes; the default is 512 MiB)."
        )
    libc = _libc()
    if libc is None:
        return False
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    for name, param, _, value in _settings(top_pad_bytes):
        if libc.mallopt(param, value) != 1:
            raise RuntimeError(
                f"reuse_host_memory: glibc's mallopt({name}, {value}) failed; the settings "
                f"before it were applied. Unset {ENV} to leave host memory as it is."
            )
    _APPLIED = True
    return True


def decide(environ, *, jax_loaded: bool) -> tuple[bool, str | None]:
    """``(apply, warning)`` for an environment: apply when :data:`ENV` is ``1``, ``true``
    or ``yes``; a warning when jax is already loaded (partial effect) or the value is
    not understood (nothing applied)."""
    value = environ.get(ENV, "").strip().lower()
    if value in ("", "0", "false", "no"):
        return False, None
    if value not in ("1", "true", "yes"):
        return False, (
            f"{ENV}={environ.get(ENV)!r} is not understood and was ignored; set it to 1 to "
            "keep freed host memory for reuse, or unset it."
        )
    if jax_loaded:
        glibc_env = " ".join(f"{var}={v}" for _, _, var, v in _settings(_TOP_PAD))
        return True, (
            f"{ENV}=1: jax was imported before jqx, so threads it started keep malloc arenas "
            "of their own and large temporaries may still be mapped afresh on every call. "
            f"Import jqx before jax, or start the process with {glibc_env}."
        )
    return True, None


def apply_from_environment() -> bool:
    """What ``import jqx`` runs first: :func:`reuse_host_memory` when :data:`ENV` asks
    for it (warnings as :func:`decide` gives them). Returns whether it applied."""
    import os  # noqa: PLC0415
    import sys  # noqa: PLC0415
    import warnings  # noqa: PLC0415

    apply, warning = decide(os.environ, jax_loaded="jaxlib" in sys.modules)
    if warning:
        warnings.warn(warning, RuntimeWarning, stacklevel=3)
    return reuse_host_memory() if apply else False


apply_from_environment()

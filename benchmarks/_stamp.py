"""The stamp a benchmark prints with its tables: what ran, from which commit, on what.

Every measured table in ``docs/benchmarks/`` carries one, so a reader can tell
whether a number is still current. Benchmark scripts call :func:`print_stamp`
once before their tables (and embed :func:`stamp` where they write JSON).

Example:
    >>> s = stamp(["benchmarks/quantize.py", "--n", "256"])
    >>> s["command"]
    'python benchmarks/quantize.py --n 256'
    >>> sorted(s) == sorted(FIELDS)
    True
    >>> stamp_line(s).startswith("command: `python benchmarks/quantize.py --n 256`")
    True

The environment variables that change what a benchmark measures (:data:`ENV_PREFIXES`:
XLA's and JAX's flags, jqx's switches, glibc's malloc settings, thread counts) are part
of the command, as a shell prefix, so the stamped command reruns the same thing:

    >>> stamp(["x.py"], environ={"XLA_FLAGS": "--a=1 --b", "HOME": "/h"})["command"]
    "XLA_FLAGS='--a=1 --b' python x.py"
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

FIELDS = ("command", "commit", "jax", "jaxlib", "cpu", "cores", "avx512_vnni", "date")

_ROOT = Path(__file__).resolve().parent.parent

# Environment variables that change a benchmark's numbers: named in the stamped command.
ENV_PREFIXES = ("XLA_", "JAX_", "JQX_", "MALLOC_", "GLIBC_TUNABLES", "OMP_", "MKL_")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=_ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_commit() -> str:
    """Short hash of HEAD, with ``+dirty`` when tracked files differ; "unknown" outside git."""
    head = _git("rev-parse", "--short", "HEAD")
    if not head:
        return "unknown"
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return head + ("+dirty" if dirty else "")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpuinfo() -> tuple[str, bool | None]:
    """(model name, whether AVX512-VNNI is reported); the flag is None off Linux."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine() or "unknown", None
    model, flags = "", ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = value
    # jqx.native's kernels need AVX512-VNNI; the same table differs with and without it.
    return model or platform.machine() or "unknown", "avx512_vnni" in flags.split()


def env_prefix(environ=None) -> str:
    """The variables of ``environ`` (default ``os.environ``) whose names start with one of
    :data:`ENV_PREFIXES`, as a sorted, shell-quoted ``NAME=value `` prefix ("" if none).

    Example:
        >>> env_prefix({"JQX_REUSE_HOST_MEMORY": "1", "PATH": "/bin", "OMP_NUM_THREADS": "2"})
        'JQX_REUSE_HOST_MEMORY=1 OMP_NUM_THREADS=2 '
    """
    environ = os.environ if environ is None else environ
    names = sorted(n for n in environ if n.startswith(ENV_PREFIXES))
    return "".join(f"{n}={shlex.quote(environ[n])} " for n in names)


def stamp(argv: list[str] | None = None, environ=None) -> dict[str, str]:
    """What ran (command line, with the environment that changes it), from which commit,
    on what software and CPU, and when.

    Args:
      argv: the script's command line; default ``sys.argv``.
      environ: the environment whose :func:`env_prefix` leads the command; default
        ``os.environ``.

    Returns:
      A dict with the keys of :data:`FIELDS`, every value a string.

    Example:
        >>> stamp(["x.py"])["commit"] != ""
        True
    """
    argv = list(sys.argv if argv is None else argv)
    if argv and os.path.isabs(argv[0]):
        # Print the script as a repository path, never this machine's absolute path.
        try:
            argv[0] = str(Path(argv[0]).resolve().relative_to(_ROOT))
        except ValueError:
            argv[0] = Path(argv[0]).name
    cpu, vnni = _cpuinfo()
    return {
        "command": env_prefix(environ) + "python " + shlex.join(argv),
        "commit": git_commit(),
        "jax": _version("jax"),
        "jaxlib": _version("jaxlib"),
        "cpu": cpu,
        "cores": str(os.cpu_count() or "unknown"),
        "avx512_vnni": "unknown" if vnni is None else ("yes" if vnni else "no"),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def stamp_line(s: dict[str, str] | None = None) -> str:
    """The stamp as one markdown line, the form ``docs/benchmarks/*.md`` quote.

    Example:
        >>> "jax " in stamp_line(stamp(["x.py"]))
        True
    """
    s = stamp() if s is None else s
    return (
        f"command: `{s['command']}` · commit: {s['commit']} · "
        f"jax {s['jax']}, jaxlib {s['jaxlib']} · "
        f"machine: {s['cpu']}, {s['cores']} cores, AVX512-VNNI {s['avx512_vnni']} · {s['date']}"
    )


def print_stamp(file=None) -> dict[str, str]:
    """Print the stamp line (to stdout by default) and return the stamp for JSON output.

    Example:
        >>> import io
        >>> buf = io.StringIO()
        >>> _ = print_stamp(buf)
        >>> buf.getvalue().startswith("command: `python ")
        True
    """
    s = stamp()
    print(stamp_line(s), file=sys.stdout if file is None else file, flush=True)
    return s


if __name__ == "__main__":
    print_stamp()

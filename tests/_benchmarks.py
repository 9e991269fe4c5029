"""Loads a script of ``benchmarks/`` as a module, for the tests that run its functions.

The scripts import ``_stamp`` from their own folder, as running them puts it first on
``sys.path``; the loader does the same while the script loads, then restores the path.
A script is loaded once per process (cached in ``sys.modules``).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(stem: str) -> ModuleType:
    """``benchmarks/<stem>.py`` as the module ``jqx_benchmarks_<stem>``."""
    name = f"jqx_benchmarks_{stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{stem}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while it loads
        path = list(sys.path)
        sys.path.insert(0, str(BENCHMARKS))
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        finally:
            sys.path[:] = path
    return sys.modules[name]

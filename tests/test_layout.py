"""The layering of docs/internals/layout.md, checked on the source.

Imports point down only (lazy imports inside functions included); the kernels
package imports nothing else from jqx; only the CLI imports the demo package;
``import jqx`` loads none of the extras.
"""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Bottom to top. A module may import modules of its own layer or of layers below.
LAYERS = [
    ("kernels", ("jqx.kernels",)),
    ("core", ("jqx.core",)),
    ("recipes", ("jqx.recipes",)),
    ("ops", ("jqx.ops",)),
    ("transform", ("jqx.transform", "jqx.flax")),
    ("calibration", ("jqx.calibration",)),
    ("training", ("jqx.training",)),
    ("io", ("jqx.io",)),
    ("llm", ("jqx.llm",)),
    ("cli", ("jqx.cli", "jqx.__main__")),
]
EXTRAS = (
    "flax",
    "optax",
    "chex",
    "tqdm",
    "safetensors",
    "tokenizers",
    "matplotlib",
    "gguf",
    "orbax",
    "jinja2",
)


def _layer(module: str) -> int | None:
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_package(path: pathlib.Path) -> bool:
    return path.name == "__init__.py"


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, absolute module) for every import in the file, lazy ones included.
    ``from pkg import name`` counts as importing ``pkg.name`` when that is a module."""
    tree = ast.parse(path.read_text(), str(path))
    me = _module_name(path)
    pkg = me if _is_package(path) else me.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            for a in node.names:
                sub = f"{mod}.{a.name}"
                sub_path = ROOT / pathlib.Path(*sub.split("."))
                is_mod = sub_path.with_suffix(".py").exists() or (sub_path / "__init__.py").exists()
                out.append((node.lineno, sub if is_mod else mod))
    return out


def _sources(*packages: str) -> list[pathlib.Path]:
    return sorted(p for pkg in packages for p in (ROOT / pkg).rglob("*.py"))


def test_imports_point_down():
    bad = []
    for path in _sources("jqx"):
        me = _module_name(path)
        if me == "jqx":
            continue  # the public namespace re-exports every layer
        mine = _layer(me)
        assert mine is not None, (
            f"{me} belongs to no layer: add its package to LAYERS and layout.md"
        )
        for line, mod in _imports(path):
            where = f"{path.relative_to(ROOT)}:{line}"
            if mod == "jqx":
                bad.append(
                    f"{where} imports the top-level jqx namespace (import the module itself)"
                )
                continue
            if mod.split(".")[0] == "jqx_demo" and LAYERS[mine][0] != "cli":
                bad.append(f"{where} imports the demo package ({mod}); only the CLI may")
                continue
            if not mod.startswith("jqx."):
                continue
            theirs = _layer(mod)
            if theirs is None or theirs > mine:
                up = "an unknown layer" if theirs is None else f"layer {LAYERS[theirs][0]!r}"
                bad.append(f"{where}: {me} (layer {LAYERS[mine][0]!r}) imports {mod} ({up})")
    assert not bad, "imports that point up:\n" + "\n".join(bad)


def test_kernels_import_no_jqx():
    bad = [
        f"{p.relative_to(ROOT)}:{line} imports {mod}"
        for p in _sources("jqx/kernels")
        for line, mod in _imports(p)
        if mod.split(".")[0] in ("jqx", "jqx_demo") and not mod.startswith("jqx.kernels")
    ]
    assert not bad, "\n".join(bad)
    absolute = [
        f"{p.relative_to(ROOT)}:{n.lineno}"
        for p in _sources("jqx/kernels")
        for n in ast.walk(ast.parse(p.read_text()))
        if isinstance(n, ast.ImportFrom) and not n.level and (n.module or "").startswith("jqx")
    ]
    assert not absolute, "kernels import each other relatively only: " + ", ".join(absolute)


def test_only_the_cli_imports_the_demo_package():
    users = {
        _module_name(p)
        for p in _sources("jqx")
        for _, mod in _imports(p)
        if mod.split(".")[0] == "jqx_demo"
    }
    assert users <= {"jqx.cli"}, users


def test_no_submodule_shares_a_name_with_a_public_function():
    import jqx

    clashes = []
    for name in jqx.__all__:
        obj = getattr(jqx, name)
        if callable(obj) and not isinstance(obj, type):
            p = ROOT / "jqx" / name
            if p.with_suffix(".py").exists() or (p / "__init__.py").exists():
                clashes.append(name)
    assert not clashes, f"jqx.<name> is both a function and a submodule: {clashes}"


def test_public_namespace_one_name_per_line():
    import jqx

    assert sorted(jqx.__all__) == jqx.__all__, "keep __all__ sorted"
    assert len(set(jqx.__all__)) == len(jqx.__all__)
    for name in jqx.__all__:
        assert getattr(jqx, name) is not None, name


def test_import_jqx_needs_no_extra():
    """With every extra blocked (importing one raises ImportError), ``import
    jqx`` and the core workflow still work, and Pallas is not loaded."""
    code = (
        "import sys\n"
        f"for m in {EXTRAS!r}: sys.modules[m] = None\n"
        "import jqx, jax.numpy as jnp\n"
        "q = jqx.quantize({'kernel': jnp.ones((8, 4))}, jqx.int8_weight_only())\n"
        "assert jqx.quantized(lambda p, x: x @ p['kernel'])(q, jnp.ones((2, 8))).shape == (2, 4)\n"
        "assert 'jax.experimental.pallas' not in sys.modules\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]


def test_qarray_is_constructed_in_one_place():
    """Only jqx/core/numerics.py calls ``QArray(...)`` (``make_qarray`` from codes and
    scales, ``stored_qarray`` from stored children); elsewhere QArrays come from those
    or from ``q.replace``."""
    callers = []
    for path in sorted((ROOT / "jqx").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.id if isinstance(f, ast.Name) else getattr(f, "attr", None)
                if name == "QArray":
                    callers.append(str(path.relative_to(ROOT)))
    assert set(callers) == {"jqx/core/numerics.py"}, callers

"""The layers of docs/DESIGN.md hold: import-linter's contracts (pyproject.toml) pass on the tree, and
fail on an upward import or a cycle added on purpose (to a copy of the package); no module is in an
import cycle. Function-local imports count as any other."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# a dev tool (pip install -e .[dev]); a GPU machine's `pytest -m gpu` collects this file without it
grimp = pytest.importorskip("grimp")

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).with_name("lint-imports")


def lint(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--config", str(tree / "pyproject.toml"), "--no-cache"], cwd=tree,
                          env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture
def copy_of_tree(tmp_path):
    for name in ("ablate", "analysis"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def add_function_local_import(module: Path, imported: str) -> None:
    """The kind of import that went unseen before: inside a function."""
    module.write_text(module.read_text() + f"\n\ndef _added_on_purpose():\n    import {imported}  # noqa\n")


def test_the_tree_keeps_every_contract():
    done = lint(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_an_upward_import_breaks_the_layers(copy_of_tree):
    add_function_local_import(copy_of_tree / "ablate" / "errors.py", "ablate.config")
    done = lint(copy_of_tree)
    assert done.returncode == 1
    assert "ablate's layers, top to bottom BROKEN" in done.stdout
    assert "ablate.errors -> ablate.config" in done.stdout


def test_the_analysis_reaching_into_training_breaks_its_contract(copy_of_tree):
    add_function_local_import(copy_of_tree / "analysis" / "claims.py", "ablate.training")
    done = lint(copy_of_tree)
    assert done.returncode == 1
    assert "never imports the training loop, the sweep or the\ncommands BROKEN" in done.stdout


def test_a_cycle_inside_a_layer_breaks_the_acyclic_contract(copy_of_tree):
    # backend and mixer imported each other before: the mixer imports the backend, so this closes it
    add_function_local_import(copy_of_tree / "ablate" / "ops" / "backend.py", "ablate.ops.mixer")
    done = lint(copy_of_tree)
    assert done.returncode == 1
    assert "no import cycles between the modules of any package BROKEN" in done.stdout


def test_every_module_of_the_package_has_a_layer():
    """A module in no layer would be checked by no contract: the layers name every part of ablate."""
    import pkgutil
    import tomllib

    import ablate

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c for c in contracts if c["type"] == "layers")["layers"]
    named = {m.strip() for layer in layers for m in layer.replace(":", "|").split("|")}
    parts = {f"ablate.{m.name}" for m in pkgutil.iter_modules(ablate.__path__)}
    assert parts - named == set(), f"add these to a layer in pyproject.toml: {sorted(parts - named)}"
    assert named - parts - {"analysis"} == set()


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_no_module_is_in_an_import_cycle():
    graph = grimp.build_graph("ablate", "analysis", cache_dir=None)
    assert _cycles(graph) == []

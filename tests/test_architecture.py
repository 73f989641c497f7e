"""The import contracts of docs/architecture.md, enforced with import-linter (``lint-imports``).

The source lives in three top-level folders (``qcompile/``, ``passes/`` as ``qcompile.passes``,
``kernels/`` as ``qcompile.kernels``); ``qcompile/passes`` and ``qcompile/kernels`` are links to the
other two, so a bare ``lint-imports`` at the repository root sees one tree. The tests lint a
copy laid out as the installed package is (they also break a contract on purpose in it); the
contracts are read from pyproject.toml.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import grimp
import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def _mirror(dest: Path) -> Path:
    """Copy the package sources into ``dest/qcompile`` as one tree; returns ``dest``."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")

    def ignore_links(folder: str, names: list[str]) -> set[str]:  # qcompile/passes, qcompile/kernels
        return ignore(folder, names) | {n for n in names if os.path.islink(os.path.join(folder, n))}

    shutil.copytree(ROOT / "qcompile", dest / "qcompile", ignore=ignore_links)
    shutil.copytree(ROOT / "passes", dest / "qcompile" / "passes", ignore=ignore)
    shutil.copytree(ROOT / "kernels", dest / "qcompile" / "kernels", ignore=ignore)
    return dest


def _lint(tree: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([str(LINT), "--no-cache", str(ROOT / "pyproject.toml")], cwd=tree,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return _mirror(tmp_path_factory.mktemp("lint"))


def test_import_contracts_hold(tree):
    out = _lint(tree)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Contracts: 3 kept, 0 broken" in out.stdout, out.stdout


@pytest.mark.parametrize("module,line,contract", [
    ("kernels/ops.py", "import qcompile.passes.gptq", "layers"),
    ("qcompile/pass_manager.py", "import qcompile.serialize", "layers"),
    ("qcompile/formats/scheme.py", "import qcompile.kernels.ops", "format layer"),
    ("passes/bias_correction.py", "import qcompile.passes.gptq", "passes never import each other"),
])
def test_a_forbidden_import_breaks_a_contract(tmp_path, module, line, contract):
    tree = _mirror(tmp_path)
    top, _, rest = module.partition("/")
    path = tree / "qcompile" / (rest if top == "qcompile" else f"{top}/{rest}")
    path.write_text(path.read_text() + f"\n{line}  # deliberate violation\n")
    out = _lint(tree)
    assert out.returncode != 0
    assert "BROKEN" in out.stdout and contract in out.stdout, out.stdout


def _graph(tree: Path, monkeypatch) -> grimp.ImportGraph:
    monkeypatch.syspath_prepend(str(tree))
    for name in [m for m in sys.modules if m == "qcompile" or m.startswith("qcompile.")]:
        monkeypatch.delitem(sys.modules, name)
    return grimp.build_graph("qcompile", cache_dir=None)


def test_every_module_is_in_a_layer(tree, monkeypatch):
    """The layers contract lists every top-level module: a new module must be placed in one."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c for c in config["contracts"] if c["id"] == "layers")["layers"]
    placed = {m.strip() for layer in layers for m in layer.replace("|", ":").split(":")}
    top = {".".join(m.split(".")[:2]) for m in _graph(tree, monkeypatch).modules if m != "qcompile"}
    assert top - placed == set(), f"modules in no layer of pyproject.toml: {sorted(top - placed)}"


def test_no_import_cycles(tree, monkeypatch):
    """No two modules import each other, directly or through others (a package's __init__
    re-exporting its own submodules is not a cycle)."""
    graph = _graph(tree, monkeypatch)
    g = nx.DiGraph()
    for importer in graph.modules:
        for imported in graph.find_modules_directly_imported_by(importer):
            if not imported.startswith(importer + "."):  # __init__ -> own submodule
                g.add_edge(importer, imported)
    cycles = [c for c in nx.simple_cycles(g) if len(c) > 1]
    assert not cycles, f"import cycles: {cycles[:5]}"

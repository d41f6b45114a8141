"""Imports point one way: no cycle anywhere in the package, the shared types of training/ import nothing
of training/, and planning a comparison (or reading configs) never imports torch."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Folders installed as packages of targetgen (pyproject.toml's package-dir).
PACKAGES = {"targetgen": ROOT / "targetgen", "targetgen.plugins": ROOT / "plugins", "targetgen.cli": ROOT / "cli"}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its file (module level or in functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            # `from . import registry` names a module; `from .api import Batch` names an attribute of one
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def test_the_package_has_no_import_cycle():
    edges = graph()
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycle = path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt]
                pytest.fail("import cycle: " + " → ".join(cycle))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])


def test_the_walk_sees_the_imports_it_checks():
    edges = graph()
    assert "targetgen.training.run" in edges["targetgen.training.trainer"]
    assert "targetgen.registry" in edges["targetgen.compare"]  # `from .registry import ...`
    assert "targetgen.jsonsafe" in edges["targetgen.compare"]  # `from . import jsonsafe`
    assert "targetgen.training.decomposed" in edges["targetgen.training.builder"]
    assert "targetgen" in edges["targetgen.plugins.inversion"]  # `from targetgen import ...`


def test_the_shared_types_of_training_import_nothing_of_training():
    assert not {m for m in graph()["targetgen.training.run"] if m.startswith("targetgen.training")}


def test_nothing_below_reaches_up_to_the_loop_or_the_reports():
    edges = graph()
    for name, targets in edges.items():
        if name.startswith("targetgen.training.") and name != "targetgen.training.trainer":
            assert "targetgen.training.trainer" not in targets, name
        if name != "targetgen.cli.main":
            assert not targets & {"targetgen.report", "targetgen.compare"} or name in (
                "targetgen.compare",
                "targetgen.tune",
            ), name


@pytest.mark.parametrize(
    "module",
    [
        "targetgen.compare",
        "targetgen.config",
        "targetgen.report",
        "targetgen.registry",
        "targetgen.training.rundir",
        "targetgen.cli.main",
    ],
)
def test_planning_and_reading_configs_never_import_torch(module):
    code = (
        f"import sys, {module}; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:5]"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr

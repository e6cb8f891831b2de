"""The packages stand in floors: each imports only the floors below it (or its own), and no module
import circle exists. Read from the source with ``ast``, so imports inside functions count too."""

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

# the floor order of DESIGN.md; packages on one floor do not import each other
FLOORS = {"common": 0, "datasets": 1, "models": 1, "lora": 1, "evaluation": 2, "tasks": 3, "methods": 4,
          "engine": 5, "utils": 6}


def _modules() -> dict[str, Path]:
    out = {}
    for package in FLOORS:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports (the longest known prefix of each imported name)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for target in targets:
            parts = target.split(".")
            for i in range(len(parts), 0, -1):
                candidate = ".".join(parts[:i])
                if candidate in known:
                    if candidate != name:
                        found.add(candidate)
                    break
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def test_no_package_imports_a_floor_above_its_own_or_beside_it(graph):
    bad = []
    for name, targets in graph.items():
        mine = name.split(".")[0]
        for target in targets:
            other = target.split(".")[0]
            if other != mine and FLOORS[other] >= FLOORS[mine]:
                bad.append(f"{name} -> {target}")
    assert bad == []


def test_every_package_has_a_floor():
    top = {p.name for p in REPO.iterdir() if (p / "__init__.py").is_file()} - {"tests", "benchmarks"}
    assert top <= set(FLOORS), f"packages without a floor: {sorted(top - set(FLOORS))}"


def test_no_module_import_circle(graph):
    # a package's __init__ importing its own submodules is not a circle of meaning; leave those edges out
    edges = {name: {t for t in targets if not t.startswith(name + ".")} for name, targets in graph.items()}
    state: dict[str, int] = {}
    circles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                circles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, [*stack, target])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert circles == []



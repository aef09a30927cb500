"""The package's floors import one way (docs/architecture.md, "The house"): a module imports only modules of
its own floor or below, and no chain of imports comes back to where it started. Every import counts, the
ones inside functions too: an upward import deferred to call time is still a floor a reader must climb."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

FLOORS = (  # from the ground up; a module belongs to the floor of its longest matching prefix
    ("lgformer.errors",),
    (
        "lgformer.files",
        "lgformer.safe_load",
        "lgformer.precision",
        "lgformer.render",
        "lgformer.arguments",
        "lgformer.lazy",
    ),
    ("lgformer.config",),
    ("lgformer.text",),
    ("lgformer.model",),
    ("lgformer.data",),
    ("lgformer.checkpoint", "lgformer.shipped"),
    ("lgformer.predictor", "lgformer"),
    ("lgformer.engine",),
    ("lgformer.convert",),
    ("lgformer.app",),
    ("lgformer.cli",),
)


def floor_of(module: str) -> int:
    best = max(
        (
            (len(prefix), floor)
            for floor, prefixes in enumerate(FLOORS)
            for prefix in prefixes
            if module == prefix or module.startswith(prefix + ".")
        ),
        default=None,
    )
    if best is None:
        raise AssertionError(f"{module} is on no floor: add it to FLOORS")
    return best[1]


def module_name(path: Path, src: Path) -> str:
    parts = path.relative_to(src).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(src: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports (`from a import b` counts as a.b when b is a module)."""
    modules = {module_name(p, src): p for p in src.glob("lgformer/**/*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.split(".")[0] == "lgformer"}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module.split(".")[0] != "lgformer":
                    continue
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    targets.add(full if full in modules else node.module)
        graph[name] = targets - {name}
    return graph


def upward(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{module} (floor {floor_of(module)}) imports {target} (floor {floor_of(target)})"
        for module, targets in graph.items()
        for target in targets
        if floor_of(target) > floor_of(module)
    )


def loops(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of two or more modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_from_a_floor_above_it():
    assert upward(imports(SRC)) == []


def test_the_import_graph_has_no_loop():
    assert loops(imports(SRC)) == []


def test_the_checks_fail_on_an_upward_import_and_a_loop(tmp_path):
    """On a copy of the package whose mask head imports the trainer (which imports the model back), both
    the upward import and the loop are reported."""
    import shutil

    copy = tmp_path / "src"
    shutil.copytree(
        SRC / "lgformer", copy / "lgformer", ignore=shutil.ignore_patterns("__pycache__", "assets")
    )
    head = copy / "lgformer" / "model" / "head.py"
    head.write_text(head.read_text() + "\nfrom lgformer.engine import train\n")
    graph = imports(copy)
    assert "lgformer.model.head (floor 4) imports lgformer.engine.train (floor 8)" in upward(graph)
    assert any("lgformer.model.head" in loop and "lgformer.engine.train" in loop for loop in loops(graph))

"""The floors of the package: a module imports only from its own floor or below, and no import cycle exists.

Every import is read from the source (module level and inside functions), so a cycle hidden behind a function-level
import fails here as well.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "contrast"

# floor of each top-level part of the package; a module imports only from floors <= its own
FLOORS = {
    "errors": 0, "config": 0, "layers": 0, "objectives": 0, "distributed": 0, "bridges": 0,
    "towers": 1, "tokenizer": 1, "data": 1, "decoders": 1,
    "models": 2,
    "runs": 3,
    "train": 4, "evaluate": 4, "index": 4, "export": 4, "features": 4, "caption": 4, "plan": 4, "generate": 4, "export_llava": 4,
    "import_checkpoints": 4,
    "cli": 5, "__main__": 5, "__init__": 5,
}
FLOOR_NAMES = ["base", "parts", "models", "runs", "drivers", "cli"]


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """The package modules ``path`` imports, at any depth of the file (``from x import submodule`` counts as x.sub)."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "contrast")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "contrast":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return {m for m in found if m != name}


def floor_of(module: str) -> int:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    if key not in FLOORS:
        raise AssertionError(f"module {module} belongs to no floor; add '{key}' to FLOORS in tests/test_layering.py")
    return FLOORS[key]


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    known = set(files)
    return {m: imports_of(p, m, known) for m, p in files.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, deps in sorted(graph.items()):
        for dep in sorted(deps):
            if floor_of(dep) > floor_of(mod):
                bad.append(f"{mod} ({FLOOR_NAMES[floor_of(mod)]}) imports {dep} ({FLOOR_NAMES[floor_of(dep)]})")
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), plus self-loops."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_module_imports_a_floor_above_its_own():
    assert upward_imports(import_graph()) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_checks_can_fail(tmp_path):
    """A package with an upward import hidden in a function and a two-module cycle is caught by both checks."""
    pkg = tmp_path / "contrast"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models" / "__init__.py").write_text("")
    (pkg / "config.py").write_text("def f():\n    from contrast.models import clip\n")
    (pkg / "models" / "clip.py").write_text("from contrast import config\nfrom contrast.models import blip\n")
    (pkg / "models" / "blip.py").write_text("from .clip import X\n")
    graph = import_graph(pkg)
    assert upward_imports(graph) == ["contrast.config (base) imports contrast.models.clip (models)"]
    assert cycles(graph) == [["contrast.config", "contrast.models.blip", "contrast.models.clip"]]


def test_every_module_has_a_floor():
    for mod in import_graph():
        floor_of(mod)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_functions_stay_short(path):
    """No function in the package is longer than 80 lines (a long function is named steps waiting to be split)."""
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.end_lineno - n.lineno + 1 > 80]
    assert long == []

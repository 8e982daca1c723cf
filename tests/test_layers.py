"""labkit's layers hold: the core, models, studies and the lab each import only the layers below
them; no two modules import each other (directly or around a circle); labkit's own modules are
imported at the top of a module, not inside functions; no module imports a private name of
another.

Read from the source with ``ast`` (nothing is imported), so the test also sees the imports inside
functions that only run on some paths.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "labkit"
LAYERS = {"core": 0, "models": 1, "studies": 2, "lab": 3}


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], 0) if len(parts) > 1 and parts[1] in LAYERS else 0


MODULES = {_module(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(path: Path):
    """(imported labkit module, names taken from it, line, whether at the module's top level)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "labkit":
            names = [a.name for a in node.names]
            for name in names:                       # "from labkit import masks": the module labkit.masks
                if f"{node.module}.{name}" in MODULES:
                    yield f"{node.module}.{name}", [], node.lineno, id(node) in top
            plain = [n for n in names if f"{node.module}.{n}" not in MODULES]
            if plain:
                yield node.module, plain, node.lineno, id(node) in top
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "labkit":
                    yield alias.name, [], node.lineno, id(node) in top


EDGES = {m: list(_imports(p)) for m, p in MODULES.items()}


def test_no_module_imports_a_higher_layer():
    upward = [f"{MODULES[m].relative_to(ROOT.parent)}:{line} imports {target}"
              for m, edges in EDGES.items() for target, _, line, _ in edges
              if target in MODULES and _layer(target) > _layer(m)]
    assert not upward, "imports that run back up a layer:\n" + "\n".join(upward)


def test_no_import_circles():
    graph = {m: {t for t, _, _, _ in edges if t in MODULES and t != m and not t.startswith(m + ".")}
             for m, edges in EDGES.items()}
    graph = {m: {t for t in ts if not m.startswith(t + ".") or t == "labkit"} - {"labkit"} for m, ts in graph.items()}
    seen, stack, circles = set(), [], []

    def visit(m):
        if m in stack:
            circles.append(" -> ".join(stack[stack.index(m):] + [m]))
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            visit(t)
        stack.pop()

    for m in sorted(graph):
        visit(m)
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_labkit_modules_are_imported_at_the_top():
    inside = [f"{MODULES[m].relative_to(ROOT.parent)}:{line} imports {target} inside a function"
              for m, edges in EDGES.items() for target, _, line, at_top in edges if not at_top]
    assert not inside, "\n".join(inside)


def test_no_private_name_is_imported_from_another_module():
    private = [f"{MODULES[m].relative_to(ROOT.parent)}:{line} takes {', '.join(n for n in names if n.startswith('_'))} "
               f"from {target}"
               for m, edges in EDGES.items() for target, names, line, _ in edges
               if target != m and any(n.startswith("_") for n in names)]
    assert not private, "\n".join(private)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_stay_readable(module):
    lines = len(MODULES[module].read_text(encoding="utf-8").splitlines())
    assert lines <= 620, f"{module}: {lines} lines; split it by idea"

"""The package's import graph: arrows point down the layer order, and modules import no cycle.

Layer order (docs/DESIGN.md): rundir < config < data < models (and compat) < optim < diagnostics
< training < analysis, evaluation, export < quickstart < cli. Every internal import counts, lazy
ones inside functions included (a lazy import from a lower layer to a higher one is the same
dependency, only hidden). Cycles are checked on module-level imports outside ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "megatron_qk"
LAYERS = {
    "rundir": 0,
    "config": 1,
    "data": 2,
    "models": 3,
    "compat": 3,
    "optim": 4,
    "diagnostics": 5,
    "training": 6,
    "analysis": 7,
    "evaluation": 7,
    "export": 7,
    "quickstart": 8,
    "quickstart_eval": 8,
    "quickstart_report": 8,
    "quickstart_summary": 8,
    "cli": 9,
    "train": 9,
}
MAX_LINES = 410  # "under ~400 lines": the bound with a little slack for docstrings


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(path: Path, top_level_only: bool) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(node.module, node.lineno)]
            found += [(f"{node.module}.{a.name}", node.lineno) for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
    return [(name, line) for name, line in found if name.startswith("megatron_qk.")]


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_package_has_a_layer():
    unknown = {_layer(m) for m in _modules()} - set(LAYERS) - {None}
    assert not unknown, f"add these packages to LAYERS (and docs/DESIGN.md): {sorted(unknown)}"


def test_imports_point_down_the_layer_order():
    upward = []
    for module, path in _modules().items():
        src = _layer(module)
        if src is None:
            continue
        for name, line in _imports(path, top_level_only=False):
            dst = _layer(name)
            if dst in LAYERS and LAYERS[dst] > LAYERS[src]:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}")
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_module_level_imports_have_no_cycle():
    modules = _modules()
    graph = {
        m: sorted({n for n, _ in _imports(p, top_level_only=True) if n in modules and n != m})
        for m, p in modules.items()
    }
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in graph[m]:
            if state.get(n) == 1:
                cycles.append(" -> ".join(stack[stack.index(n) :] + [n]))
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_module_is_long():
    long = {
        str(p.relative_to(PACKAGE.parent)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines (split by responsibility): {long}"

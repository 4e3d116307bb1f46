"""The package's folders are layers: a module imports only from its own layer or the layers below
it (README "Layout"), so the folder shows the dependency order and there are no cycles."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "lowmem_rlhf"
# lowest first; a module may import from its own layer and any earlier one
LAYERS = [
    {"errors", "files", "__init__"},
    {"data"},
    {"config"},
    {"plan"},
    {"model"},
    {"runtime"},
    {"algo"},
    {"measure"},
    {"stages"},
    {"cli", "doctor", "__main__"},
]


def _layer(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else "__init__"
    return next(i for i, names in enumerate(LAYERS) if top in names)


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lowmem_rlhf"):
            if node.module == "lowmem_rlhf":
                out |= {f"lowmem_rlhf.{a.name}" for a in node.names if a.name != "__version__"}
            else:
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("lowmem_rlhf.")}
    return out


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def test_every_module_is_in_a_layer_and_imports_no_higher_layer():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        me = _module_name(path)
        for dep in _imports(path):
            if _layer(dep) > _layer(me):
                bad.append(f"{me} -> {dep}")
    assert not bad, "upward imports: " + "; ".join(bad)


def test_no_import_cycles_between_modules():
    graph = {_module_name(p): {d for d in _imports(p)} for p in PKG.rglob("*.py")}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in graph.get(node, ()):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])

"""modlm's imports: no cycles, and every package stays on its floor.

Imports inside functions count too (a lazy import is still a dependency), except a package's
lazy ``__getattr__`` exports, which only re-export a submodule's names for ``modlm.X`` access.
"""

import ast
from pathlib import Path

import modlm

ROOT = Path(modlm.__file__).resolve().parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        # Skipped: a package's lazy __getattr__ exports, and `if TYPE_CHECKING:` blocks (never run).
        skip = {
            id(n)
            for f in tree.body
            if (isinstance(f, ast.FunctionDef) and f.name == "__getattr__" and path.name == "__init__.py")
            or (isinstance(f, ast.If) and isinstance(f.test, ast.Name) and f.test.id == "TYPE_CHECKING")
            for n in ast.walk(f)
        }
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            # A module's own parent packages are initialising already when it runs.
            own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
            for t in targets:
                if t.startswith("modlm"):
                    # importing a.b.c runs a, a.b and a.b.c
                    parts = t.split(".")
                    for i in range(1, len(parts) + 1):
                        dep = ".".join(parts[:i])
                        if dep in modules and dep != name and dep not in own:
                            graph[name].add(dep)
    return graph


def test_no_import_cycles():
    graph = _graph()
    assert "modlm.model.transformer" in graph and "modlm.inference.generate" in graph
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycle = stack[stack.index(m) :] + [m]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


# The floors, bottom up: each top-level package or module of modlm and the ones it may import.
# Anything else, lazy imports included, fails. A new package must take its place here.
_BOTTOM = {"validation", "errors", "devices"}
_CORE = _BOTTOM | {"spec", "kernels", "config", "flops"}
FLOORS: dict[str, set[str]] = {
    "validation": set(),
    "errors": set(),
    "devices": set(),
    "kernels": set(),
    "spec": {"validation"},
    "config": {"spec", "validation"},
    "flops": {"config", "spec", "validation"},
    "routing": {"config", "spec", "validation", "errors"},
    "model": _CORE | {"routing"},
    "quant": _CORE | {"routing", "model"},
    "inference": _CORE | {"routing", "model"},
    "training": _CORE | {"routing", "model", "quant", "inference"},
    "interop": _CORE | {"routing", "model", "quant", "inference", "training"},
    "adapt": _CORE | {"routing", "model", "quant", "inference", "training", "interop"},
    "experiments": _CORE | {"routing", "model", "quant", "inference", "training", "interop", "adapt"},
    "bench": _CORE | {"routing", "model", "quant", "inference", "training", "interop", "adapt", "experiments"},
    "hf": {"interop"},
    "cli": _CORE | {"routing", "model", "quant", "inference", "training", "interop", "adapt", "experiments", "bench"},
    "__init__": {"config", "model", "inference", "training"},
}


def _floor(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_package_has_a_floor():
    missing = {_floor(m) for m in _graph()} - set(FLOORS)
    assert not missing, f"packages with no floor in tests/test_imports.py FLOORS: {sorted(missing)}"


def test_imports_stay_on_their_floors():
    bad = []
    for name, deps in _graph().items():
        src = _floor(name)
        for dep in deps:
            dst = _floor(dep)
            if dst != src and dst != "__init__" and dst not in FLOORS.get(src, set()):
                bad.append(f"{name} -> {dep}")
    assert not bad, "imports off their floor:\n" + "\n".join(sorted(bad))


def test_the_floors_have_no_cycle():
    # The table itself is a DAG, so no ordering of edits can make two floors import each other.
    state: dict[str, int] = {}

    def visit(n: str) -> None:
        state[n] = 1
        for m in FLOORS.get(n, ()):
            assert state.get(m) != 1, f"floors cycle through {n} -> {m}"
            if m not in state:
                visit(m)
        state[n] = 2

    for n in FLOORS:
        if n not in state:
            visit(n)

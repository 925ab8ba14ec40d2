"""No import cycles inside modlm: its imports form a DAG (packages included).

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


def test_the_model_does_not_import_training_or_experiments():
    graph = _graph()
    for name, deps in graph.items():
        if name.startswith(("modlm.model", "modlm.routing")):
            bad = {d for d in deps if d.startswith(("modlm.training", "modlm.experiments", "modlm.cli"))}
            assert not bad, f"{name} imports {bad}"

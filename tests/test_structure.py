"""The import graph of the package: dependencies point one way (DESIGN.md, "Repository layout").

Every import is counted, module-level or inside a function: a lazy import is still a dependency.
Checked: no import cycle between modules; no module imports another module's private (``_name``)
names; a private module (``_name.py``) is imported only from its own package; the core never
imports the layers above it, and kernels import nothing of attnctrl but the ground floor.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"attnctrl": ROOT / "attnctrl", "attnctrl.processors": ROOT / "processors",
            "attnctrl.pipelines": ROOT / "pipelines", "attnctrl.app": ROOT / "app"}
ABOVE_CORE = ("attnctrl.processors", "attnctrl.pipelines", "attnctrl.app", "attnctrl.cli")
GROUND = ("attnctrl.errors", "attnctrl.io", "attnctrl.tracing")


def _modules() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for prefix, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if prefix == "attnctrl" and parts and parts[0] in ("processors", "pipelines", "app"):
                continue  # not there; the sibling folders are mapped in
            name = ".".join([prefix, *parts])
            modules[name] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, str | None]]:
    """(imported module, imported name or None) for every import statement of a module."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    out: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.append((sub, None) if sub in modules else (target, alias.name))
    return [(m, n) for m, n in out if m.split(".")[0] == "attnctrl"]


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    private: list[str] = []
    for name, path in modules.items():
        for target, imported in _imports(name, path, modules):
            while target not in modules and "." in target:
                target = target.rpartition(".")[0]
            if target == name:
                continue
            graph[name].add(target)
            if imported and imported.startswith("_") and not imported.startswith("__"):
                private.append(f"{name} imports {target}.{imported}")
            leaf = target.rpartition(".")[2]
            own_package = name.rpartition(".")[0] if not modules[name].name == "__init__.py" else name
            if leaf.startswith("_") and not leaf.startswith("__") and target.rpartition(".")[0] != own_package:
                private.append(f"{name} imports the private module {target}")
    return graph, private


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _is_package_init(name: str) -> bool:
    return name in PACKAGES or name in ("attnctrl.kernels", "attnctrl.cli", "attnctrl.models", "attnctrl.models.shapes")


def test_no_import_cycles():
    graph, _ = _graph()
    # A package's __init__ re-exporting its modules is not a dependency of those modules on it.
    pruned = {m: {t for t in deps if not (_is_package_init(t) and m.startswith(t + "."))} for m, deps in graph.items()}
    assert _cycles(pruned) == []


def test_no_private_imports_across_modules():
    _, private = _graph()
    assert private == []


def test_layers_point_one_way():
    graph, _ = _graph()
    entry = ("attnctrl", "attnctrl.__main__")  # the package facade and ``python -m attnctrl``
    core = [m for m in graph if m.startswith("attnctrl.") and not m.startswith(ABOVE_CORE) and m not in entry]
    upward = sorted(f"{m} -> {t}" for m in core for t in graph[m] if t.startswith(ABOVE_CORE))
    assert upward == []
    kernels = [m for m in graph if m.startswith("attnctrl.kernels")]
    outside = sorted(f"{m} -> {t}" for m in kernels for t in graph[m]
                     if not t.startswith("attnctrl.kernels") and t not in GROUND)
    assert outside == []
    app_users = sorted(f"{m} -> {t}" for m, deps in graph.items() for t in deps
                       if t.startswith("attnctrl.app") and not m.startswith("attnctrl.app"))
    assert app_users == []

"""Print airtrace's module graph: every module, the airtrace modules it imports, and the import cycles.

Reads the source tree (python/airtrace and kernels/, the latter as ``airtrace.kernels``) with
``ast``; nothing is imported. An import inside a function body counts like a top-level one
(marked ``*`` in the listing) because it still ties the two modules together. ``from airtrace.x
import y`` is an edge to ``airtrace.x.y`` when that is a module, else to ``airtrace.x``; the
implicit import of parent packages is not an edge.

    python benches/module_graph.py [--root REPO] [--summary]
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

PACKAGE = "airtrace"


def find_modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> source file, for python/airtrace and kernels/ (as airtrace.kernels)."""
    modules: dict[str, Path] = {}
    trees = [(root / "python" / PACKAGE, (PACKAGE,)), (root / "kernels", (PACKAGE, "kernels"))]
    for base, prefix in trees:
        for path in sorted(base.rglob("*.py")):
            parts = path.relative_to(base).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(prefix + parts)] = path
    modules.setdefault(f"{PACKAGE}.kernels", root / "kernels")
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> dict[str, bool]:
    """airtrace modules imported by ``name`` -> whether every such import is lazy (inside a function)."""
    if path.is_dir():
        return {}
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: dict[str, bool] = {}

    def add(target: str, lazy: bool) -> None:
        while target not in modules and "." in target:
            target = target.rsplit(".", 1)[0]
        if target in modules and target != name:
            found[target] = found.get(target, True) and lazy

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] == PACKAGE:
                        add(alias.name, lazy)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    here = name.split(".") if is_package else name.split(".")[:-1]
                    base = ".".join(here[: len(here) - child.level + 1] + ([child.module] if child.module else []))
                else:
                    base = child.module or ""
                if base.split(".")[0] != PACKAGE:
                    continue
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    add(sub if sub in modules else base, lazy)
            visit(child, inner)

    visit(tree, False)
    return found


def strongly_connected(graph: dict[str, dict[str, bool]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module (the import cycles)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = [0]

    def connect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sorted(components)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1], help="repository root")
    parser.add_argument("--summary", action="store_true", help="only the counts and the cycles")
    args = parser.parse_args(argv)
    modules = find_modules(args.root)
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    edges = sum(len(targets) for targets in graph.values())
    lazy = sum(flag for targets in graph.values() for flag in targets.values())
    cycles = strongly_connected(graph)
    if not args.summary:
        for name in sorted(graph):
            lines = sum(1 for _ in modules[name].open()) if modules[name].is_file() else 0
            targets = " ".join(t + ("*" if graph[name][t] else "") for t in sorted(graph[name]))
            print(f"{name} ({lines} lines) -> {targets or '-'}")
        print()
    print(f"modules: {len(graph)}  edges: {edges} ({lazy} only inside functions, marked *)  cycles: {len(cycles)}")
    for component in cycles:
        print(f"  cycle of {len(component)}: {' '.join(component)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Count the house's measures (issue #23) from the source, with the standard library's ``ast``.

    python scripts/measure_house.py            # the table
    python scripts/measure_house.py --list     # and every offending line

How each figure is counted:

- **rooms**: each package directly under ``featbank/`` (``featbank.cache``, ...) and each top-level
  module (``featbank.errors``, ...) is one room; ``featbank/__init__.py`` (the face) is left out.
- **import chain**: an arrow A -> B for every import of B's code written in A, at module level or
  inside a function, except under ``if TYPE_CHECKING:``. The longest chain is the longest path of
  rooms along arrows (rooms in a circle count once); it is the number of floors.
- **circles**: groups of two or more modules (inside any package) that import each other, arrows
  counted as above; and, apart, groups of two or more rooms that do.
- **private imports**: imports of another package's underscore module (``featbank.cache._index``
  from outside ``featbank/cache/``), in ``featbank/`` and in ``cli/``.
- **Any-typed core parameters**: function parameters annotated ``Any`` (or ``Any | None``) whose name
  is a core object (``CORE_NAMES``).
- **head-kind branches**: comparisons of anything with a head kind's name, or a collection of
  strings holding one (``htype == "linear"``, ``head.type in ("linear", "mlp")``,
  ``spec.head != "sklearn"``), and ``match`` statements with such a case.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE_NAMES = {
    "cache", "bundle", "backbone", "est", "estimator", "model", "head", "config", "table",
    "manifest", "engine", "source", "spec", "settings", "writer", "reader", "store", "run",
    "job", "features", "probe", "session", "network", "net", "index", "plan", "options",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, int]]:
    """Absolute names of what ``module`` imports (``from a import b`` gives ``a.b`` and ``a``)."""
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = resolve(child, module, is_package)
                for alias in child.names:
                    found.append((f"{base}.{alias.name}", child.lineno))
                found.append((base, child.lineno))
            visit(child)

    visit(tree)
    return found


def resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    if not is_package:
        parts = parts[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def load_sources() -> dict[str, tuple[Path, ast.AST]]:
    sources = {}
    for top in ("featbank", "cli"):
        for path in sorted((ROOT / top).rglob("*.py")):
            sources[module_name(path)] = (path, ast.parse(path.read_text(), str(path)))
    return sources


def known_target(name: str, modules: set[str]) -> str | None:
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def room_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "featbank" or len(parts) < 2:
        return None
    return ".".join(parts[:2])


def module_graph(sources) -> tuple[dict[str, set[str]], list[tuple[str, int, str]]]:
    modules = set(sources)
    graph: dict[str, set[str]] = defaultdict(set)
    private: list[tuple[str, int, str]] = []
    for module, (path, tree) in sources.items():
        is_package = path.name == "__init__.py"
        for name, line in imports_of(tree, module, is_package):
            target = known_target(name, modules)
            if target and target != module:
                graph[module].add(target)
            if target and is_private_import(module, target):
                private.append((f"{path.relative_to(ROOT)}:{line}", line, target))
    return graph, sorted(set(private))


def is_private_import(importer: str, target: str) -> bool:
    parts = target.split(".")
    for depth in range(2, len(parts) + 1):
        if parts[depth - 1].startswith("_") and not parts[depth - 1].startswith("__"):
            owner = ".".join(parts[: depth - 1])
            if owner == "featbank":  # featbank._files: a ground-floor module of the top package
                return importer.split(".")[0] != "featbank"
            return not (importer == owner or importer.startswith(owner + "."))
    return False


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10000)

    def connect(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            groups.append(group)

    for node in list(graph) + [n for targets in graph.values() for n in targets]:
        if node not in index:
            connect(node)
    return groups


def room_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    rooms: dict[str, set[str]] = defaultdict(set)
    for module, targets in graph.items():
        src = room_of(module)
        if src is None or module == "featbank":
            continue
        for target in targets:
            dst = room_of(target)
            if dst and dst != src and target != "featbank":
                rooms[src].add(dst)
    return rooms


def longest_chain(graph: dict[str, set[str]]) -> list[str]:
    rooms = room_graph(graph)
    groups = strongly_connected(rooms)
    group_of = {room: tuple(sorted(g)) for g in groups for room in g}
    dag: dict[tuple, set[tuple]] = defaultdict(set)
    for src, targets in rooms.items():
        for dst in targets:
            if group_of[src] != group_of[dst]:
                dag[group_of[src]].add(group_of[dst])
    best: dict[tuple, list[tuple]] = {}

    def chain(group: tuple) -> list[tuple]:
        if group not in best:
            tails = [chain(nxt) for nxt in dag.get(group, ())]
            best[group] = [group] + max(tails, key=len, default=[])
        return best[group]

    longest = max((chain(g) for g in set(group_of.values())), key=len, default=[])
    return ["+".join(g) for g in longest]


def any_core_params(sources) -> list[str]:
    found = []
    for path, tree in sources.values():
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            args = node.args
            for arg in args.posonlyargs + args.args + args.kwonlyargs:
                if arg.arg in CORE_NAMES and annotation_is_any(arg.annotation):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}({arg.arg})")
    return found


def annotation_is_any(annotation: ast.expr | None) -> bool:
    if annotation is None:
        return False
    text = ast.unparse(annotation).replace(" ", "")
    return text in {"Any", "Any|None", "None|Any", "Optional[Any]", "typing.Any"}


HEAD_KINDS = {"linear", "mlp", "sklearn"}


def head_kind_strings(node: ast.expr) -> bool:
    if isinstance(node, ast.Constant):
        return node.value in HEAD_KINDS
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(head_kind_strings(e) for e in node.elts)
    return False


def kind_branches(sources) -> list[str]:
    found = []
    for path, tree in sources.values():
        for node in ast.walk(tree):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Compare):
                if any(head_kind_strings(s) for s in [node.left, *node.comparators]):
                    found.append(f"{where} {ast.unparse(node)}")
            elif isinstance(node, ast.Match):
                patterns = [c.pattern for c in node.cases]
                values = [p.value for p in patterns if isinstance(p, ast.MatchValue)]
                if any(head_kind_strings(v) for v in values):
                    found.append(f"{where} match {ast.unparse(node.subject)}")
    return found


def readme_lines() -> int:
    return len((ROOT / "README.md").read_text().splitlines())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print every offending line too")
    opts = parser.parse_args()
    sources = load_sources()
    graph, private = module_graph(sources)
    chain = longest_chain(graph)
    circles = [sorted(g) for g in strongly_connected(graph) if len(g) > 1]
    room_circles = [sorted(g) for g in strongly_connected(room_graph(graph)) if len(g) > 1]
    in_featbank = [p for p in private if p[0].startswith("featbank/")]
    in_cli = [p for p in private if p[0].startswith("cli/")]
    anys = any_core_params(sources)
    kinds = kind_branches(sources)
    print(f"longest import chain (rooms): {len(chain)}  {' -> '.join(chain)}")
    print(f"circles:                      {len(circles)} of modules, {len(room_circles)} of rooms")
    print(f"private imports:              {len(in_featbank)} in featbank/, {len(in_cli)} in cli/")
    print(f"Any-typed core parameters:    {len(anys)}")
    print(f"head-kind string branches:    {len(kinds)}")
    print(f"README lines:                 {readme_lines()}")
    if opts.list:
        for group in circles + room_circles:
            print("circle:", " <-> ".join(group))
        for where, _, target in private:
            print("private:", where, "->", target)
        for line in anys:
            print("any:", line)
        for line in kinds:
            print("kind:", line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

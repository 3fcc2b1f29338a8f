"""The cache package stands in floors (no import circle) and shows one face: read from the source with ast."""

from __future__ import annotations

import ast
from pathlib import Path

import featbank.backbones
import featbank.cache

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "featbank" / "cache"


def _imported_modules(path: Path, package: str) -> set[str]:
    """Absolute names of every module ``path`` imports, lazy imports inside functions included."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            out.add(stem)
            out.update(f"{stem}.{a.name}" for a in node.names)
    return out


def _cache_graph() -> dict[str, set[str]]:
    modules = {p.stem for p in CACHE.glob("_*.py") if p.stem != "__init__"}
    graph = {}
    for m in modules:
        imported = _imported_modules(CACHE / f"{m}.py", "featbank.cache")
        graph[m] = {t for t in modules if f"featbank.cache.{t}" in imported}
    return graph


def test_no_module_of_the_cache_package_reaches_itself_through_imports():
    graph = _cache_graph()
    assert {"_reader", "_discovery", "_validate", "_legacy"} <= set(graph)
    for start in graph:
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            assert m != start, f"featbank.cache.{start} imports itself through {sorted(seen)}"
            if m not in seen:
                seen.add(m)
                todo += graph[m]


def test_the_floors_the_issue_named_point_one_way():
    graph = _cache_graph()
    assert "_reader" in graph["_discovery"] and "_discovery" not in graph["_reader"]
    assert "_discovery" not in graph["_validate"]
    for m in ("_direct", "_features", "_validate", "_integrity", "_reader"):
        assert "_discovery" not in graph[m], m


def test_other_packages_import_cache_and_backbones_only_through_their_faces():
    offenders = []
    for path in [*(ROOT / "featbank").rglob("*.py"), *(ROOT / "cli").rglob("*.py")]:
        rel = path.relative_to(ROOT)
        if rel.parts[:2] in (("featbank", "cache"), ("featbank", "backbones")):
            continue
        package = ".".join(rel.with_suffix("").parts[:-1]) if rel.name != "__init__.py" else ".".join(rel.parts[:-1])
        for name in _imported_modules(path, package):
            if name.startswith(("featbank.cache._", "featbank.backbones._")):
                offenders.append(f"{rel}: {name}")
    assert offenders == []


def test_every_exported_name_exists():
    for package in (featbank.cache, featbank.backbones):
        missing = [n for n in package.__all__ if not hasattr(package, n)]
        assert missing == [], package.__name__
        assert len(set(package.__all__)) == len(package.__all__), package.__name__

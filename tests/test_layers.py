"""The layers of the house (README's layout): extractors/ and heads/ at the bottom, router/ above them, train/ on top.
A module imports only its own folder and the folders below it, and no two modules import each other, directly or
round a circle. Read from the source with ast (every import counts, a lazy one inside a function too)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RANK = {"extractors": 0, "heads": 0, "router": 1, "train": 2}  # a folder may import folders of a lower rank
# backbone_router._compat (router/_package/): the old names' shim, which every folder's __init__ calls, imports none of
# the package. Allowed from any folder until the old names go (issue 27: one release).
SHIM = "router._package._compat"


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def folder_name(imported: str) -> str:
    """The import name backbone_router.x.y as the folders name it (x.y); backbone_router itself is router/_package/."""
    top, _, rest = imported.partition(".")
    if top != "backbone_router":
        return imported
    return rest if rest.split(".")[0] in RANK else ".".join(["router._package", *([rest] if rest else [])])


def import_graph(root: Path) -> dict[str, dict[str, int]]:
    """module -> {imported module of these folders: line of its first import} for every .py under RANK's folders."""
    files = {module_name(p, root): p for room in RANK for p in sorted((root / room).rglob("*.py"))}
    graph: dict[str, dict[str, int]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = graph.setdefault(name, {})
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [folder_name(alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = folder_name(node.module or "")
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([node.module] if node.module else [])])
                # `from pkg import sub` imports the submodule where one exists, else a name of pkg
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
                if not node.level and node.module == "backbone_router":  # from backbone_router import router
                    targets = [a.name if a.name in RANK else base for a in node.names]
            else:
                continue
            for target in targets:
                parts = target.split(".")
                while parts and ".".join(parts) not in files:  # `import a.b.c` of a name inside a.b: a.b
                    parts.pop()
                if parts and (found := ".".join(parts)) != name:
                    edges.setdefault(found, node.lineno)
    return graph


def arrows_against_the_order(graph: dict[str, dict[str, int]]) -> list[str]:
    bad = []
    for a, edges in graph.items():
        for b, line in edges.items():
            ra, rb = a.split(".")[0], b.split(".")[0]
            if ra != rb and RANK[rb] >= RANK[ra] and b != SHIM:
                bad.append(f"{a.replace('.', '/')}.py:{line} imports {b} ({rb}/ is not below {ra}/)")
    return bad


def circles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One circle (a -> ... -> a) per strongly connected group of modules (Tarjan)."""
    succ = {a: sorted(edges) for a, edges in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in succ[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while (w := stack.pop()) != v:
                group.add(w)
            if group:
                groups.append({v, *group})

    for v in sorted(succ):
        if v not in index:
            visit(v)
    found = []
    for group in groups:  # a shortest way back to the group's first module, within the group
        start = min(group)
        paths, seen = [[start]], set()
        while paths:
            path = paths.pop(0)
            nxt = [w for w in succ[path[-1]] if w in group]
            if start in nxt:
                found.append([*path, start])
                break
            for w in nxt:
                if w not in seen:
                    seen.add(w)
                    paths.append([*path, w])
    return found


def test_no_folder_imports_a_folder_at_or_above_its_layer():
    assert arrows_against_the_order(import_graph(REPO)) == []


def test_no_import_circle_between_modules():
    assert [" -> ".join(c) for c in circles(import_graph(REPO))] == []


def test_the_checks_find_an_arrow_against_the_order_and_a_circle(tmp_path):
    files = {
        "extractors/__init__.py": "",
        "extractors/a.py": "from . import b\n",
        "extractors/b.py": "import extractors.c\n",
        "extractors/c.py": "def f():\n    from extractors.a import g\n",  # lazy, still an import
        "heads/__init__.py": "",
        "heads/x.py": "from router.model import R\n",  # router is above heads
        "router/__init__.py": "from .model import R\n",
        "router/model.py": "from heads import x\nfrom extractors import a\n",  # below: allowed
        "train/run.py": "from router import R\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path)
    assert graph["router"] == {"router.model": 1} and graph["router.model"] == {"heads.x": 1, "extractors.a": 2}
    assert arrows_against_the_order(graph) == ["heads/x.py:1 imports router.model (router/ is not below heads/)"]
    assert sorted(" -> ".join(c) for c in circles(graph)) == [
        "extractors.a -> extractors.b -> extractors.c -> extractors.a", "heads.x -> router.model -> heads.x"]

"""The shape of the product code (qvacd/, peers/, models/, protocol/), read statically:
every .py file is parsed with `ast` and nothing of it is imported or run.

(a) No import circle among our modules. Imports at module level and imports inside
    functions both count (a function-level import only defers the circle to the first
    call), and so do imports under `if TYPE_CHECKING:`: they never run, but a type named
    from a module that imports us ties the two rooms together just the same (name the
    seam as a Protocol beside the code that needs it instead).
(b) The layers import one way: protocol imports nothing of ours; models never imports
    peers or qvacd; peers never imports models or qvacd. Here `if TYPE_CHECKING:`
    imports count too: a type named from another layer still ties the two together.
(c) No product file over 800 lines unless its module docstring has a line starting
    "Why this file is long:".

How an import names a module: `import a.b.c` and `from a.b.c import x` name a.b.c (and
a.b.c.x when that is a module of ours); `from a.b import c` names a.b.c if it is a
module, else a.b (c is then a name defined in a/b/__init__.py). Implicit imports of
parent packages are not edges: a package's __init__ is always run before its modules,
so a module reaching its own package's siblings is no circle. Imports by string
(importlib) are not seen.
"""

from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PRODUCT = ("protocol", "peers", "models", "qvacd")
# what each layer may not import (qvacd, the top, may import every other)
FORBIDDEN = {
    "protocol": ("peers", "models", "qvacd"),
    "models": ("peers", "qvacd"),
    "peers": ("models", "qvacd"),
}
MAX_LINES = 800
LONG_REASON = "Why this file is long:"


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the module of ours it names
    path: str  # the importing file, relative to the root
    line: int
    where: str  # "module level" or "in def NAME"
    type_only: bool  # under `if TYPE_CHECKING:`

    def describe(self) -> str:
        extra = ", under TYPE_CHECKING" if self.type_only else ""
        return f"{self.path}:{self.line} ({self.where}{extra})"


def find_modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the packages."""
    modules: dict[str, Path] = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _ours(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of dotted `name` that is one of our modules."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def imports_of(module: str, modules: dict[str, Path], root: Path) -> list[Import]:
    path = modules[module]
    rel = path.relative_to(root).as_posix()
    tree = ast.parse(path.read_text(), filename=rel)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Import] = []

    def add(target: str | None, node: ast.stmt, where: str, type_only: bool) -> None:
        if target is not None and target != module:
            found.append(Import(module, target, rel, node.lineno, where, type_only))

    def visit(node: ast.AST, where: str, type_only: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(_ours(alias.name, modules), node, where, type_only)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                if node.level > 1:
                    base_parts = base_parts[:-(node.level - 1)]
                base = ".".join([*base_parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if sub in modules else _ours(base, modules), node, where, type_only)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, where, True)
            for child in node.orelse:
                visit(child, where, type_only)
        else:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and where == "module level":
                where = f"in def {node.name}"
            for child in ast.iter_child_nodes(node):
                visit(child, where, type_only)

    visit(tree, "module level", False)
    return found


def import_graph(root: Path, packages: tuple[str, ...]) -> tuple[dict[str, Path], list[Import]]:
    modules = find_modules(root, packages)
    return modules, [imp for m in modules for imp in imports_of(m, modules, root)]


def _strongly_connected(nodes: list[str], edges: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components of more than one module (or one that
    imports itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(edges.get(start, ())))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(edges.get(w, ()))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1 or v in edges.get(v, ()):
                        out.append(sorted(comp))
    return out


def _shortest_cycle(start: str, members: set[str], edges: dict[str, list[str]]) -> list[str]:
    """start -> ... -> start, fewest imports, staying inside the circle's modules."""
    prev: dict[str, str] = {}
    queue = deque([start])
    seen = {start}
    while queue:
        v = queue.popleft()
        for w in edges.get(v, ()):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(prev[path[-1]])
                return [*reversed(path), start]
            if w in members and w not in seen:
                seen.add(w)
                prev[w] = v
                queue.append(w)
    raise AssertionError(f"{start} is in a circle but no cycle found")  # cannot happen


def import_circles(imports: list[Import]) -> list[str]:
    """One message per circle: its modules, then cycles through them (together passing
    every module of it), each import with its file and line."""
    runtime = imports  # TYPE_CHECKING imports too: see (a) in the module docstring
    first: dict[tuple[str, str], Import] = {}
    for imp in runtime:
        first.setdefault((imp.source, imp.target), imp)
    edges: dict[str, list[str]] = {}
    for src, dst in first:
        edges.setdefault(src, []).append(dst)
    nodes = sorted({i.source for i in runtime} | {i.target for i in runtime})
    messages = []
    for comp in _strongly_connected(nodes, {k: sorted(v) for k, v in edges.items()}):
        members = set(comp)
        lines = [f"import circle among {len(comp)} module(s): {', '.join(comp)}"]
        covered: set[str] = set()
        for start in comp:
            if start in covered:
                continue
            cycle = _shortest_cycle(start, members, edges)
            covered.update(cycle)
            lines.append("  " + " -> ".join(cycle))
            for a, b in zip(cycle, cycle[1:]):
                lines.append(f"      {a} -> {b}: {first[(a, b)].describe()}")
        messages.append("\n".join(lines))
    return messages


def layer_violations(imports: list[Import],
                     forbidden: dict[str, tuple[str, ...]] = FORBIDDEN) -> list[str]:
    out = []
    for imp in imports:
        layer, target_layer = imp.source.split(".")[0], imp.target.split(".")[0]
        if target_layer in forbidden.get(layer, ()):
            out.append(f"{imp.describe()}: {imp.source} imports {imp.target}, but {layer}"
                       f" may not import {' or '.join(forbidden[layer])}")
    return out


def long_files(root: Path, modules: dict[str, Path]) -> list[str]:
    out = []
    for path in sorted(modules.values()):
        text = path.read_text()
        n = len(text.splitlines())
        if n <= MAX_LINES:
            continue
        doc = ast.get_docstring(ast.parse(text)) or ""
        if not any(line.lstrip().startswith(LONG_REASON) for line in doc.splitlines()):
            out.append(f"{path.relative_to(root).as_posix()}: {n} lines (limit {MAX_LINES}),"
                       f" and its module docstring has no line starting {LONG_REASON!r}")
    return out


@pytest.fixture(scope="module")
def product() -> tuple[dict[str, Path], list[Import]]:
    modules, imports = import_graph(REPO, PRODUCT)
    # the scan sees the code: every package, and the imports that tie them
    assert set(PRODUCT) <= set(modules), sorted(modules)
    assert any(i.source.startswith("qvacd") and i.target.startswith("peers") for i in imports)
    return modules, imports


def test_no_import_circles(product) -> None:
    _, imports = product
    circles = import_circles(imports)
    assert not circles, "\n\n".join(circles)


def test_layers_import_one_way(product) -> None:
    _, imports = product
    bad = layer_violations(imports)
    assert not bad, "\n".join(bad)


def test_no_long_file_without_a_reason(product) -> None:
    modules, _ = product
    bad = long_files(REPO, modules)
    assert not bad, "\n".join(bad)


def test_the_checks_on_a_small_tree(tmp_path: Path) -> None:
    """The scanner itself: relative and absolute imports, function-level imports,
    TYPE_CHECKING, submodule vs name, circles and how they are printed."""
    files = {
        "pa/__init__.py": "from pa.one import thing\n",
        "pa/one.py": ("from typing import TYPE_CHECKING\n"
                      "from . import two\n"
                      "if TYPE_CHECKING:\n"
                      "    from pb import late\n"
                      "thing = 1\n"),
        "pa/two.py": "def f():\n    from pa import thing\n    return thing\n",
        "pb/__init__.py": "",
        "pb/late.py": "import pa.one\n",
        "pb/free.py": "import os\nfrom . import late\n",
        "pa/sub/__init__.py": "from ..two import f\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    modules, imports = import_graph(tmp_path, ("pa", "pb"))
    assert set(modules) == {"pa", "pa.one", "pa.two", "pa.sub", "pb", "pb.late", "pb.free"}
    edges = {(i.source, i.target, i.where, i.type_only) for i in imports}
    assert edges == {
        ("pa", "pa.one", "module level", False),
        ("pa.one", "pa.two", "module level", False),
        ("pa.one", "pb.late", "module level", True),
        ("pa.two", "pa", "in def f", False),
        ("pb.late", "pa.one", "module level", False),
        ("pb.free", "pb.late", "module level", False),
        ("pa.sub", "pa.two", "module level", False),
    }
    [circle] = import_circles(imports)  # pb.late <-> pa.one, under TYPE_CHECKING, counts
    assert circle.splitlines()[0] == ("import circle among 4 module(s): pa, pa.one, pa.two,"
                                      " pb.late")
    assert "pa.one -> pb.late: pa/one.py:4 (module level, under TYPE_CHECKING)" in circle
    assert "  pa -> pa.one -> pa.two -> pa" in circle
    assert "pa.two -> pa: pa/two.py:2 (in def f)" in circle
    [bad] = layer_violations(imports, {"pa": ("pb",)})
    assert bad.startswith("pa/one.py:4 (module level, under TYPE_CHECKING): pa.one imports"
                          " pb.late")
    (tmp_path / "pb" / "big.py").write_text('"""Big."""\n' + "x = 1\n" * MAX_LINES)
    (tmp_path / "pb" / "why.py").write_text(
        '"""Big.\n\nWhy this file is long: a table.\n"""\n' + "x = 1\n" * MAX_LINES)
    modules = find_modules(tmp_path, ("pb",))
    assert long_files(tmp_path, modules) == [
        f"pb/big.py: {MAX_LINES + 1} lines (limit {MAX_LINES}), and its module docstring"
        f" has no line starting {LONG_REASON!r}"]

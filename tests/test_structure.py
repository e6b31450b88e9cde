"""The package's structure: no import cycle among its modules.

Every `import` and `from ... import` of every module is read with `ast`, those
inside functions included (a lazy import is still a dependency: calling the
function imports the module, and a cycle through one is a cycle of concerns).
Imports under `if TYPE_CHECKING:` are left out: they never run. Importing a
submodule also runs its packages' `__init__`, so `a.b.c` depends on `a.b` too.
"""

from __future__ import annotations

import ast
import os

import keras_weightwatch

PACKAGE = "keras_weightwatch"
ROOT = os.path.dirname(keras_weightwatch.__file__)


def _modules() -> dict[str, str]:
    """Module name -> file, for every module of the package."""
    out = {}
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), ROOT)[: -len(".py")]
                parts = [PACKAGE, *rel.split(os.sep)]
                if parts[-1] == "__init__":
                    parts.pop()
                out[".".join(parts)] = os.path.join(folder, name)
    return out


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _imported(module: str, path: str, known: set[str]) -> set[str]:
    """The package's modules that `module` imports (anywhere in its file)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    skip = _type_checking_lines(tree)
    is_pkg = path.endswith("__init__.py")
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    names: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = ".".join(base[: len(base) - node.level + 1])
                target = f"{parent}.{node.module}" if node.module else parent
            else:
                target = node.module or ""
            names.add(target)
            names.update(f"{target}.{a.name}" for a in node.names)  # `from . import demo`
    out = set()
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # the module and every package above it
            candidate = ".".join(parts[:i])
            if candidate in known and candidate != module:
                out.add(candidate)
    # A module's own packages run first; an edge to them is not a dependency of its code.
    return {m for m in out if not module.startswith(m + ".")}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {m: _imported(m, path, known) for m, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_graph_reader_sees_lazy_and_relative_imports():
    graph = import_graph()
    # cli imports demo inside its demo command, and the comparison lazily inside diff
    assert "keras_weightwatch.demo" in graph["keras_weightwatch.cli"]
    assert "keras_weightwatch.diff_images" in graph["keras_weightwatch.cli"]
    assert "keras_weightwatch.features" in graph["keras_weightwatch.compare.features"]
    assert "keras_weightwatch.cli" not in graph["keras_weightwatch.demo"]
    # the cycle finder finds a planted one
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


MAX_FUNCTION_LINES = 100
ARCHITECTURE = os.path.join(os.path.dirname(ROOT), "docs", "ARCHITECTURE.md")


def _function_lengths() -> list[tuple[int, str]]:
    out = []
    for module, path in _modules().items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                out.append((length, f"{module}.{node.name}"))
    return out


def test_no_function_or_method_is_longer_than_100_lines():
    lengths = _function_lengths()
    too_long = sorted(item for item in lengths if item[0] > MAX_FUNCTION_LINES)
    assert not too_long, too_long
    assert len(lengths) > 100  # the reader found the package's functions


def test_the_architecture_page_names_exactly_the_package_modules():
    import re

    with open(ARCHITECTURE, encoding="utf-8") as f:
        named = set(re.findall(r"`(keras_weightwatch/[\w/]+\.py)`", f.read()))
    package = os.path.dirname(ROOT)
    files = {os.path.relpath(p, package).replace(os.sep, "/") for p in _modules().values()}
    assert named - files == set(), "named in docs/ARCHITECTURE.md but missing"
    assert files - named == set(), "modules that docs/ARCHITECTURE.md does not name"

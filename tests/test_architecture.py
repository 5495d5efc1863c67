"""The library's import rules, checked from the source (docs/architecture.md, "Rules").

Every ``.py`` under ``taskvec_jax/`` is parsed with :mod:`ast` (nothing is imported):

* no import cycle among ``taskvec_jax`` modules, counting module-level AND function-level
  imports (a function-level import only hides a cycle until the function runs);
* every imported ``taskvec_jax`` module exists (an editable install elsewhere on
  ``sys.path`` can otherwise hide a stale import);
* no module uses another module's underscore name (``from X import _name``,
  ``import X._name``, ``X._name``). A private module (``_checks.py``, ``training/_engine.py``,
  ``merging/_select.py``) may be imported by the modules of the package that holds it, and
  its functions carry no underscore: ``from taskvec_jax import _checks`` then
  ``_checks.positive_int`` is fine anywhere in the library.

Violations are reported with ``file:line`` so that they can be fixed from the message.
Run ``python tests/test_architecture.py ROOT`` to check another checkout (e.g. an old commit).
"""

from __future__ import annotations

import ast
import os
import sys
from typing import NamedTuple

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "taskvec_jax"


class Edge(NamedTuple):
    target: str   # the imported taskvec_jax module
    line: int
    where: str    # "module" or "function"


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def modules(root: str = ROOT) -> dict[str, str]:
    """``{dotted module name: file path}`` for every .py under ``root/taskvec_jax``."""
    out = {}
    base = os.path.join(root, PACKAGE)
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for f in sorted(filenames):
            if not f.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), root)[:-3].split(os.sep)
            if rel[-1] == "__init__":
                rel = rel[:-1]
            out[".".join(rel)] = os.path.join(dirpath, f)
    return out


def _package_of(module: str, path: str) -> str:
    return module if path.endswith("__init__.py") else module.rpartition(".")[0]


def _ancestors(module: str) -> set[str]:
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def _private_allowed(importer: str, importer_path: str, target: str) -> bool:
    """A private module ``P._m`` (or anything under it) may be used by modules under ``P``."""
    parts = target.split(".")
    for i, part in enumerate(parts):
        if _is_private(part):
            owner = ".".join(parts[:i])
            return importer == owner or importer.startswith(owner + ".")
    return True


class _Visitor(ast.NodeVisitor):
    def __init__(self, module: str, path: str, known: dict[str, str], root: str):
        self.module, self.path, self.known, self.root = module, path, known, root
        self.package = _package_of(module, path)
        self.edges: list[Edge] = []
        self.violations: list[str] = []
        self.aliases: dict[str, str] = {}   # local name -> taskvec_jax module it is bound to
        self.depth = 0

    # -- helpers
    def _where(self) -> str:
        return "function" if self.depth else "module"

    def _bad(self, node, what: str) -> None:
        self.violations.append(f"{os.path.relpath(self.path, self.root)}:"
                               f"{node.lineno}: {what}")

    def _edge(self, target: str, node, *, needs_body: bool = False) -> None:
        # Importing a.b.c imports a, a.b, a.b.c. Packages that contain the importer are
        # already initializing, so they add no edge unless a NAME is taken from their body.
        parts = target.split(".")
        mine = _ancestors(self.module) | {self.module}
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            if name not in self.known or name == self.module:
                continue
            if name in mine and not (needs_body and i == len(parts)):
                continue
            self.edges.append(Edge(name, node.lineno, self._where()))

    def _resolve(self, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = self.package.split(".")
        base = base[:len(base) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))

    # -- scopes
    def visit_FunctionDef(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef
    visit_Lambda = visit_FunctionDef

    # -- imports
    def visit_Import(self, node: ast.Import):
        for alias in node.names:
            if not (alias.name == PACKAGE or alias.name.startswith(PACKAGE + ".")):
                continue
            if alias.name not in self.known:
                self._bad(node, f"imports {alias.name}, which does not exist")
            self._edge(alias.name, node)
            if not _private_allowed(self.module, self.path, alias.name):
                self._bad(node, f"imports private module {alias.name}")
            self.aliases[alias.asname or alias.name.split(".")[0]] = (
                alias.name if alias.asname else alias.name.split(".")[0])

    def visit_ImportFrom(self, node: ast.ImportFrom):
        source = self._resolve(node)
        if not (source == PACKAGE or source.startswith(PACKAGE + ".")):
            return
        if source not in self.known:
            self._bad(node, f"imports from {source}, which does not exist")
            return
        if not _private_allowed(self.module, self.path, source):
            self._bad(node, f"imports from private module {source}")
        for alias in node.names:
            full = f"{source}.{alias.name}"
            if full in self.known:   # a submodule
                self._edge(full, node)
                if not _private_allowed(self.module, self.path, full):
                    self._bad(node, f"imports private module {full}")
                self.aliases[alias.asname or alias.name] = full
            else:                    # a name defined in source's body
                self._edge(source, node, needs_body=True)
                if _is_private(alias.name):
                    self._bad(node, f"imports underscore name {alias.name} from {source}")

    # -- attribute access on imported modules: X._name
    def visit_Attribute(self, node: ast.Attribute):
        chain, cur = [], node
        while isinstance(cur, ast.Attribute):
            chain.append(cur.attr)
            cur = cur.value
        if isinstance(cur, ast.Name) and cur.id in self.aliases:
            dotted = self.aliases[cur.id]
            for attr in reversed(chain):
                full = f"{dotted}.{attr}"
                if _is_private(attr):
                    if full in self.known and _private_allowed(self.module, self.path, full):
                        dotted = full
                        continue
                    self._bad(node, f"uses underscore name {dotted}.{attr}")
                    break
                if full not in self.known:
                    break
                dotted = full
            return  # the chain is handled; do not revisit its inner nodes
        self.generic_visit(node)


def analyse(root: str = ROOT):
    """Returns ``(graph, violations)``: ``graph[module] = [Edge, ...]`` and
    ``violations[path] = ["file:line: ...", ...]``."""
    known = modules(root)
    graph, violations = {}, {}
    for module, path in known.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
        v = _Visitor(module, path, known, root)
        v.visit(tree)
        graph[module] = v.edges
        violations[os.path.relpath(path, root)] = v.violations
    return graph, violations


def cycles(graph: dict[str, list[Edge]], root: str = ROOT) -> list[str]:
    """Every elementary cycle found by DFS, each rendered with the file:line of its edges."""
    known = modules(root)
    found, seen_keys = [], set()
    color: dict[str, int] = {}
    stack: list[tuple[str, Edge | None]] = []

    def visit(m: str):
        color[m] = 1
        for e in graph.get(m, []):
            stack.append((m, e))
            if color.get(e.target) == 1:
                start = next(i for i, (n, _) in enumerate(stack) if n == e.target)
                loop = stack[start:]
                key = frozenset((n, x.target) for n, x in loop)
                if key not in seen_keys:
                    seen_keys.add(key)
                    found.append(" -> ".join(
                        f"{n} ({os.path.relpath(known[n], root)}:{x.line}, {x.where}-level)"
                        for n, x in loop) + f" -> {e.target}")
            elif color.get(e.target) is None:
                visit(e.target)
            stack.pop()
        color[m] = 2

    for m in sorted(graph):
        if color.get(m) is None:
            visit(m)
    return found


_GRAPH, _VIOLATIONS = analyse()


def test_the_source_tree_is_found():
    mods = modules()
    assert f"{PACKAGE}" in mods and f"{PACKAGE}.tree" in mods and len(mods) > 20


def test_no_import_cycle():
    found = cycles(_GRAPH)
    assert not found, "import cycles:\n" + "\n".join(found)


@pytest.mark.parametrize("path", sorted(_VIOLATIONS))
def test_no_underscore_name_of_another_module(path):
    assert not _VIOLATIONS[path], "\n".join(_VIOLATIONS[path])


def test_the_checker_catches_what_it_should(tmp_path):
    # A cycle through a function-level import, and the three forms of private use.
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from taskvec_jax import b\n")
    (pkg / "b.py").write_text("from taskvec_jax.a import f\n_x = 1\n")
    (pkg / "c.py").write_text("from taskvec_jax.b import _x\nfrom taskvec_jax import b\n"
                              "y = b._x\nfrom taskvec_jax.sub import _eng\n")
    (pkg / "sub" / "__init__.py").write_text("from taskvec_jax.sub import _eng\n"
                                             "z = _eng.run\n")
    (pkg / "sub" / "_eng.py").write_text("run = 1\n")
    (pkg / "sub" / "ok.py").write_text("from taskvec_jax.sub import _eng\n"
                                       "from taskvec_jax.sub._eng import run\n")
    graph, violations = analyse(str(tmp_path))
    found = cycles(graph, str(tmp_path))
    assert len(found) == 1 and "a.py:2, function-level" in found[0], found
    bad = violations[os.path.join(PACKAGE, "c.py")]
    assert any("c.py:1:" in v and "_x" in v for v in bad), bad
    assert any("c.py:3:" in v and "b._x" in v for v in bad), bad
    assert any("c.py:4:" in v and "_eng" in v for v in bad), bad
    assert not violations[os.path.join(PACKAGE, "sub", "__init__.py")]
    assert not violations[os.path.join(PACKAGE, "sub", "ok.py")]


if __name__ == "__main__":  # python tests/test_architecture.py [ROOT]
    root = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else ROOT)
    graph, violations = analyse(root)
    problems = cycles(graph, root) + [v for vs in violations.values() for v in vs]
    print("\n".join(problems) or "no violations")
    sys.exit(1 if problems else 0)

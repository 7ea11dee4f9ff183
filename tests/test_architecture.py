"""The architecture's done-when checks, kept true: no import cycle in the package, no module
over ~450 lines, and no code outside the optimizer's package reading an underscore attribute
of zeroshard's objects (tests, bench and examples use the public API), and test modules
that share helpers through helper modules, never through each other."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "zeroshard"
MAX_LINES = 470  # "a few hundred lines each, none over ~450"


def _modules() -> dict[str, Path]:
    mods = {}
    for f in PACKAGE.rglob("*.py"):
        parts = list(f.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


def _imports(mod: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Modules `mod` imports at import time (TYPE_CHECKING blocks and function bodies are
    not run then); its own ancestor packages are already initialised, so not edges."""
    is_pkg = path.name == "__init__.py"
    deps: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.ImportFrom):
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                if node.level > 1:
                    base = base[: len(base) - node.level + 1]
                if node.level:
                    name = ".".join(base + ([node.module] if node.module else []))
                else:
                    name = node.module or ""
                deps.update(n for n in [name, *(f"{name}.{a.name}" for a in node.names)]
                            if n in mods)  # fmt: skip
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in mods)
            elif isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(node.orelse)

    visit(ast.parse(path.read_text()).body)
    for d in list(deps):  # importing a.b.c initialises a.b first
        while "." in d:
            d = d.rsplit(".", 1)[0]
            if d in mods:
                deps.add(d)
    return {d for d in deps if d != mod and not mod.startswith(d + ".")}


def test_import_graph_has_no_cycle():
    mods = _modules()
    graph = {m: _imports(m, p, mods) for m, p in mods.items()}
    assert "zeroshard.stage3.build" in graph["zeroshard.initialize"]  # the walk sees edges
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def dfs(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep) :] + [dep])
            elif dep not in state:
                dfs(dep, stack)
        stack.pop()
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            dfs(m, [])
    assert cycles == []


def test_no_module_is_over_the_size_limit():
    sizes = {str(f.relative_to(REPO)): len(f.read_text().splitlines())
             for f in PACKAGE.rglob("*.py")}  # fmt: skip
    assert {f: n for f, n in sizes.items() if n > MAX_LINES} == {}


# `a.b._name`, unless the chain starts at self/cls or a module we do not own (torch, os, ...)
_PRIVATE = re.compile(r"(?<![\w.])([A-Za-z_][\w.]*?)\._[a-z]\w*")
_ALLOWED_ROOTS = {"self", "cls", "torch", "dist", "os", "ctx"}


def test_nothing_outside_the_package_reads_private_attributes():
    offenders = []
    for folder in ("tests", "bench", "examples"):
        for f in (REPO / folder).rglob("*.py"):
            if f.name in ("dist_pool.py", Path(__file__).name):
                continue
            for i, line in enumerate(f.read_text().splitlines(), 1):
                code = line.split("#")[0]
                for m in _PRIVATE.finditer(code):
                    if m.group(1).split(".")[0] in _ALLOWED_ROOTS:
                        continue
                    offenders.append(f"{f.relative_to(REPO)}:{i}: {m.group(0)}")
    assert offenders == []


def test_test_modules_share_helpers_not_each_other():
    """Shared jobs and references live in helper modules (tests/*_jobs.py, models.py, ...);
    a test module never imports another test module."""
    offenders = []
    for f in sorted((REPO / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                leaf = node.module.rsplit(".", 1)[-1]
                if node.module.startswith("tests") and leaf.startswith("test_"):
                    offenders.append(f"{f.relative_to(REPO)}: from {node.module}")
    assert offenders == []

"""The layout shows the architecture, and keeps showing it: checked from the source.

* ``bai_scheduler/core/`` imports only ``core/`` and the standard library;
* no import circle anywhere (deferred imports inside functions count too);
* one-way dependency: the service never imports ``bai_spawner``; the spawner uses only the
  shared contract (``bai_scheduler.contract``) and the units;
* the web layer: module-level handlers, each module exports ``default_handlers``, none
  imports the app (they reach it through ``self.settings``);
* no HTML in Python strings (pages are templates).
"""
from __future__ import annotations

import ast
import importlib
import re
import sys
from pathlib import Path

import pytest

from helpers import ROOT

PACKAGES = ("bai_scheduler", "bai_spawner", "hub_config")


def module_files() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


MODULES = module_files()


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def imports_of(name: str) -> set[str]:
    """Every module ``name`` imports, anywhere in its file, resolved to modules of ours or to
    top-level names of others."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if is_package(name) else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            if target == "__future__":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in MODULES else target)
    return out


def our_imports(name: str) -> set[str]:
    """The modules of ours ``name`` imports (a module's packages count as imported with it)."""
    out = set()
    for target in imports_of(name):
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix in MODULES and prefix != name:
                out.add(prefix)
    return out


def test_every_module_is_found():
    assert {"bai_scheduler.core.units", "bai_scheduler.web.api", "bai_scheduler.contract.options",
            "bai_spawner.spawner"} <= set(MODULES)


def test_core_imports_only_core_and_the_standard_library():
    stdlib = set(sys.stdlib_module_names)
    bad = {}
    for name in MODULES:
        if not name.startswith("bai_scheduler.core"):
            continue
        for target in imports_of(name):
            ok = target.startswith("bai_scheduler.core") or target.split(".")[0] in stdlib
            if not ok:
                bad.setdefault(name, []).append(target)
    assert not bad, f"core/ must stay pure (core and the standard library only): {bad}"


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the import circles (components of more than one module, or a self-import)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circle_anywhere():
    graph = {name: our_imports(name) for name in MODULES}
    assert strongly_connected(graph) == []


def test_the_circle_finder_finds_circles():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"a"}}) == [["a"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_dependencies_go_one_way_spawner_to_contract():
    for name in MODULES:
        targets = imports_of(name)
        if name.startswith("bai_scheduler"):
            assert not [t for t in targets if t.startswith("bai_spawner")], f"{name} imports the spawner"
        if name.startswith("bai_spawner"):
            used = {t for t in targets if t.startswith("bai_scheduler")}
            allowed = {t for t in used if t.startswith("bai_scheduler.contract") or t == "bai_scheduler.core.units"}
            assert used == allowed, f"{name} reaches past the contract: {sorted(used - allowed)}"


WEB = sorted(n for n in MODULES if n.startswith("bai_scheduler.web.") and n != "bai_scheduler.web.base")


@pytest.mark.parametrize("name", WEB)
def test_web_modules_export_default_handlers_and_never_import_the_app(name):
    module = importlib.import_module(name)
    assert module.default_handlers, name
    for path, handler in module.default_handlers:
        assert isinstance(path, str) and not path.startswith("/"), (name, path)  # relative to the prefix
        assert handler.__module__ == name and handler.__qualname__ == handler.__name__, handler  # module-level
    assert "bai_scheduler.app" not in our_imports(name)


def test_no_class_is_built_inside_a_function():
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = [n.name for n in ast.walk(node) if isinstance(n, ast.ClassDef)]
                assert not inner, f"{name}.{node.name} builds classes {inner}: make them module-level"


HTML = re.compile(r"<\s*/?\s*(div|span|option|optgroup|select|input|form|table|tr|td|script|style|a|p|ul|li|h[1-6]|i)\b[^>]*>",
                  re.I)


def docstrings(tree) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def test_no_html_in_python_strings():
    found = []
    for name, path in MODULES.items():
        if name.startswith("hub_config"):  # the deployment's config, not pages
            continue
        tree = ast.parse(path.read_text())
        skip = docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
                if HTML.search(node.value):
                    found.append(f"{name}:{node.lineno}: {node.value[:60]!r}")
    assert not found, "HTML belongs in templates:\n" + "\n".join(found)


def test_the_html_finder_finds_html():
    assert HTML.search('<div class="alert">') and HTML.search("</option>") and not HTML.search("a <= b > c")

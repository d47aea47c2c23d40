"""The package's modules import each other without cycles, and the engine's backends stay behind its dispatcher.

Module-level imports count, those under ``if TYPE_CHECKING:`` too (a type-only cycle is still two
modules that each need the other); imports inside functions are deliberate deferrals and do not.
"""

from __future__ import annotations

import ast
from pathlib import Path

import gmt_plugins

PACKAGE = Path(gmt_plugins.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(tree: ast.Module, name: str, is_package: bool) -> set[str]:
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.If):  # TYPE_CHECKING blocks and other module-level conditions
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)

    visit(tree.body)
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        imported = top_level_imports(ast.parse(path.read_text()), name, path.name == "__init__.py")
        # "from gmt_plugins import hookspecs" names the module gmt_plugins.hookspecs, not the package's __init__
        edges[name] = {m for m in imported if m in modules and m != name and not (m == "gmt_plugins" and f"{m}." in str(imported))}
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := walk(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := walk(node)):
            return cycle
    return None


def test_no_import_cycles_between_modules():
    edges = graph()
    edges.pop("gmt_plugins", None)  # __init__ re-exports everything (lazily for the heavy parts)
    for deps in edges.values():
        deps.discard("gmt_plugins")
    cycle = find_cycle(edges)
    assert cycle is None, " -> ".join(cycle)


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


BACKENDS = ("gmt_plugins.engine.cpu", "gmt_plugins.engine.cuda", "ctypes")


def all_imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (functions included)."""
    name = module_name(path)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: -node.level] if path.name != "__init__.py" else name.split(".")[: len(name.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def test_no_strategy_or_integration_reaches_past_the_dispatcher():
    """Strategies, the masker and the integrations say what to mask; which backend does it is the
    engine's business: none of them imports the CPU kernel, the CUDA path or ctypes."""
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        if path.is_relative_to(PACKAGE / "engine"):
            continue
        bad = sorted(m for m in all_imports(path) if m.startswith(BACKENDS))
        if bad:
            offenders[module_name(path)] = bad
    assert offenders == {}


def test_only_the_dispatcher_calls_the_loader():
    callers = sorted(
        module_name(p) for p in PACKAGE.rglob("*.py")
        if "loader.library(" in p.read_text() and module_name(p) != "gmt_plugins.engine.cpu.loader"
    )
    assert callers == ["gmt_plugins.engine.dispatch"]


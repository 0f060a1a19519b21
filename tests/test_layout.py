"""The package's layering, read from the source with :mod:`ast` (nothing is imported).

* ``metaplast.core`` is plain torch: no Lightning, Hydra, OmegaConf or W&B, and nothing from
  ``metaplast.run``, ``metaplast.analysis`` or ``metaplast.data``;
* ``metaplast.analysis`` never imports ``metaplast.run``;
* the entry-point modules (the console scripts) never import one another;
* the import graph inside ``metaplast`` has no cycle.

Every import counts, also one deferred into a function body or under ``if TYPE_CHECKING:``: it is
still a dependency (only the import-time cycle check leaves those out).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "metaplast"

#: The modules behind the console scripts of pyproject.toml's [project.scripts].
ENTRY_POINTS = (
    "metaplast.run.train",
    "metaplast.run.evaluate",
    "metaplast.analysis.report",
    "metaplast.analysis.sweep",
    "metaplast.bench",
)
CORE_FORBIDDEN = (
    "lightning",
    "pytorch_lightning",
    "hydra",
    "omegaconf",
    "wandb",
    "metaplast.run",
    "metaplast.analysis",
    "metaplast.data",
)


@dataclass(frozen=True)
class Import:
    target: str  # the module imported, as precisely as the source names it
    line: int
    deferred: bool  # inside a function body (or ``if TYPE_CHECKING:``): not run at import time

    def within(self, prefix: str) -> bool:
        return self.target == prefix or self.target.startswith(prefix + ".")


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


#: Every module of the package: name -> source file.
MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def in_group(name: str, group: str) -> bool:
    return name == group or name.startswith(group + ".")


def group_modules(group: str) -> list[str]:
    return [name for name in MODULES if in_group(name, group)]


class _Collector(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool):
        self.module, self.is_package = module, is_package
        self.imports: list[Import] = []
        self.depth = 0  # how many function bodies enclose the node visited

    def add(self, target: str, node: ast.AST) -> None:
        self.imports.append(Import(target, node.lineno, self.depth > 0))

    def visit_FunctionDef(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_Lambda = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        """``if TYPE_CHECKING:`` imports are never run, so they count as deferred too."""
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        ):
            self.depth += 1
            for child in node.body:
                self.visit(child)
            self.depth -= 1
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:  # relative: resolved against this module's package
            package = self.module.split(".") if self.is_package else self.module.split(".")[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join([*package, *([node.module] if node.module else [])])
        else:
            base = node.module or ""
        for alias in node.names:
            # ``from metaplast.core import fused`` imports the module metaplast.core.fused
            submodule = f"{base}.{alias.name}"
            self.add(submodule if submodule in MODULES else base, node)

    def visit_Call(self, node: ast.Call) -> None:
        """``importlib.import_module("x")`` and ``__import__("x")`` with a literal name."""
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if (
            name in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            self.add(node.args[0].value, node)
        self.generic_visit(node)


def imports_of(module: str) -> list[Import]:
    path = MODULES[module]
    collector = _Collector(module, path.name == "__init__.py")
    collector.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return collector.imports


IMPORTS = {module: imports_of(module) for module in MODULES}


def offending(module: str, forbidden: Iterable[str]) -> list[str]:
    forbidden = tuple(forbidden)
    found = {
        f"{MODULES[module].relative_to(SRC.parent)}:{imp.line} imports {imp.target}"
        + (" (inside a function)" if imp.deferred else "")
        for imp in IMPORTS[module]
        if any(imp.within(prefix) for prefix in forbidden)
    }
    return sorted(found)


def graph(*, deferred: bool) -> dict[str, set[str]]:
    """Module -> the metaplast modules it imports (each import resolved to a module of the package)."""
    edges: dict[str, set[str]] = {module: set() for module in MODULES}
    for module, imports in IMPORTS.items():
        for imp in imports:
            if imp.deferred and not deferred:
                continue
            target = imp.target
            while target and target not in MODULES:  # ``import metaplast.x.name``: the module metaplast.x
                target = target.rpartition(".")[0]
            if target and target != module:
                edges[module].add(target)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``edges`` as [a, b, ..., a], or None (iterative depth-first search)."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(edges, WHITE)
    for root in sorted(edges):
        if colour[root] != WHITE:
            continue
        path, stack = [root], [iter(sorted(edges[root]))]
        colour[root] = GREY
        while stack:
            child = next(stack[-1], None)
            if child is None:
                colour[path.pop()] = BLACK
                stack.pop()
            elif colour[child] == GREY:
                return [*path[path.index(child) :], child]
            elif colour[child] == WHITE:
                colour[child] = GREY
                path.append(child)
                stack.append(iter(sorted(edges[child])))
    return None


def describe(cycle: list[str]) -> str:
    steps = []
    for a, b in zip(cycle, cycle[1:]):
        lines = sorted({(imp.line, imp.deferred) for imp in IMPORTS[a] if imp.within(b)})
        where = ", ".join(f"line {line}" + (" in a function" if deferred else "") for line, deferred in lines)
        steps.append(f"{a} -> {b} ({MODULES[a].relative_to(SRC.parent)}: {where})")
    return "import cycle:\n  " + "\n  ".join(steps)


# --- the checker itself ------------------------------------------------------------------------


def test_the_package_is_found_and_parsed():
    for name in ("metaplast", "metaplast.core", "metaplast.run", "metaplast.analysis", *ENTRY_POINTS):
        assert name in MODULES, name
    assert len(group_modules("metaplast.core")) > 3
    assert Import("metaplast.core.terms", 1, False) in [
        Import(imp.target, 1, False) for imp in IMPORTS["metaplast.core.rules"]
    ]


def test_relative_imports_and_cycles_are_resolved():
    collector = _Collector("metaplast.core.rules", is_package=False)
    source = (
        "from . import terms\nfrom ..run import config\nfrom .. import nothing\ndef f():\n    import wandb\n"
        "if TYPE_CHECKING:\n    import hydra\nelse:\n    import omegaconf\n"
    )
    collector.visit(ast.parse(source))
    assert collector.imports == [
        Import("metaplast.core.terms", 1, False),
        Import("metaplast.run.config", 2, False),
        Import("metaplast", 3, False),
        Import("wandb", 5, True),
        Import("hydra", 7, True),
        Import("omegaconf", 9, False),
    ]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


# --- the rules ---------------------------------------------------------------------------------


@pytest.mark.parametrize("module", group_modules("metaplast.core"))
def test_core_is_plain_torch(module):
    assert not offending(module, CORE_FORBIDDEN)


@pytest.mark.parametrize("module", group_modules("metaplast.analysis"))
def test_analysis_never_imports_the_runner(module):
    assert not offending(module, ["metaplast.run"])


ENTRY_POINT_VIOLATIONS: dict[str, str] = {}


@pytest.mark.parametrize(
    "module",
    [
        pytest.param(
            module,
            marks=pytest.mark.xfail(strict=True, reason=ENTRY_POINT_VIOLATIONS[module]),
        )
        if module in ENTRY_POINT_VIOLATIONS
        else module
        for module in ENTRY_POINTS
    ],
)
def test_entry_points_do_not_import_one_another(module):
    assert not offending(module, [other for other in ENTRY_POINTS if other != module])


def test_no_import_cycle_at_import_time():
    """Module-level imports only: a cycle here can break ``import metaplast...`` outright."""
    cycle = find_cycle(graph(deferred=False))
    assert cycle is None, describe(cycle)


def test_no_import_cycle():
    """Every import, deferred ones too: the package's modules form a directed acyclic graph."""
    cycle = find_cycle(graph(deferred=True))
    assert cycle is None, describe(cycle)

"""import-linter contract types that read the tree under its installed names (pyproject's [tool.importlinter]).

On disk `server/` is the top-level package `server`; installed, it is `moshi_ttt.server` (pyproject's
[tool.setuptools.package-dir]). grimp reads the disk and drops an import spelled `moshi_ttt.server.X`, as no
folder `moshi_ttt/server` exists, so such an import would escape every contract. Each type here first adds
those imports to a copy of the graph as the imports of `server.X` they are (option `installed_names`, one
`"installed: on-disk"` pair per renamed package), then checks the copy as the built-in type does: an upward
import breaks the contract under either spelling.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
from pathlib import Path

import grimp
from importlinter.contracts.acyclic_siblings import AcyclicSiblingsContract
from importlinter.contracts.forbidden import ForbiddenContract
from importlinter.contracts.layers import LayersContract
from importlinter.domain import fields
from importlinter.domain.contract import ContractCheck


def _pairs(raw: list[str]) -> dict[str, str]:
    """["moshi_ttt.server: server"] -> {"moshi_ttt.server": "server"}."""
    out = {}
    for item in raw:
        installed, _, disk = (s.strip() for s in item.partition(":"))
        if not installed or not disk:
            raise ValueError(f"installed_names: expected 'installed: on-disk', got {item!r}")
        out[installed] = disk
    return out


def _source_of(module: str) -> Path | None:
    root, *rest = module.split(".")
    spec = importlib.util.find_spec(root)  # a top-level name: found, not imported
    if spec is None or not spec.submodule_search_locations:
        return None
    base = Path(next(iter(spec.submodule_search_locations))).joinpath(*rest)
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path
    return None


def _renamed(name: str, names: dict[str, str]) -> str | None:
    for installed, disk in names.items():
        if name == installed or name.startswith(installed + "."):
            return disk + name[len(installed):]
    return None


def _known(name: str, modules: set[str]) -> str | None:
    """The module `name` names, or its closest enclosing module in the graph (`a.b.attr` -> `a.b`)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def installed_imports(graph: grimp.ImportGraph, names: dict[str, str]) -> list[tuple[str, str, int, str]]:
    """(importer, imported on disk, line number, line) of every import spelled with an installed name."""
    modules, found = set(graph.modules), []
    for module in sorted(modules):
        path = _source_of(module)
        if path is None:
            continue
        text = path.read_text(encoding="utf-8")
        if not any(installed in text for installed in names):
            continue
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text, str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [f"{node.module}.{a.name}" for a in node.names]
            for target in targets:
                disk = _renamed(target, names)
                imported = disk and _known(disk, modules)
                if imported and imported != module:
                    found.append((module, imported, node.lineno, lines[node.lineno - 1].strip()))
    return found


def with_installed_imports(graph: grimp.ImportGraph, raw_names: list[str]) -> grimp.ImportGraph:
    """A copy of `graph` with the imports spelled with installed names added under their on-disk names."""
    graph = copy.deepcopy(graph)
    for importer, imported, line_number, line in installed_imports(graph, _pairs(raw_names)):
        graph.add_import(importer=importer, imported=imported, line_number=line_number, line_contents=line)
    return graph


class _Installed:
    """Checks a copy of the graph with the imports spelled with `installed_names` added."""

    installed_names = fields.ListField(subfield=fields.StringField())

    def check(self, graph: grimp.ImportGraph, verbose: bool) -> ContractCheck:
        return super().check(with_installed_imports(graph, self.installed_names), verbose)


class InstalledLayersContract(_Installed, LayersContract):
    """`layers`, with imports spelled with installed names counted."""

    type_name = "installed_layers"


class InstalledAcyclicSiblingsContract(_Installed, AcyclicSiblingsContract):
    """`acyclic_siblings`, with imports spelled with installed names counted."""

    type_name = "installed_acyclic_siblings"


class InstalledForbiddenContract(_Installed, ForbiddenContract):
    """`forbidden`, with imports spelled with installed names counted."""

    type_name = "installed_forbidden"

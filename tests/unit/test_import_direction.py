"""Every arrow between the rooms points the way docs/architecture.md draws it.

An AST check over the source tree, without importing it: module-level imports, imports inside
functions (hidden imports were how the arrows went wrong before) and ``import_module("...")``
calls with a literal name all count; a private name (leading underscore) of one room imported
by another is a violation too. There is no allow-list: the restructuring (issue 15) moved the
last violation away.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: The installed rooms: source folder -> import name under ``fleetbus.``.
ROOMS = (
    "bus",
    "cli",
    "devtools",
    "kmesim",
    "observability",
    "processors",
    "providers",
    "sdk",
)
#: Folders outside the product (not installed): they may import any room.
OUTER = ("bench", "fuzz", "scripts", "tests")

#: Rooms each room may not import (itself is always fine).
FORBIDDEN: dict[str, frozenset[str]] = {
    "bus": frozenset(ROOMS) - {"bus"},
    "providers": frozenset({"processors", "sdk", "cli", "devtools", "kmesim"}),
    "sdk": frozenset({"processors", "cli", "devtools", "kmesim"}),
    "processors": frozenset({"cli", "devtools", "kmesim"}),
    "observability": frozenset(ROOMS) - {"observability"},  # but fleetbus.bus.errors, below
    "kmesim": frozenset({"cli", "devtools", "processors", "sdk"}),
    "devtools": frozenset({"cli"}),
    "cli": frozenset(),
}
#: What observability may import of another room: the errors, and the lazy-export helper its
#: ``__init__`` shares with every package.
OBSERVABILITY_MAY_IMPORT = ("fleetbus.bus.errors", "fleetbus.bus.exports")


@dataclass(frozen=True)
class Edge:
    path: str  # relative to the repository root
    line: int
    module: str  # the imported module (or package) name


def _room_of(path: Path) -> str:
    return path.relative_to(ROOT).parts[0]


def _package_of(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    else:
        parts.pop()  # the module itself: relative imports start at its package
    return ".".join(["fleetbus", *parts])


def _imports(path: Path) -> Iterator[Edge]:
    rel = path.relative_to(ROOT).as_posix()
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
    return _edges(tree, rel, _package_of(path))


def _edges(tree: ast.AST, rel: str, package: str) -> Iterator[Edge]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Edge(rel, node.lineno, alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            yield Edge(rel, node.lineno, module)
            for alias in node.names:  # ``from fleetbus import bus`` names a room too
                yield Edge(rel, node.lineno, f"{module}.{alias.name}")
        elif (
            isinstance(node, ast.Call)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id == "import_module")
            )
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield Edge(rel, node.lineno, node.args[0].value)


def _sources(*folders: str) -> Iterator[Path]:
    for folder in folders:
        yield from sorted((ROOT / folder).rglob("*.py"))


def _target_room(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "fleetbus" and len(parts) > 1 and parts[1] in ROOMS:
        return parts[1]
    return None


def _test_helper_names() -> frozenset[str]:
    """Top-level import names under which ``tests/`` is importable (``pythonpath``)."""
    names = {"tests"}
    for entry in (ROOT / "tests").iterdir():
        if entry.is_dir() and not entry.name.startswith((".", "_")):
            names.add(entry.name)
        elif entry.suffix == ".py":
            names.add(entry.stem)
    return frozenset(names)


def violations() -> list[tuple[Edge, str]]:
    found: list[tuple[Edge, str]] = []
    for path in _sources(*ROOMS):
        room = _room_of(path)
        for edge in _imports(path):
            target = _target_room(edge.module)
            if target is None or target == room:
                continue
            if room == "observability" and any(
                edge.module == allowed or edge.module.startswith(allowed + ".")
                for allowed in OBSERVABILITY_MAY_IMPORT
            ):
                continue
            if target in FORBIDDEN[room]:
                found.append((edge, f"{room} may not import {target}"))
            elif target in ("devtools", "cli") and room not in ("cli", "devtools"):
                found.append((edge, f"only cli and devtools may import {target}"))
    for path in _sources(*ROOMS, "bench", "fuzz"):
        room = _room_of(path)
        for edge in _imports(path):
            target = _target_room(edge.module)
            if target is not None and target != room and edge.module.split(".")[-1][:1] == "_":
                found.append((edge, f"a private name of {target} crosses into {room}"))
    helpers = _test_helper_names()
    for path in _sources("bench", "fuzz"):
        for edge in _imports(path):
            if edge.module.split(".")[0] in helpers:
                found.append((edge, f"{_room_of(path)} may not import the tests"))
    return found


def test_every_arrow_points_the_documented_way() -> None:
    unexpected = [
        f"{edge.path}:{edge.line} imports {edge.module} ({rule})" for edge, rule in violations()
    ]
    assert unexpected == []


#: Rooms whose code is library code: the OpenTelemetry API only, never the SDK.
API_ONLY_ROOMS = ("bus", "sdk", "processors", "providers", "observability", "kmesim")
#: The one module that sets the SDK up (called by the CLI and tests).
SDK_SETUP = "observability/tracing_setup.py"


@pytest.mark.parametrize("room", API_ONLY_ROOMS)
def test_library_code_uses_the_opentelemetry_api_only(room: str) -> None:
    sdk_imports = [
        f"{edge.path}:{edge.line} imports {edge.module}"
        for path in _sources(room)
        for edge in _imports(path)
        if edge.path != SDK_SETUP
        and (edge.module == "opentelemetry.sdk" or edge.module.startswith("opentelemetry.sdk."))
    ]
    assert sdk_imports == []


def test_the_check_sees_hidden_and_dynamic_imports() -> None:
    """Imports inside functions, relative imports and import_module("...") literals count."""
    source = (
        "import importlib\n"
        "def f():\n"
        "    from fleetbus.processors import stages\n"
        "    from ..cli import main\n"
        "    importlib.import_module('fleetbus.devtools.demo')\n"
    )
    edges = {edge.module for edge in _edges(ast.parse(source), "probe.py", "fleetbus.bus.sub")}
    assert {"fleetbus.processors.stages", "fleetbus.bus.cli.main"} <= edges
    assert "fleetbus.devtools.demo" in edges
    assert _target_room("fleetbus.processors.stages") == "processors"

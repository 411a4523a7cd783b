"""The public surface of each package is small, sorted and pinned: ``__all__`` is what the
package exports, every name in it resolves, and the package's static imports (for type checkers)
and its lazy loader name the same things."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path
from types import ModuleType

import pytest

import fleetbus.bus

#: Every package of the project; fleetbus.sdk is pinned by its own tests (tests/unit/test_sdk*).
PACKAGES = (
    "fleetbus.bus",
    "fleetbus.cli",
    "fleetbus.devtools",
    "fleetbus.kmesim",
    "fleetbus.observability",
    "fleetbus.processors",
    "fleetbus.providers",
)


def _package(name: str) -> ModuleType:
    return importlib.import_module(name)


def test_all_is_sorted_and_importable() -> None:
    names = fleetbus.bus.__all__
    assert list(names) == sorted(names)
    for name in names:
        assert getattr(fleetbus.bus, name) is not None


@pytest.mark.parametrize("name", PACKAGES)
def test_all_is_sorted_unique_and_resolves(name: str) -> None:
    package = _package(name)
    names = list(package.__all__)
    assert names == sorted(names)
    assert len(set(names)) == len(names)
    for public in names:
        value = getattr(package, public)
        assert value is not None
        assert not inspect.ismodule(value), f"{name}.{public} is a module, not an API name"


@pytest.mark.parametrize("name", PACKAGES)
def test_all_equals_what_the_package_exports(name: str) -> None:
    package = _package(name)
    for public in package.__all__:
        getattr(package, public)  # load every lazy name first
    exported = {
        attr
        for attr in dir(package)
        if not attr.startswith("_") and not inspect.ismodule(getattr(package, attr))
    }
    assert exported == set(package.__all__)


@pytest.mark.parametrize("name", PACKAGES)
def test_static_imports_match_the_lazy_loader(name: str) -> None:
    """The ``if TYPE_CHECKING`` imports (what mypy sees) name each public name from the module
    the lazy loader imports it from at run time."""
    package = _package(name)
    assert package.__file__ is not None
    tree = ast.parse(Path(package.__file__).read_text(encoding="utf-8"))
    static: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            for child in node.body:
                if isinstance(child, ast.ImportFrom) and child.module:
                    for alias in child.names:
                        static[alias.asname or alias.name] = child.module
    assert static == package._MODULE_OF
    assert set(static) == set(package.__all__)
    for public, module in static.items():
        assert getattr(importlib.import_module(module), public) is getattr(package, public)


@pytest.mark.parametrize("name", PACKAGES)
def test_an_unknown_name_is_an_attribute_error(name: str) -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        _package(name).no_such_name  # noqa: B018

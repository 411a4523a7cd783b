"""Every third-party module the package sources import is declared in pyproject.toml.

A runtime import must come from ``[project] dependencies`` or from an extra a user installs
for that feature (``oqs``, ``yaml``); the ``dev`` and ``bench`` extras do not count, since a
production image has neither. Imports inside functions count too (they fail just as hard, only
later). Modules are mapped to the distribution that installed their file, so namespace packages
(``opentelemetry.*``) resolve to the right one.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import re
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
#: The source folders of the fleetbus packages (``[tool.setuptools.package-dir]``).
SOURCES = sorted(
    {path.split("/")[0] for path in PYPROJECT["tool"]["setuptools"]["package-dir"].values()}
)
#: Extras that never reach a user's installation.
NOT_RUNTIME_EXTRAS = {"dev", "bench"}
#: Modules of optional extras that need not be installed here, and the distribution they need.
UNINSTALLED_OPTIONAL = {"oqs": "liboqs-python"}


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9._-]+", requirement.strip())
    assert match, requirement
    return _normalize(match.group(0))


def declared() -> set[str]:
    project = PYPROJECT["project"]
    names = {_requirement_name(r) for r in project["dependencies"]}
    for extra, requirements in project.get("optional-dependencies", {}).items():
        if extra not in NOT_RUNTIME_EXTRAS:
            names |= {_requirement_name(r) for r in requirements}
    return names


def imported_modules() -> Iterator[tuple[str, str]]:
    """(dotted module, source file) of every absolute import in the package sources."""
    for folder in SOURCES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    for alias in node.names:
                        yield alias.name, str(path.relative_to(ROOT))
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    # ``from opentelemetry import trace``: the name may be a module of its own
                    # (the owner is looked up from the longest importable prefix).
                    for alias in node.names:
                        yield f"{node.module}.{alias.name}", str(path.relative_to(ROOT))
            # importlib.import_module("name") with a literal name (providers/oqs.py)
            text = path.read_text()
            for name in re.findall(r"import_module\(\s*[\"']([\w.]+)[\"']", text):
                yield name, str(path.relative_to(ROOT))


def _file_owners() -> dict[Path, str]:
    owners: dict[Path, str] = {}
    for dist in importlib.metadata.distributions():
        for file in dist.files or ():
            if file.suffix == ".py":
                owners[Path(str(dist.locate_file(file))).resolve()] = _normalize(
                    dist.metadata["Name"]
                )
    return owners


def _origin(module: str) -> str | None:
    """The file ``module`` is loaded from (``None``: not a module, or not installed)."""
    loaded = sys.modules.get(module)
    if loaded is not None and getattr(loaded, "__file__", None):
        return str(loaded.__file__)  # faust replaces its own __spec__ with None
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin in (None, "built-in", "frozen"):
        return None
    return spec.origin


def _owner(module: str, owners: dict[Path, str]) -> str | None:
    """The distribution that installed ``module`` (its longest importable prefix's file)."""
    parts = module.split(".")
    while parts:
        origin = _origin(".".join(parts))
        if origin is not None and (owner := owners.get(Path(origin).resolve())) is not None:
            return owner
        parts.pop()
    return None


def test_the_package_sources_are_where_pyproject_says() -> None:
    assert {"bus", "providers", "processors", "observability"} <= set(SOURCES)


def test_every_third_party_import_is_declared_in_pyproject() -> None:
    wanted = declared()
    owners = _file_owners()
    undeclared: dict[str, set[str]] = {}
    for module, source in imported_modules():
        top = module.split(".")[0]
        if top in sys.stdlib_module_names or top in ("__future__", "fleetbus"):
            continue
        owner = _owner(module, owners)
        if owner is None:
            owner = UNINSTALLED_OPTIONAL.get(top)
            assert owner is not None, f"{source}: cannot tell which distribution provides {module}"
        if _normalize(owner) not in wanted:
            undeclared.setdefault(owner, set()).add(f"{source} imports {module}")
    assert not undeclared, "undeclared in pyproject.toml: " + "; ".join(
        f"{dist} ({', '.join(sorted(where))})" for dist, where in sorted(undeclared.items())
    )

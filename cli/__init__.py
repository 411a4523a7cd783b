"""fleetbus.cli: the ``fleetbus`` command, one module per command group (``main`` wires them
into ``app``; the console script is ``fleetbus.cli.main:main``).
"""

import importlib as _importlib
import typing as _typing

if _typing.TYPE_CHECKING:
    from fleetbus.cli.main import app

__all__ = [
    "app",
]

#: Where each public name lives; imported on first use (PEP 562).
_MODULE_OF: dict[str, str] = {
    "app": "fleetbus.cli.main",
}


def __getattr__(name: str) -> object:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

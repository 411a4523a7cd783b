"""fleetbus.cli: the ``fleetbus`` command, one module per command group (``main`` wires them
into ``app``; the console script is ``fleetbus.cli.main:main``).
"""

import typing as _typing

from fleetbus.bus.exports import lazy_exports as _lazy_exports

if _typing.TYPE_CHECKING:
    from fleetbus.cli.main import app

__all__ = [
    "app",
]

#: Where each public name lives; imported on first use (PEP 562).
_MODULE_OF: dict[str, str] = {
    "app": "fleetbus.cli.main",
}

__getattr__, __dir__ = _lazy_exports(__name__, _MODULE_OF)

"""fleetbus.devtools: local developer tooling — a provisioned Apache Kafka, a KME pair in a
child process, the test PKI, the demo and the smoke agent. Only the CLI, devtools itself, tests
and benchmarks import it; no production room depends on it.
"""

import importlib as _importlib
import typing as _typing

if _typing.TYPE_CHECKING:
    from fleetbus.devtools.demo import DemoOptions, run_demo
    from fleetbus.devtools.kafka import LocalKafka
    from fleetbus.devtools.kme import KMEPairProcess

__all__ = [
    "DemoOptions",
    "KMEPairProcess",
    "LocalKafka",
    "run_demo",
]

#: Where each public name lives; imported on first use (PEP 562).
_MODULE_OF: dict[str, str] = {
    "DemoOptions": "fleetbus.devtools.demo",
    "run_demo": "fleetbus.devtools.demo",
    "LocalKafka": "fleetbus.devtools.kafka",
    "KMEPairProcess": "fleetbus.devtools.kme",
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

"""fleetbus.devtools: local developer tooling. Only the CLI, devtools itself, tests and
benchmarks import it; no production room depends on it.

Modules: ``kafka`` (a provisioned Apache Kafka: ``LocalKafka``, ports, mTLS PKI, ACLs), ``kme``
(a KME pair in a child process), ``kme_pki`` (the KME pair's test PKI:
``fleetbus kme certs``), ``pki`` (certificate helpers), ``fleet`` (the test fleet on
disk and its settings, shared by the tests and the benchmarks), ``qkd_recording`` (the recorded
ETSI 014 key of the QKD test vectors), ``process`` (the one child-process
wrapper: ``ChildProcess``, ``WorkerProcess``, ``spawn``, ``stop_group``) and ``demo`` (the
``fleetbus demo`` scenario, runner and report).
"""

import typing as _typing

from fleetbus.bus.exports import lazy_exports as _lazy_exports

if _typing.TYPE_CHECKING:
    from fleetbus.devtools.demo import DemoOptions, run_demo
    from fleetbus.devtools.kafka import LocalKafka
    from fleetbus.devtools.kme import KMEPairProcess
    from fleetbus.devtools.kme_pki import make_test_pki

__all__ = [
    "DemoOptions",
    "KMEPairProcess",
    "LocalKafka",
    "make_test_pki",
    "run_demo",
]

#: Where each public name lives; imported on first use (PEP 562).
_MODULE_OF: dict[str, str] = {
    "DemoOptions": "fleetbus.devtools.demo",
    "run_demo": "fleetbus.devtools.demo",
    "LocalKafka": "fleetbus.devtools.kafka",
    "KMEPairProcess": "fleetbus.devtools.kme",
    "make_test_pki": "fleetbus.devtools.kme_pki",
}

__getattr__, __dir__ = _lazy_exports(__name__, _MODULE_OF)

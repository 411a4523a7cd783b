"""The fleetbus demo: the whole command pipeline on real parts, driven through a mixed scenario.

``run_demo`` starts (or reuses) a local Apache Kafka, a KME pair joined by a simulated QKD link,
a ``fleetbus worker`` (authorize, seal, responses, track, telemetry) and a simulated fleet
process, then plays routine traffic, high-criticality commands, attacks and a QKD link outage,
and checks every expectation. ``python -m fleetbus.devtools.demo fleet SPEC`` is the fleet process.
See ``docs/demo.md``.

Modules: ``fleet`` (options, the fleet on disk), ``scenario`` (what is sent and what is
expected), ``runner`` (starting everything, playing the scenario), ``agents`` (the fleet
process), ``observe`` (reading status, topics and metrics back), ``report`` (the verdict and the
summary tables).
"""

from __future__ import annotations

from fleetbus.devtools.demo.fleet import DemoFleet, DemoOptions, build_demo_keys
from fleetbus.devtools.demo.observe import read_topic
from fleetbus.devtools.demo.report import Check, DemoReport, summary_tables
from fleetbus.devtools.demo.runner import processes_of, run_demo
from fleetbus.devtools.demo.scenario import Expectation, Scenario

__all__ = [
    "Check",
    "DemoFleet",
    "DemoOptions",
    "DemoReport",
    "Expectation",
    "Scenario",
    "build_demo_keys",
    "processes_of",
    "read_topic",
    "run_demo",
    "summary_tables",
]

"""Every runnable code block of README.md and docs/ runs as written against the real pipeline.

Behind the examples: the real broker, a ``fleetbus worker`` running the pipeline, and a
``fleetbus fleet simulate`` serving V-0001 .. V-0017 (groups north / south). Each page runs in a
folder of its own holding a copy of the fleet's ``keys/`` (dispatch-1 a dispatcher, dispatch-2 an
approver), with the ``FLEETBUS_*`` variables of the run set. Python blocks of a page share one
namespace and must not raise; shell blocks run under ``bash -euo pipefail`` with ``fleetbus`` on
the PATH and must exit 0. A block may declare text its output must contain
(``<!-- run; prints: ... -->``); blocks that cannot run are marked with the reason
(``tests/support/doc_blocks.py``; ``tests/unit/test_doc_example_marks.py`` checks the marks).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fleetbus.bus.commands import Target
from fleetbus.devtools.process import WorkerProcess, spawn, stop_group
from fleetbus.sdk.dispatch import CommandPublisher
from tests.support import doc_blocks
from tests.support.pipeline import DISPATCHER, make_test_fleet, worker_env

VEHICLES = 17  # the pages' examples address V-0017

#: sdk.md first: its commands give the audit trail that audit.md verifies something to check.
PAGES = sorted(
    (page for page in doc_blocks.pages() if doc_blocks.runnable(page)),
    key=lambda page: (page.name != "sdk.md", str(page)),
)


@dataclass
class Scenario:
    workdir: Path
    keys: Path
    env: dict[str, str]
    worker: WorkerProcess
    simulator: subprocess.Popen[bytes]

    def logs(self) -> str:
        sim = (self.workdir / "simulator.log").read_text(errors="replace")
        return f"worker:\n{self.worker.output()[-4000:]}\nsimulator:\n{sim[-2000:]}"


@pytest.fixture(scope="module")
def scenario(kafka: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    workdir = tmp_path_factory.mktemp("doc-examples")
    fleet = make_test_fleet(workdir, vehicles=VEHICLES)
    settings = fleet.settings_for(kafka.bootstrap)  # type: ignore[attr-defined]
    env = worker_env(settings, workdir)
    worker = WorkerProcess(env, workdir / "worker.log")
    command = [sys.executable, "-m", "fleetbus.cli.main", "fleet", "simulate"]
    command += ["--keys-dir", str(fleet.keys_dir), "--vehicles", str(VEHICLES)]
    command += ["--store", str(workdir / "simulator.sqlite"), "--summary-every", "60"]
    with open(workdir / "simulator.log", "wb") as log:
        simulator = spawn(command, env=env, stdout=log)
    running = Scenario(workdir, fleet.keys_dir, env, worker, simulator)
    try:
        # One routine command end to end first, so that the pages' own timeouts measure the
        # examples and not the worker's start.
        with CommandPublisher(
            settings, principal_id=DISPATCHER, private_key_file=fleet.key_file_path(DISPATCHER)
        ) as publisher:
            handle = publisher.send(Target(vehicle="V-0001"), "ping", ttl_s=180)
        event = handle.wait(180)
        assert event.state == "succeeded", f"{handle.events}\n{running.logs()}"
        yield running
    finally:
        if simulator.poll() is None:
            stop_group(simulator, 30)
        worker.stop()


def run_python(block: doc_blocks.Block, namespace: dict[str, object]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block.code, block.where, "exec"), namespace)  # the docs' own code
    return out.getvalue()


def run_sh(block: doc_blocks.Block, cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block.code],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, (
        f"{block.where} exited {result.returncode}\nstdout:\n{result.stdout}\n"
        f"stderr:\n{result.stderr[-3000:]}"
    )
    return result.stdout + result.stderr


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(doc_blocks.ROOT)) for p in PAGES])
def test_page_examples_run_as_written(
    page: Path, scenario: Scenario, monkeypatch: pytest.MonkeyPatch
) -> None:
    cwd = scenario.workdir / page.stem
    cwd.mkdir()
    shutil.copytree(scenario.keys, cwd / "keys")  # copy2 keeps the key files' 0600
    for name, value in scenario.env.items():
        monkeypatch.setenv(name, value)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    monkeypatch.chdir(cwd)
    namespace: dict[str, object] = {"__name__": "__doc_example__"}
    for block in doc_blocks.runnable(page):
        try:
            if block.lang == "python":
                output = run_python(block, namespace)
            else:
                output = run_sh(block, cwd, env)
        except Exception as exc:
            pytest.fail(f"{block.where} failed: {exc!r}\n{scenario.logs()}")
        if block.prints is not None:
            assert block.prints in output, f"{block.where} printed:\n{output}"

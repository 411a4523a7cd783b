"""Real containers for the tests: the Docker engine, the project image and a Kafka container.

``scripts/container-engine.sh start`` (run by ``scripts/test.sh``) provides the engine and the
base images; without an engine the container tests skip with that hint, and fail under CI.
Every container uses host networking and binds 127.0.0.1 (the engine has no bridge network):
no test traffic goes to container addresses.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from fleetbus.devtools.kafka import LocalKafka, find_free_base_port

REPO = Path(__file__).resolve().parents[2]
IMAGE = "fleetbus:0.1.0"
KAFKA_IMAGE = "apache/kafka:4.1.1"
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
#: Label on every container a test starts outside compose, for the leak check in test.sh.
TEST_LABEL = "org.fleetbus.test"


def engine_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    probe = subprocess.run(["docker", "info"], capture_output=True, check=False, timeout=30)
    return probe.returncode == 0


def require_engine() -> None:
    """Skip (fail under CI) when no Docker engine answers."""
    if engine_answers():
        return
    message = "no Docker engine answers; run scripts/container-engine.sh start"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def compose_cli() -> list[str]:
    """``docker compose`` (v2 plugin) when present, else the ``docker-compose`` program."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("no compose CLI; scripts/container-engine.sh start installs one")


def docker(*args: str, timeout: float = 300, check: bool = True) -> str:
    done = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed: {done.stdout}{done.stderr}")
    return done.stdout


def build_image() -> str:
    """``docker build`` of the repository's Dockerfile (layers cached by the engine)."""
    docker("build", "--network", "host", "-t", IMAGE, str(REPO), timeout=900)
    return IMAGE


def wait_for(
    what: str, ready: Callable[[], bool], timeout_s: float, *, log: Callable[[], str]
) -> None:
    """Poll ``ready`` until it holds; fail with ``log()`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not ready after {timeout_s:.0f} s:\n{log()[-4000:]}")
        time.sleep(1)


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def process_uid(container: str) -> int:
    """Real uid of the container's main process (what runs, not what the image declares)."""
    status = docker("exec", container, "cat", "/proc/1/status")
    (line,) = [ln for ln in status.splitlines() if ln.startswith("Uid:")]
    return int(line.split()[1])


def kafka_env_name(prop: str) -> str:
    """The apache/kafka image's variable for a broker property (its rule, reversed)."""
    return "KAFKA_" + prop.replace("-", "___").replace("_", "__").replace(".", "_").upper()


@contextmanager
def kafka_container(name: str | None = None) -> Iterator[str]:
    """A single-node KRaft broker in the apache/kafka image through testcontainers.

    Host networking with listeners on free loopback ports instead of testcontainers'
    port mapping (which needs a bridge network), and no Ryuk reaper (its image cannot be
    pulled here): the context manager removes the container itself. Yields the bootstrap.
    """
    from testcontainers.core.config import testcontainers_config
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.wait_strategies import LogMessageWaitStrategy

    name = name or f"fbtest-kafka-{uuid.uuid4().hex[:8]}"  # test.sh's leak check: fbtest*
    # The very broker configuration the jar fixture runs (LocalKafka), on free loopback
    # ports, as the image's KAFKA_* variables: the two fixture paths differ only in where the
    # broker runs.
    spec = LocalKafka(home=Path("/var/lib/kafka"), base_port=find_free_base_port(2))
    props = dict(line.split("=", 1) for line in spec.server_properties(0).splitlines())
    props["log.dirs"] = "/var/lib/kafka/data"
    env = {kafka_env_name(key): value for key, value in props.items()}
    env["KAFKA_HEAP_OPTS"] = f"-Xmx{spec.heap_mb}m -Xms256m"
    testcontainers_config.ryuk_disabled = True
    container = (
        DockerContainer(KAFKA_IMAGE, name=name)
        .with_kwargs(network_mode="host", labels={TEST_LABEL: "kafka"})
        .waiting_for(LogMessageWaitStrategy("Kafka Server started").with_startup_timeout(180))
    )
    for key, value in env.items():
        container = container.with_env(key, value)
    with container:
        yield spec.bootstrap

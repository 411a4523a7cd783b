"""The image and the testcontainers Kafka fixture, on a real Docker engine.

The image is built from the repository's Dockerfile (the engine script provides the base
images where public registries cannot be reached); it must run the CLI and a working
``fleetbus worker`` as uid 10001. The testcontainers path of the Kafka fixture runs the
pipeline smoke on a broker in the apache/kafka image, so both fixture paths run in every suite.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fleetbus.bus.topics import ensure_topics
from fleetbus.devtools.kafka import free_port
from tests.integration.test_faust_smoke import check_forwarded, run_smoke, smoke_env
from tests.support.containers import (
    TEST_LABEL,
    build_image,
    docker,
    http_ok,
    kafka_container,
    process_uid,
    require_engine,
    wait_for,
)

IMAGE_UID = 10001


@pytest.fixture(scope="module")
def image() -> str:
    require_engine()
    return build_image()


@pytest.mark.timeout(900)
def test_image_runs_the_cli_as_a_non_root_user(image: str) -> None:
    usage = docker("run", "--rm", "--network", "host", image, "--help")
    for command in ("worker", "keys", "kme", "fleet", "dispatch"):
        assert command in usage
    uid = docker("run", "--rm", "--network", "host", "--entrypoint", "id", image, "-u")
    assert uid.strip() == str(IMAGE_UID)


@pytest.fixture
def worker_container(
    image: str, kafka_bootstrap: str, make_topics: Callable[..., list[str]]
) -> Iterator[tuple[str, str, str, int]]:
    """``fleetbus worker`` (the image's default command) as compose runs it: read-only root,
    no capabilities, state on a tmpfs; the smoke forwarder on the session's broker."""
    source, sink = make_topics("in", "out", partitions=2)
    metrics = free_port()
    name = f"fbtest-worker-{uuid.uuid4().hex[:8]}"
    env = {
        **smoke_env(kafka_bootstrap, source, sink, "/var/lib/fleetbus/state"),
        "FLEETBUS_METRICS_PORT": str(metrics),
        "FLEETBUS_METRICS_BIND": "127.0.0.1",
    }
    flags = [f"--env={key}={value}" for key, value in env.items()]
    docker(
        "run", "--detach", "--name", name, "--network", "host", "--label", f"{TEST_LABEL}=worker",
        "--read-only", "--tmpfs", "/tmp", "--tmpfs", "/var/lib/fleetbus:uid=10001,gid=10001",
        "--cap-drop", "ALL", "--security-opt", "no-new-privileges:true", *flags, image,
    )  # fmt: skip
    try:
        yield name, source, sink, metrics
    finally:
        docker("rm", "--force", "--volumes", name, check=False)


@pytest.mark.timeout(900)
def test_image_worker_forwards_records_as_a_non_root_user(
    worker_container: tuple[str, str, str, int], kafka_bootstrap: str
) -> None:
    name, source, sink, metrics = worker_container

    def log() -> str:
        return docker("logs", name, check=False)

    def running() -> bool:
        return docker("inspect", "-f", "{{.State.Running}}", name, check=False).strip() == "true"

    url = f"http://127.0.0.1:{metrics}/metrics"
    wait_for("worker /metrics", lambda: http_ok(url), 180, log=log)
    assert process_uid(name) == IMAGE_UID
    check_forwarded(kafka_bootstrap, source, sink, alive=running, log=log)
    # SIGTERM, as `docker stop` and Kubernetes send it: the worker ends cleanly.
    docker("stop", "--time", "60", name, timeout=120)
    assert docker("inspect", "-f", "{{.State.ExitCode}}", name).strip() == "0", log()


@pytest.mark.timeout(900)
def test_testcontainers_kafka_runs_the_pipeline_smoke(tmp_path: Path) -> None:
    require_engine()
    name = f"fbtest-kafka-{uuid.uuid4().hex[:8]}"
    with kafka_container(name) as bootstrap:
        run = uuid.uuid4().hex[:10]
        source, sink = f"test.{run}.in", f"test.{run}.out"
        ensure_topics(bootstrap, [source, sink], partitions=2, replication_factor=1)
        run_smoke(bootstrap, source, sink, tmp_path)
    left = docker("ps", "--all", "--quiet", "--filter", f"name=^{name}$")
    assert not left.strip(), "the Kafka container outlived its fixture"

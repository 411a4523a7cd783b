"""The local KRaft cluster's configuration, without starting it."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetbus.bus.errors import ConfigError
from fleetbus.devtools import kafka
from fleetbus.devtools.kafka import LocalKafka, find_free_base_port, free_port


def _props(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line)


def test_single_node_listens_on_loopback_and_never_auto_creates(tmp_path: Path) -> None:
    cluster = LocalKafka(home=tmp_path, base_port=30000)
    props = _props(cluster.server_properties(0))
    assert cluster.bootstrap == "127.0.0.1:30000"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:30000,CONTROLLER://127.0.0.1:30001"
    assert props["auto.create.topics.enable"] == "false"
    assert props["process.roles"] == "broker,controller"
    assert props["transaction.state.log.replication.factor"] == "1"


def test_three_nodes_replicate_three_ways_with_two_in_sync(tmp_path: Path) -> None:
    cluster = LocalKafka(home=tmp_path, brokers=3, base_port=30000)
    assert cluster.bootstrap == "127.0.0.1:30000,127.0.0.1:30002,127.0.0.1:30004"
    for node in range(3):
        props = _props(cluster.server_properties(node))
        assert props["node.id"] == str(node + 1)
        assert props["controller.quorum.voters"] == (
            "1@127.0.0.1:30001,2@127.0.0.1:30003,3@127.0.0.1:30005"
        )
        assert props["default.replication.factor"] == "3"
        assert props["min.insync.replicas"] == "2"
        assert props["transaction.state.log.min.isr"] == "2"
        assert props["log.dirs"].startswith(str(tmp_path / f"node-{node + 1}"))


def test_only_one_or_three_nodes(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        LocalKafka(home=tmp_path, brokers=2)


def test_status_of_a_cluster_never_started(tmp_path: Path) -> None:
    status = LocalKafka(home=tmp_path, base_port=30010).status()
    assert status["ready"] is False
    assert status["nodes"] == [{"node_id": 1, "pid": None, "port": 30010}]


def test_ports_are_chosen_outside_the_ephemeral_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client's source port could take a free port in the ephemeral range between the check
    and the broker's bind; base ports that overlap the kernel's range are never chosen."""
    port_range = tmp_path / "ip_local_port_range"
    port_range.write_text("20000\t20999\n")
    monkeypatch.setattr(kafka.ports, "EPHEMERAL_PORT_RANGE", port_range)
    assert kafka.ephemeral_ports() == range(20000, 21000)
    base = find_free_base_port(6, start=19996, stop=22000)
    assert base >= 21000  # 19996-20001 overlaps the range, and so does everything to 20996
    with pytest.raises(ConfigError, match="outside the ephemeral range 20000-20999"):
        find_free_base_port(6, start=20000, stop=20990)
    assert all(10000 <= free_port() < 19000 for _ in range(20))


# --- dev kafka status: the cluster `up` made, quickly, with an exit code ----------------------


def _set_up(cluster: LocalKafka) -> None:
    """Write the nodes' configuration as ``up`` does, without starting them."""
    for node in range(cluster.brokers):
        cluster.node_dir(node).mkdir(parents=True)
        (cluster.node_dir(node) / "server.properties").write_text(cluster.server_properties(node))


def test_recorded_cluster_is_the_one_up_configured(tmp_path: Path) -> None:
    assert LocalKafka.recorded(tmp_path) is None
    cluster = LocalKafka(home=tmp_path, brokers=3, base_port=31000)
    _set_up(cluster)
    assert LocalKafka.recorded(tmp_path) == cluster


def test_status_reports_the_recorded_port_and_exits_1_when_not_ready(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fleetbus.cli.main import app

    _set_up(LocalKafka(home=tmp_path, base_port=31010))
    result = CliRunner().invoke(app, ["dev", "kafka", "status", "--home", str(tmp_path)])
    assert result.exit_code == 1
    assert '"bootstrap": "127.0.0.1:31010"' in result.stdout
    assert '"ready": false' in result.stdout


def test_metadata_probe_gives_up_within_its_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    import kafka as kafka_python

    seen: list[dict[str, object]] = []
    defaults = kafka_python.KafkaAdminClient.DEFAULT_CONFIG

    def admin(**config: object) -> None:
        seen.append({**defaults, **config})
        raise OSError("no broker in a unit test")

    monkeypatch.setattr(kafka_python, "KafkaAdminClient", admin)
    assert kafka.brokers_in_metadata("127.0.0.1:9", timeout_s=3) == 0
    assert seen[0]["bootstrap_timeout_ms"] == 3000

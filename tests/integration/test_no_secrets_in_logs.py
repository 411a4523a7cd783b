"""No secret reaches a log: a small full pipeline (worker with the QKD key path, a VehicleAgent
with a QKD edge unit, a publisher, telemetry, a forged command), then every log, stdout and
stderr is searched for every secret the run had: the fleet's private keys (root included), the
KME PKI's private keys, the QKD keys the edge unit used, keys the KME served to this test's own
enc_keys call, and the epoch and per-message keys the vehicles derived. Typical runtime: 50 s.
"""

from __future__ import annotations

import base64
import logging
import re
import time
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer

from fleetbus.bus.commands import CommandState, SignedCommand, Target
from fleetbus.bus.envelope import decode_envelope
from fleetbus.devtools.kafka import free_port
from fleetbus.devtools.process import WorkerProcess
from fleetbus.observability.logging import setup_logging
from fleetbus.providers.sealing import derive_message_key
from fleetbus.sdk.dispatch import CommandPublisher
from fleetbus.sdk.vehicle import HandlerResult, VehicleAgent
from tests.support.pipeline import (
    DISPATCHER,
    make_test_fleet,
    qkd_worker_env,
    worker_env,
)

FINAL = [CommandState.SUCCEEDED, CommandState.FAILED, CommandState.REJECTED, CommandState.EXPIRED]


def encodings(secret: bytes) -> set[bytes]:
    """The ways a secret could be written to a text log, plus its raw bytes."""
    forms = {
        secret,
        secret.hex().encode(),
        secret.hex().upper().encode(),
        base64.b64encode(secret),
        base64.b64encode(secret).rstrip(b"="),
        base64.urlsafe_b64encode(secret).rstrip(b"="),
        repr(secret).encode(),
    }
    # A truncated dump still leaks: the first 16 bytes as hex.
    if len(secret) > 16:
        forms.add(secret[:16].hex().encode())
    return {f for f in forms if len(f) >= 16}


def pem_secrets(path: Path) -> list[bytes]:
    """The DER of a PEM private key and each of its base64 body lines."""
    text = path.read_text()
    body = "".join(line for line in text.splitlines() if line and not line.startswith("-----"))
    lines = [line.encode() for line in text.splitlines() if len(line) >= 32 and "-----" not in line]
    return [base64.b64decode(body), *lines]


def test_no_secret_appears_in_any_log(
    kafka_bootstrap: str, tmp_path: Path, kme_pair: Any, capfd: pytest.CaptureFixture[str]
) -> None:
    kme_pair.reset()
    fleet = make_test_fleet(tmp_path, vehicles=2)
    fleet.add_edge_unit("E-0001", qkd_sae_id=kme_pair.slave_sae)
    settings = fleet.settings_for(kafka_bootstrap)
    env = worker_env(
        settings, tmp_path, FLEETBUS_METRICS_PORT=str(free_port()), **qkd_worker_env(kme_pair)
    )
    worker_log = tmp_path / "worker.log"
    worker = WorkerProcess(env, worker_log)

    # The test process logs JSON (observability.logging) at DEBUG for fleetbus, INFO otherwise.
    app_log = tmp_path / "app.jsonl"
    stream = app_log.open("w")
    handler = setup_logging("no-secrets-test", level=logging.INFO, stream=stream)
    logging.getLogger("fleetbus").setLevel(logging.DEBUG)

    # Record the QKD keys the edge unit really used (the provider's return values).
    qkd = kme_pair.provider("b")
    used_qkd_keys: list[bytes] = []
    real_recover = qkd.recover

    def recording_recover(*args: Any, **kwargs: Any) -> bytes:
        key: bytes = real_recover(*args, **kwargs)
        used_qkd_keys.append(key)
        return key

    qkd.recover = recording_recover  # type: ignore[method-assign]

    agent = VehicleAgent(
        settings,
        vehicles=[*fleet.vehicles(), fleet.vehicle("E-0001")],
        directory=fleet.directory,
        minimum_path="xwing",
        handlers={a: (lambda c: HandlerResult(200, "ok")) for a in ("ping", "lock_doors")},
        store_path=tmp_path / "agent.sqlite",
        qkd_provider=qkd,
    ).start()
    publisher = CommandPublisher(
        settings, principal_id=DISPATCHER, private_key_file=fleet.key_file_path(DISPATCHER)
    )
    try:
        handles = [
            publisher.send(Target(vehicle="V-0001"), "ping"),
            publisher.send(Target(vehicle="E-0001"), "ping"),
            publisher.send(Target(group="north"), "lock_doors"),
        ]
        agent.publish_telemetry("V-0001", {"speed_kmh": 50})
        good = publisher.sign(Target(vehicle="V-0002"), "ping")
        forged = SignedCommand(
            good.command, good.key_id, good.suite, bytes(b ^ 1 for b in good.signature)
        )
        handles.append(publisher.publish(forged))
        for handle in handles:
            try:
                handle.wait(90, until=FINAL)
            except Exception:
                pytest.fail(f"no final status {handle.events}:\n{worker.output()[-3000:]}")
        assert handles[1].events[-1].state is CommandState.SUCCEEDED
        time.sleep(2)  # telemetry and the last answers through the worker
        assert used_qkd_keys, "the edge unit opened a QKD-protected command"

        # Derived keys: the vehicles' cached epoch keys and each outbound message key.
        epoch_keys: list[bytes] = []
        for vehicle in agent._vehicles.values():
            # A vehicle opens v1 envelopes through its v2 opener's v1 opener (this fleet does
            # not announce wire2, so all of its traffic is v1).
            opener = getattr(vehicle.opener, "v1", None) or vehicle.opener
            for _until, value in opener._epoch_keys._data.values():
                if isinstance(value, bytes):
                    epoch_keys.append(value)
        assert epoch_keys
        consumer = KafkaConsumer(
            settings.topics.full(settings.topics.commands_outbound),
            bootstrap_servers=kafka_bootstrap,
            auto_offset_reset="earliest",
            consumer_timeout_ms=3000,
        )
        message_keys = []
        try:
            for record in consumer:
                parsed = decode_envelope(record.value)
                for epoch_key in epoch_keys:
                    message_keys.append(derive_message_key(epoch_key, parsed.protected))
        finally:
            consumer.close()

        # This test's own enc_keys call: keys the KME served (and must not log).
        status, served = kme_pair.call(
            kme_pair.kme_a_url,
            kme_pair.master_sae,
            "POST",
            f"/api/v1/keys/{kme_pair.slave_sae}/enc_keys",
            {"number": 2},
        )
        assert status == 200, served
        served_keys = [base64.b64decode(k["key"]) for k in served["keys"]]
    finally:
        publisher.close()
        agent.close()
        worker.stop()
        logging.getLogger().removeHandler(handler)
        logging.getLogger("fleetbus").setLevel(logging.NOTSET)
        stream.close()

    secrets: dict[str, bytes] = {}
    for principal, key_file in fleet.key_files.items():
        for algorithm, raw in key_file.private_keys.items():
            secrets[f"{principal} {algorithm} private key"] = raw
    for algorithm, raw in fleet.root.key_file().private_keys.items():
        secrets[f"root {algorithm} private key"] = raw
    pki = kme_pair.pki
    pem_files = {"ca": pki.ca_key, **{f"sae {n}": p.key for n, p in pki.saes.items()}}
    pem_files.update({f"kme {n}": p.key for n, p in pki.kmes.items()})
    for name, path in pem_files.items():
        for i, part in enumerate(pem_secrets(Path(path))):
            secrets[f"{name} PEM key part {i}"] = part
    for i, key in enumerate(used_qkd_keys):
        secrets[f"QKD key used by the edge #{i}"] = key
    for i, key in enumerate(served_keys):
        secrets[f"QKD key served to the test #{i}"] = key
    for i, key in enumerate(epoch_keys):
        secrets[f"epoch key #{i}"] = key
    for i, key in enumerate(message_keys):
        secrets[f"message key #{i}"] = key
    assert len(secrets) > 30

    captured = capfd.readouterr()
    logs: dict[str, bytes] = {
        "worker log": worker_log.read_bytes(),
        "test-process JSON log": app_log.read_bytes(),
        "KME log": Path(kme_pair.log_file).read_bytes(),
        "stdout": captured.out.encode(),
        "stderr": captured.err.encode(),
    }
    for path in tmp_path.rglob("*.log"):
        logs.setdefault(str(path), path.read_bytes())
    assert sum(len(v) for v in logs.values()) > 10_000, "the run wrote logs to search"
    assert re.search(rb'"level": ?"(debug|info|warning)"', logs["test-process JSON log"])
    leaks = [
        (secret_name, log_name)
        for secret_name, secret in secrets.items()
        for form in encodings(secret)
        for log_name, text in logs.items()
        if form in text
    ]
    assert not leaks, sorted(set(leaks))

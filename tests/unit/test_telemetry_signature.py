"""The optional per-batch telemetry signature (issue 13, non-repudiation): a known-answer vector
checked with cbor2 and cryptography alone, the agent signing inside the v2 message, the telemetry
stage verifying, exporting ``signed`` and keeping the evidence in the audit trail, and every
tamper case refused into the DLQ with its reason (docs/wire-format.md V2.3.1, docs/sdk.md
"Signed telemetry")."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from prometheus_client import REGISTRY

from fleetbus.bus.commands import (
    TELEMETRY_BATCH_CONTEXT,
    SignedTelemetryBatch,
    TelemetryBatch,
    decode_batch_payload,
    new_command_id,
)
from fleetbus.bus.directory import FleetRoot, IssuedKey
from fleetbus.bus.envelope import MessageKind
from fleetbus.bus.envelope_v2 import Direction
from fleetbus.bus.errors import FleetbusError, ReasonCode
from fleetbus.bus.keys import KeyPath
from fleetbus.bus.registry import load_key_provider
from fleetbus.bus.settings import FleetbusSettings
from fleetbus.processors.eos import DeadLetter, InputRecord, PartitionState, StageResult
from fleetbus.processors.fleet_registry import FleetRegistry
from fleetbus.processors.policy import PolicyEngine
from fleetbus.processors.stages import PipelineTopics, TelemetryStage, UplinkOpener
from fleetbus.providers.keypath import KeyPathRunner
from fleetbus.providers.sealing import EnvelopeOpener, SealRequest
from fleetbus.providers.sealing_v2 import EpochOpener
from fleetbus.providers.signers import Ed25519Suite
from fleetbus.sdk.transport import MemoryTransport
from fleetbus.sdk.vehicle import VehicleAgent, VehicleIdentity
from tests.support.envelope import Fleet, fleet_of, issuer

VECTOR = Path(__file__).parents[1] / "vectors" / "telemetry" / "signed-batch-ed25519.json"
NOW = time.time() - 7200
SETTINGS = FleetbusSettings()
TOPICS = PipelineTopics.from_settings(SETTINGS.topics)
SUITE = "ed25519"
KEMS = ["xwing", "x25519"]


# --- the known answer ------------------------------------------------------------------------


def test_known_answer_recomputed_from_the_document_alone() -> None:
    """What a third party does with wire-format.md V2.3.1: cbor2 and cryptography, no fleetbus."""
    v = json.loads(VECTOR.read_text())
    batch_map = cbor2.loads(bytes.fromhex(v["batch"]))
    tbs = cbor2.dumps(
        ["fleetbus-telemetry-batch-v1", v["key_id"], v["suite"], batch_map], canonical=True
    )
    assert tbs.hex() == v["to_be_signed"]
    private = ed25519.Ed25519PrivateKey.from_private_bytes(bytes.fromhex(v["private_key"]))
    assert private.sign(tbs).hex() == v["signature"]  # Ed25519 is deterministic
    public = ed25519.Ed25519PublicKey.from_public_bytes(bytes.fromhex(v["public_key"]))
    public.verify(bytes.fromhex(v["signature"]), tbs)
    signed = cbor2.dumps(
        [1, batch_map, v["key_id"], v["suite"], bytes.fromhex(v["signature"])], canonical=True
    )
    assert signed.hex() == v["signed_batch"]
    assert hashlib.sha256(signed).hexdigest() == v["sha256"]


def test_known_answer_is_what_the_sdk_signs_and_the_stage_reads() -> None:
    v = json.loads(VECTOR.read_text())
    assert TELEMETRY_BATCH_CONTEXT == "fleetbus-telemetry-batch-v1"
    signer = Ed25519Suite().signer({"ed25519": bytes.fromhex(v["private_key"])}, v["key_id"])
    batch = TelemetryBatch.decode(bytes.fromhex(v["batch"]))
    signed = SignedTelemetryBatch.sign(batch, signer)
    assert signed.encode().hex() == v["signed_batch"]
    assert signed.digest().hex() == v["sha256"]
    parsed = decode_batch_payload(bytes.fromhex(v["signed_batch"]))
    assert parsed == signed
    parsed.verify(Ed25519Suite().verifier({"ed25519": bytes.fromhex(v["public_key"])}))
    # An unsigned batch (a CBOR map) still reads as the plain batch.
    assert decode_batch_payload(bytes.fromhex(v["batch"])) == batch


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[:-1] + bytes([b[-1] ^ 1]),  # a signature byte
        lambda b: b.replace(b"closed", b"opened", 1),  # a reading
        lambda b: b.replace(b"V-17/sig/1", b"V-17/sig/2", 1),  # the key id (bound by the TBS)
    ],
)
def test_a_changed_byte_does_not_verify(damage: Any) -> None:
    v = json.loads(VECTOR.read_text())
    changed = damage(bytes.fromhex(v["signed_batch"]))
    parsed = decode_batch_payload(changed)
    assert isinstance(parsed, SignedTelemetryBatch)
    verifier = Ed25519Suite().verifier({"ed25519": bytes.fromhex(v["public_key"])})
    with pytest.raises(FleetbusError) as exc:
        parsed.verify(verifier)
    assert exc.value.reason is ReasonCode.BAD_SIGNATURE


def test_a_signed_batch_is_strictly_decoded() -> None:
    v = json.loads(VECTOR.read_text())
    items = cbor2.loads(bytes.fromhex(v["signed_batch"]))
    for bad in (items[:4], [2, *items[1:]], [*items[:3], 7, items[4]], [*items, b""]):
        with pytest.raises(FleetbusError) as exc:
            decode_batch_payload(cbor2.dumps(bad, canonical=True))
        assert exc.value.reason in (ReasonCode.MALFORMED, ReasonCode.UNSUPPORTED_VERSION)


# --- through the agent and the telemetry stage ----------------------------------------------


@dataclass
class Rotated:
    """V-1 after a key rotation: ``old`` (still in its overlap window unless told otherwise) and
    ``new``, the key the agent runs with."""

    fleet: Fleet
    root: FleetRoot
    old: IssuedKey
    new: IssuedKey


def rotated(
    *,
    bus_caps: tuple[str, ...] = ("wire2",),
    v1_caps: tuple[str, ...] = (),
    overlap_s: float = 3600,
) -> Rotated:
    root = FleetRoot.generate(SUITE)
    issue = issuer(root, SUITE, NOW)
    old = issue("V-1", "vehicle", kems=KEMS, capabilities=list(v1_caps))
    new = issue(
        "V-1", "vehicle", version=2, kems=KEMS, capabilities=list(v1_caps),
        not_before=NOW - 60, overlap_s=overlap_s,
    )  # fmt: skip
    issued = [
        issue("bus-sealer", "sealer", kems=KEMS, capabilities=list(bus_caps)),
        old,
        new,
        issue("V-3", "vehicle", kems=KEMS),
    ]
    return Rotated(fleet_of(root, issued), root, old, new)


def stage_for(fleet: Fleet, *, require_signed: bool = False) -> TelemetryStage:
    runner = KeyPathRunner({n: load_key_provider(n) for n in KEMS})
    bus_keys = fleet.files["bus-sealer"].key_set()

    def v1(minimum: str) -> EnvelopeOpener:
        return EnvelopeOpener(
            bus_keys, fleet.directory, runner, KeyPath.parse(minimum), check_replay=False,
            clock=lambda: NOW,
        )  # fmt: skip

    def v2(minimum: str) -> EpochOpener:
        return EpochOpener(
            bus_keys, fleet.directory, runner, KeyPath.parse(minimum),
            direction=Direction.UPLINK, clock=lambda: NOW,
        )  # fmt: skip

    return TelemetryStage(
        topics=TOPICS,
        opener=UplinkOpener(fleet.directory, v1("xwing"), v1("x25519"), clock=lambda: NOW),
        policy=PolicyEngine(
            FleetRegistry.from_mapping({}).with_directory_records(fleet.directory.records())
        ),
        consumer="analytics",
        max_message_bytes=64 * 1024,
        v2_openers=(v2("xwing"), v2("x25519")),
        require_signed=require_signed,
    )


class Uplink:
    """The agent of V-1 and what it sent, fed through one telemetry stage's partition."""

    def __init__(self, r: Rotated, tmp_path: Path, *, sign: bool | None, **stage: Any) -> None:
        self.r = r
        self.transport = MemoryTransport()
        self.agent = VehicleAgent(
            SETTINGS,
            vehicles=[VehicleIdentity.from_key_file(r.fleet.files["V-1"])],
            directory=r.fleet.directory,
            minimum_path="xwing",
            handlers={},
            store_path=tmp_path / "agent.sqlite",
            clock=lambda: NOW,
            transport=self.transport,
            sign_telemetry=sign,
        )
        self.stage = stage_for(r.fleet, **stage)
        self.state = PartitionState()
        self.offset = 0

    def send(self, readings: int = 3) -> list[StageResult]:
        """``readings`` readings as one batch, every record the agent sent through the stage."""
        start = len(self.transport.sent)
        for i in range(readings):
            self.agent.add_reading("V-1", {"speed_kmh": 40 + i, "door": "closed"}, at=NOW + i)
        self.agent.flush_telemetry()
        return [self.process(r.value or b"") for r in self.transport.sent[start:]]

    def process(self, value: bytes) -> StageResult:
        self.offset += 1
        record = InputRecord(TOPICS.telemetry_raw, 0, self.offset, b"V-1", value)
        return self.stage.process(record, self.state, NOW)

    def sealed(self, payload: bytes) -> bytes:
        """``payload`` sealed as V-1's next v2 telemetry message of its current epoch: what a
        holder of the epoch (the vehicle itself) can send, to put a forged signature inside."""
        served = self.agent._vehicles["V-1"]
        recipient = self.r.fleet.directory.recipient_keys("bus-sealer", at=NOW)
        request = SealRequest(
            MessageKind.TELEMETRY, TOPICS.telemetry_raw, recipient, new_command_id(), "",
            payload, NOW, NOW + 300, served.profile,
        )  # fmt: skip
        [records] = served.uplink_v2.records_for([served.uplink_v2.prepare(request)])
        return records[-1]


def on(topic: str, result: StageResult) -> list[Any]:
    return [o for o in result.outputs if o.topic == topic]


def exported(results: list[StageResult]) -> list[dict[str, Any]]:
    return [json.loads(o.value) for r in results for o in on(TOPICS.telemetry_verified, r)]


def refused(result: StageResult) -> str:
    [letter] = on(TOPICS.dlq, result)
    assert [e.event for e in result.audit] == ["dead_lettered"]
    return DeadLetter.decode(letter.value).reason.value


def batch(readings: int = 2) -> TelemetryBatch:
    return TelemetryBatch("V-1", tuple((NOW + i, {"speed_kmh": i}) for i in range(readings)))


def test_signing_is_off_by_default(tmp_path: Path) -> None:
    assert SETTINGS.telemetry_sign is False
    assert SETTINGS.telemetry_require_signed is False
    up = Uplink(rotated(), tmp_path, sign=None)
    docs = exported(up.send())
    assert [d["signed"] for d in docs] == [False, False, False]
    assert not any(e.event == "telemetry_signed" for r in up.send() for e in r.audit)


def test_the_setting_turns_signing_on(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FLEETBUS_TELEMETRY_SIGN", "true")
    monkeypatch.setenv("FLEETBUS_TELEMETRY_REQUIRE_SIGNED", "1")
    settings = FleetbusSettings()
    assert settings.telemetry_sign
    assert settings.telemetry_require_signed


def test_a_signed_batch_is_exported_signed_and_its_evidence_verifies_without_the_bus(
    tmp_path: Path,
) -> None:
    up = Uplink(rotated(), tmp_path, sign=True)
    results = up.send(3)
    assert not any(on(TOPICS.dlq, r) for r in results)
    docs = exported(results)
    assert [(d["signed"], d["fields"]["speed_kmh"]) for d in docs] == [
        (True, 40),
        (True, 41),
        (True, 42),
    ]
    [event] = [e for r in results for e in r.audit if e.event == "telemetry_signed"]
    assert event.actor == "V-1"
    assert event.detail["readings"] == 3
    # A third party: the audit record's bytes, the vehicle's root-signed record, cbor2, Ed25519.
    evidence = base64.b64decode(str(event.detail["signed_batch"]))
    assert hashlib.sha256(evidence).hexdigest() == event.detail["sha256"]
    version, body, key_id, suite, signature = cbor2.loads(evidence)
    assert (version, key_id, suite) == (1, up.r.new.signed.record.key_id, "ed25519")
    record = up.r.fleet.directory.record(key_id)
    assert record is not None
    assert record.principal_id == "V-1"
    tbs = cbor2.dumps([TELEMETRY_BATCH_CONTEXT, key_id, suite, body], canonical=True)
    key = ed25519.Ed25519PublicKey.from_public_bytes(record.public_keys["ed25519"])
    key.verify(signature, tbs)
    assert [r[1]["speed_kmh"] for r in body["readings"]] == [40, 41, 42]


def test_the_signature_is_inside_the_encrypted_message(tmp_path: Path) -> None:
    up = Uplink(rotated(), tmp_path, sign=True)
    up.send(1)
    sent = up.transport.sent[-1].value or b""
    signature = up.r.new.key_file.signer()
    assert signature.key_id.encode() not in sent  # the key id is in the plaintext only
    assert b"speed_kmh" not in sent


def test_a_batch_signed_by_the_old_key_inside_its_overlap_verifies(tmp_path: Path) -> None:
    up = Uplink(rotated(), tmp_path, sign=True)
    up.send(1)  # the epoch, established by the new key
    old = SignedTelemetryBatch.sign(batch(), up.r.old.key_file.signer()).encode()
    docs = exported([up.process(up.sealed(old))])
    assert [d["signed"] for d in docs] == [True, True]


def test_tampered_signatures_are_refused(tmp_path: Path) -> None:
    up = Uplink(rotated(), tmp_path, sign=True)
    up.send(1)
    signer = up.r.new.key_file.signer()
    good = SignedTelemetryBatch.sign(batch(), signer)
    before = REGISTRY.get_sample_value(
        "fleetbus_dlq_records_total", {"stage": "telemetry", "reason": "bad_signature"}
    )
    flipped = good.encode()[:-1] + bytes([good.encode()[-1] ^ 1])
    assert refused(up.process(up.sealed(flipped))) == "bad_signature"
    after = REGISTRY.get_sample_value(
        "fleetbus_dlq_records_total", {"stage": "telemetry", "reason": "bad_signature"}
    )
    assert (after or 0) == (before or 0) + 1
    # Another reading under the same signature.
    other = SignedTelemetryBatch(batch(3), good.key_id, good.suite, good.signature)
    assert refused(up.process(up.sealed(other.encode()))) == "bad_signature"
    # Another vehicle's key: named as its own, it is not V-1's; named as V-1's, it does not verify.
    v3 = up.r.fleet.files["V-3"].signer()
    assert refused(up.process(up.sealed(SignedTelemetryBatch.sign(batch(), v3).encode()))) == (
        "unknown_signer"
    )
    claimed = SignedTelemetryBatch.sign(batch(), v3)
    claimed = SignedTelemetryBatch(claimed.batch, signer.key_id, claimed.suite, claimed.signature)
    assert refused(up.process(up.sealed(claimed.encode()))) == "bad_signature"
    # The suite named must be the key's.
    renamed = SignedTelemetryBatch(good.batch, good.key_id, "mldsa65", good.signature)
    assert refused(up.process(up.sealed(renamed.encode()))) == "bad_signature"
    # A signed batch naming another vehicle.
    v3_batch = TelemetryBatch("V-3", batch().readings)
    foreign = SignedTelemetryBatch.sign(v3_batch, signer).encode()
    assert refused(up.process(up.sealed(foreign))) == "wrong_recipient"
    # Not even a batch.
    assert refused(up.process(up.sealed(cbor2.dumps([1, 2], canonical=True)))) == "malformed"
    # Nothing of the refused batches was exported; a good one still is.
    assert len(exported([up.process(up.sealed(good.encode()))])) == 2


def test_a_revoked_signing_key_is_refused(tmp_path: Path) -> None:
    up = Uplink(rotated(), tmp_path, sign=True)
    up.send(1)
    up.r.fleet.directory.ingest(up.r.root.sign(up.r.old.signed.record.revocation(at=NOW - 1)))
    old = SignedTelemetryBatch.sign(batch(), up.r.old.key_file.signer()).encode()
    assert refused(up.process(up.sealed(old))) == "signer_revoked"
    assert len(exported(up.send(1))) == 1  # the new key still signs


def test_a_rotated_out_signing_key_is_refused(tmp_path: Path) -> None:
    up = Uplink(rotated(overlap_s=30), tmp_path, sign=True)  # the old key ended 30 s ago
    up.send(1)
    old = SignedTelemetryBatch.sign(batch(), up.r.old.key_file.signer()).encode()
    assert refused(up.process(up.sealed(old))) == "signer_expired"


def test_unsigned_telemetry_is_refused_from_a_vehicle_whose_record_requires_it(
    tmp_path: Path,
) -> None:
    r = rotated(v1_caps=("signed-telemetry",))
    up = Uplink(r, tmp_path, sign=False)
    results = up.send(2)
    assert refused(results[-1]) == "policy_denied"  # the establishment before it is accepted
    assert not exported(results)
    signing = Uplink(r, tmp_path / "signing", sign=True)
    assert [d["signed"] for d in exported(signing.send(2))] == [True, True]


def test_the_worker_setting_requires_signatures_from_every_vehicle(tmp_path: Path) -> None:
    up = Uplink(rotated(), tmp_path, sign=False, require_signed=True)
    assert refused(up.send(1)[-1]) == "policy_denied"
    assert exported(Uplink(rotated(), tmp_path / "s", sign=True, require_signed=True).send(1))


def test_v1_telemetry_cannot_strip_a_required_signature(tmp_path: Path) -> None:
    """Without wire2 on the bus record the agent sends v1 (unsigned): where a signature is
    required, that is refused too, else sending v1 would be a way around the requirement."""
    r = rotated(bus_caps=(), v1_caps=("signed-telemetry",))
    up = Uplink(r, tmp_path, sign=True)
    [result] = up.send(1)
    assert refused(result) == "policy_denied"
    plain = Uplink(rotated(bus_caps=()), tmp_path / "plain", sign=True)
    assert [d["signed"] for d in exported(plain.send(1))] == [False]

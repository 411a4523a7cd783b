"""Bytes on the wire, v1 vs v2 vs plaintext, and verified telemetry readings per second per core.

Prints tables and writes bench/results/wire.json. Not a test: the rates depend on the machine
and its load (the sizes do not, except for a few bytes of varint lengths).

    .venv/bin/python bench/bench_wire.py [--vehicles 10000] [--seconds 3]

* Downlink: one routine command (a dispatcher-signed ``push_route``), sealed by the bus on the
  ``xwing`` key path: v1 envelope vs v2 message after establishment, with the establishment
  amortised over an epoch of 100 commands, for each pair of bus and dispatcher suites.
  The v2 message's overhead over its payload is printed field by field.
* A routine command's records, request to final status (requested, authorized, outbound,
  response, verified response, status events): the sum for plaintext, v1 and v2 (v2 also with
  its establishments spread over an epoch of 100 commands).
* Telemetry: bytes per reading on the uplink (plaintext CBOR record per reading, v1 envelope
  per batch, v2 message per batch, and v2 with the optional per-batch vehicle signature,
  Ed25519 and composite, side by side) for 1, 10 and 100 readings per batch; and readings
  verified and decoded per second on one core with ``--vehicles`` uplink epochs open at once,
  unsigned and Ed25519-signed (the signature verified per batch, as the telemetry stage does).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import cbor2

from fleetbus.bus.commands import (
    Command,
    CommandState,
    Response,
    SignedCommand,
    SignedTelemetryBatch,
    StatusEvent,
    Target,
    Telemetry,
    TelemetryBatch,
    VerifiedResponse,
    decode_batch_payload,
)
from fleetbus.bus.envelope import ENVELOPE_TAG
from fleetbus.bus.envelope_v2 import Direction, Message, decode_record
from fleetbus.bus.keys import KeyPath, PrivateKeySet, RecipientKeys, SecurityProfile
from fleetbus.bus.registry import load_signature_suite
from fleetbus.processors.stages import AuthorizedCommand
from fleetbus.providers.hpke import X25519Provider, XWingProvider
from fleetbus.providers.keypath import KeyPathRunner, ProfileSealer
from fleetbus.providers.sealing import EnvelopeSealer, EpochPolicy, SealRequest
from fleetbus.providers.sealing_v2 import (
    AcceptedEpoch,
    EpochOpener,
    EpochSealer,
    MemoryEpochStore,
)

RESULTS = Path(__file__).parent / "results" / "wire.json"
OUTBOUND = "fleet.commands.outbound"
RESPONSES = "fleet.commands.responses"
TELEMETRY = "fleet.telemetry.raw"
SUITES = ["ed25519", "composite-mldsa65-ed25519"]
EPOCH_COMMANDS = 100
BATCHES = [1, 10, 100]
NOW = time.time()


class Directory:
    """Signer directory of the benchmark's principals."""

    def __init__(self) -> None:
        self.verifiers: dict[tuple[str, str], Any] = {}

    def verifier_for(self, principal_id: str, key_id: str, *, at: float) -> Any:
        return self.verifiers[(principal_id, key_id)]


def principal(name: str, suite_name: str, directory: Directory) -> Any:
    suite = load_signature_suite(suite_name)
    private, public = suite.generate()
    signer = suite.signer(private, f"{name}/sig/1")
    directory.verifiers[(name, signer.key_id)] = suite.verifier(public)
    return signer


def kem_party(name: str) -> tuple[RecipientKeys, PrivateKeySet]:
    private: dict[str, bytes] = {}
    public: dict[str, bytes] = {}
    for provider in (XWingProvider(), X25519Provider()):
        private[provider.name], public[provider.name] = provider.generate_keypair()
    ids = {k: f"{name}/{k}/1" for k in private}
    return (
        RecipientKeys(name, public, ids, capabilities=frozenset({"pqc", "wire2"})),
        PrivateKeySet(name, private, ids),
    )


def runner() -> KeyPathRunner:
    return KeyPathRunner({"xwing": XWingProvider(), "x25519": X25519Provider()})


def profile(suite: str) -> SecurityProfile:
    path = KeyPath.parse("xwing")
    return SecurityProfile("standard", [path], suite, True, path)


def command(dispatcher: Any) -> tuple[bytes, bytes, Command]:
    cmd = Command.create(
        issuer="dispatch-1",
        target=Target(vehicle="V-0001"),
        action="push_route",
        params={"route": "R-42", "stops": 3, "eta_s": 1800},
        ttl_s=300,
        now=NOW,
    )
    plain = cbor2.dumps(cmd.to_wire(), canonical=True)  # what a bus without security carries
    return plain, SignedCommand.sign(cmd, dispatcher).encode(), cmd


HEADER_NAMES = {
    1: "alg",
    4: "kid (epoch id)",
    6: "Partial IV (sequence)",
    -65538: "kind",
    -65540: "recipient",
    -65544: "expires-at",
}


def head(length: int) -> int:
    """Bytes of a CBOR item head announcing ``length`` (or a uint's whole encoding)."""
    return 1 if length < 24 else 2 if length < 256 else 3 if length < 65536 else 5


def message_breakdown(message: bytes, payload: bytes) -> dict[str, int]:
    """Bytes of a v2 message that are not its payload, field by field (sums to the overhead)."""
    parsed = decode_record(message)
    assert isinstance(parsed, Message)
    fields = cbor2.loads(parsed.protected)
    parts = {
        # An array head of 0..23 items is one byte, so these heads match the 3-item arrays.
        "record tag, array head, version, type": len(
            cbor2.dumps(cbor2.CBORTag(ENVELOPE_TAG, [2, 1]))
        ),
        "COSE_Encrypt0 tag and array head": len(cbor2.dumps(cbor2.CBORTag(16, []))),
        "protected: bstr head": head(len(parsed.protected)),
        "protected: map head": head(len(fields)),
    }
    for label, value in fields.items():
        parts[f"protected: {HEADER_NAMES[label]}"] = len(cbor2.dumps(label)) + len(
            cbor2.dumps(value)
        )
    parts["unprotected: empty map"] = 1
    parts["ciphertext: bstr head"] = head(len(parsed.ciphertext))
    inner = len(parsed.ciphertext) - 16 - len(payload)
    if inner:
        parts["plaintext fields besides the payload"] = inner
    parts["AES-GCM tag"] = 16
    assert sum(parts.values()) == len(message) - len(payload), parts
    return parts


def downlink(sealer_suite: str, dispatcher_suite: str) -> dict[str, Any]:
    directory = Directory()
    bus = principal("bus-sealer", sealer_suite, directory)
    dispatcher = principal("dispatch-1", dispatcher_suite, directory)
    vehicle_keys, _vehicle_own = kem_party("V-0001")
    bus_keys, _ = kem_party("bus-sealer")
    plain, payload, cmd = command(dispatcher)
    prof = profile(sealer_suite)
    request = SealRequest(
        "cmd", OUTBOUND, vehicle_keys, cmd.id, cmd.action, payload, NOW, NOW + 300, prof
    )
    v1 = EnvelopeSealer("bus-sealer", bus, ProfileSealer(runner(), provider_timeout_s=None))
    v1_envelope = v1.seal_batch([request])[0]
    v2 = EpochSealer("bus-sealer", bus, ProfileSealer(runner(), provider_timeout_s=None))
    est, first = v2.seal(request)
    (second,) = v2.seal(request)
    # The vehicle's answer and the status events, for the whole-command total.
    response = Response(cmd.id, "V-0001", 200, "ok", executed_at=NOW).encode()
    vehicle_signer = principal("V-0001", "ed25519", directory)
    uplink_prof = profile("ed25519")
    up_request = SealRequest(
        "rsp", RESPONSES, bus_keys, cmd.id, "response", response, NOW, NOW + 300, uplink_prof
    )
    up_v1 = EnvelopeSealer(
        "V-0001", vehicle_signer, ProfileSealer(runner(), provider_timeout_s=None)
    ).seal_batch([up_request])[0]
    up_v2 = EpochSealer(
        "V-0001",
        vehicle_signer,
        ProfileSealer(runner(), provider_timeout_s=None),
        direction=Direction.UPLINK,
    )
    up_est, _ = up_v2.seal(up_request)
    (up_msg,) = up_v2.seal(up_request)
    statuses = [
        StatusEvent(cmd.id, state, NOW, detail=detail, vehicle_id="V-0001").encode()
        for state, detail in (
            (CommandState.AUTHORIZED, ""),
            (CommandState.SEALED, "profile standard, key path xwing"),
            (CommandState.SUCCEEDED, "ok"),
        )
    ]
    authorized = AuthorizedCommand(
        cmd.id, "V-0001", "dispatch-1", cmd.action, "routine", cmd.issued_at, cmd.expires_at,
        payload,
    ).encode()  # fmt: skip
    authorized_plain = AuthorizedCommand(
        cmd.id, "V-0001", "dispatch-1", cmd.action, "routine", cmd.issued_at, cmd.expires_at,
        plain,
    ).encode()  # fmt: skip
    # What the response stage forwards to the track stage, keyed by command id.
    verified = {
        wire: VerifiedResponse(Response.decode(response), "xwing", wire, NOW + 300).encode()
        for wire in (1, 2)
    }
    status_bytes = sum(len(s) for s in statuses)
    key = len(b"V-0001")
    cid = len(cmd.id)
    total_plain = (cid + len(plain)) + (cid + len(authorized_plain)) + (key + len(plain))
    total_plain += (cid + len(response)) + status_bytes + cid * len(statuses)
    common = (cid + len(payload)) + (cid + len(authorized)) + status_bytes + cid * len(statuses)
    header = len("fleetbus-command-id") + cid  # v1 outbound Kafka header
    # v1 answers are keyed by command id, v2 answers by vehicle id (docs/wire-format.md V2.10);
    # both pass the response stage, whose verified record a plaintext bus does not have.
    total_v1 = common + (key + len(v1_envelope) + header) + (cid + len(up_v1))
    total_v1 += cid + len(verified[1])
    total_v2 = common + (key + len(second)) + (key + len(up_msg)) + (cid + len(verified[2]))
    # The establishments (downlink, its copy for the response stage, uplink) spread over an
    # epoch of EPOCH_COMMANDS commands.
    amortised = total_v2 + round((2 * (key + len(est)) + key + len(up_est)) / EPOCH_COMMANDS)
    return {
        "sealer_suite": sealer_suite,
        "dispatcher_suite": dispatcher_suite,
        "plain_command": len(plain),
        "signed_command": len(payload),
        "v1_envelope": len(v1_envelope),
        "v2_establishment": len(est),
        "v2_message": len(second),
        "v2_overhead": len(second) - len(payload),
        "v2_per_command_in_epoch": round(
            (len(est) + EPOCH_COMMANDS * len(second)) / EPOCH_COMMANDS
        ),
        "v1_response": len(up_v1),
        "v2_response": len(up_msg),
        "v2_uplink_establishment": len(up_est),
        "command_total_plain": total_plain,
        "command_total_v1": total_v1,
        "command_total_v2": total_v2,
        "command_total_v2_amortised": amortised,
        "verified_response": len(verified[2]),
        "first_message_bytes": len(first),
        "v2_message_breakdown": message_breakdown(second, payload),
    }


def readings(count: int, start: float) -> list[dict[str, Any]]:
    return [
        {"at": round((start + i) * 1000), "fields": {"speed_kmh": 54.2 + i % 7, "soc_pct": 81,
                                                       "lat": 52.520008, "lon": 13.404954}}
        for i in range(count)
    ]  # fmt: skip


def batch_payload(vehicle: str, items: list[dict[str, Any]]) -> bytes:
    """The vehicle SDK's ``TelemetryBatch`` (docs/sdk.md, "Telemetry batching")."""
    return TelemetryBatch(vehicle, tuple((r["at"] / 1000, r["fields"]) for r in items)).encode()


def verified_readings_per_cpu_s(
    opener: EpochOpener, messages: list[bytes], seconds: float, directory: Directory
) -> int:
    """Open, decode and (when signed) verify ``messages`` for ``seconds``: readings per CPU-s."""
    opened_readings = 0
    start = time.perf_counter()
    cpu = time.thread_time()
    index = 0
    while time.perf_counter() - start < seconds and index < len(messages):
        opened = opener.open(messages[index], topic=TELEMETRY)
        # What the telemetry stage does before its export policy: decode (and verify a
        # signature against the vehicle's directory key), one ``Telemetry`` per reading.
        payload = decode_batch_payload(opened.payload)  # type: ignore[union-attr]
        if isinstance(payload, SignedTelemetryBatch):
            sender = payload.batch.vehicle_id
            payload.verify(directory.verifier_for(sender, payload.key_id, at=NOW))
            payload = payload.batch
        opened_readings += len(payload.telemetry())
        index += 1
    return round(opened_readings / (time.thread_time() - cpu))


def telemetry(vehicles: int, seconds: float) -> list[dict[str, Any]]:
    directory = Directory()
    bus_keys, bus_own = kem_party("bus-sealer")
    rows: list[dict[str, Any]] = []
    names = [f"V-{i:05d}" for i in range(vehicles)]
    signers = {n: principal(n, "ed25519", directory) for n in names}
    profile_ed = profile("ed25519")
    shared = ProfileSealer(runner(), provider_timeout_s=None)
    sealers = {
        n: EpochSealer(n, signers[n], shared, direction=Direction.UPLINK, epochs=EpochPolicy())
        for n in names
    }
    store = MemoryEpochStore()
    opener = EpochOpener(
        bus_own,
        directory,
        runner(),
        KeyPath.parse("xwing"),
        store=store,
        direction=Direction.UPLINK,
        max_lifetime_s=3600,
    )
    setup = time.perf_counter()
    for n in names:  # one establishment per vehicle: the epochs the worker holds at once
        req = SealRequest("tel", TELEMETRY, bus_keys, "t", "", b"x", NOW, NOW + 300, profile_ed)
        est, first = sealers[n].seal(req)
        assert isinstance(opener.open(est, topic=TELEMETRY), AcceptedEpoch)
        opener.open(first, topic=TELEMETRY)
    setup_s = time.perf_counter() - setup
    # Only its size is measured: a second key of V-00001, outside the benchmark's directory.
    composite_suite = load_signature_suite("composite-mldsa65-ed25519")
    composite = composite_suite.signer(composite_suite.generate()[0], "V-00001/sig/2")
    for per_batch in BATCHES:
        sample = readings(per_batch, NOW)
        plain = sum(len(Telemetry("V-00001", r["at"] / 1000, r["fields"]).encode()) for r in sample)
        payload = batch_payload("V-00001", sample)
        v1 = EnvelopeSealer("V-00001", signers["V-00001"], shared, epochs=EpochPolicy())
        v1_req = SealRequest(
            "tel", TELEMETRY, bus_keys, "tel-1", "telemetry", payload, NOW, NOW + 300, profile_ed
        )
        v1.seal_batch([v1_req])
        v1_bytes = len(v1.seal_batch([v1_req])[0])
        # Messages to open: round-robin over every vehicle, pre-sealed so only opening is timed.
        messages: list[bytes] = []
        budget = max(200, min(20_000, int(60_000 / per_batch)))
        for i in range(budget):
            n = names[i % vehicles]
            req = SealRequest(
                "tel", TELEMETRY, bus_keys, f"tel-{i}", "", batch_payload(n, sample), NOW,
                NOW + 300, profile_ed,
            )  # fmt: skip
            (msg,) = sealers[n].seal(req)
            messages.append(msg)
        v2_bytes = len(messages[0])
        # The same batch signed by its vehicle (docs/sdk.md, "Signed telemetry"), in the
        # same epoch: the signature is all that differs.
        signed_bytes = {}
        for suite, signer in (("ed25519", signers["V-00001"]), ("composite", composite)):
            batch = TelemetryBatch.decode(batch_payload("V-00001", sample))
            req = SealRequest(
                "tel", TELEMETRY, bus_keys, f"tel-{suite}", "",
                SignedTelemetryBatch.sign(batch, signer).encode(), NOW, NOW + 300, profile_ed,
            )  # fmt: skip
            (msg,) = sealers["V-00001"].seal(req)
            signed_bytes[suite] = len(msg)
        signed_messages: list[bytes] = []
        for i in range(budget):
            n = names[i % vehicles]
            batch = TelemetryBatch.decode(batch_payload(n, sample))
            req = SealRequest(
                "tel", TELEMETRY, bus_keys, f"tel-s-{i}", "",
                SignedTelemetryBatch.sign(batch, signers[n]).encode(), NOW, NOW + 300,
                profile_ed,
            )  # fmt: skip
            (msg,) = sealers[n].seal(req)
            signed_messages.append(msg)
        rate = verified_readings_per_cpu_s(opener, messages, seconds, directory)
        signed_rate = verified_readings_per_cpu_s(opener, signed_messages, seconds, directory)
        rows.append(
            {
                "readings_per_batch": per_batch,
                "plain_bytes_per_reading": round(plain / per_batch, 1),
                "plain_batched_bytes_per_reading": round(len(payload) / per_batch, 1),
                "v1_bytes_per_reading": round(v1_bytes / per_batch, 1),
                "v2_bytes_per_reading": round(v2_bytes / per_batch, 1),
                "v2_vs_plain": round(v2_bytes / plain, 3),
                "v2_signed_ed25519_bytes_per_reading": round(
                    signed_bytes["ed25519"] / per_batch, 1
                ),
                "v2_signed_composite_bytes_per_reading": round(
                    signed_bytes["composite"] / per_batch, 1
                ),
                "verified_readings_per_cpu_s": rate,
                "verified_signed_ed25519_readings_per_cpu_s": signed_rate,
                "open_epochs": len(store),
            }
        )
    rows.append({"setup_epochs": vehicles, "setup_s": round(setup_s, 2)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vehicles", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    down = [downlink(s, d) for s in SUITES for d in SUITES]
    print("downlink command on xwing (bytes)")
    print(
        f"{'bus suite':>28} {'dispatcher':>28} {'plain':>6} {'signed':>6} {'v1':>6} "
        f"{'v2 est':>6} {'v2 msg':>6} {'v2-pay':>6} {'v2/100':>6}"
    )
    for r in down:
        print(
            f"{r['sealer_suite']:>28} {r['dispatcher_suite']:>28} {r['plain_command']:>6} "
            f"{r['signed_command']:>6} {r['v1_envelope']:>6} {r['v2_establishment']:>6} "
            f"{r['v2_message']:>6} {r['v2_overhead']:>6} {r['v2_per_command_in_epoch']:>6}"
        )
    print("\nv2 message overhead, field by field (bytes)")
    for name, size in down[0]["v2_message_breakdown"].items():
        print(f"  {name:<40} {size:>4}")
    print("\nrecords of one routine command, request to final status (bytes, keys included)")
    for r in down:
        plain, v1, v2 = r["command_total_plain"], r["command_total_v1"], r["command_total_v2"]
        v2e = r["command_total_v2_amortised"]
        print(
            f"{r['sealer_suite']:>28} {r['dispatcher_suite']:>28} plain {plain}"
            f"  v1 {v1} ({v1 / plain:.2f}x)  v2 {v2} ({v2 / plain:.2f}x)"
            f"  v2+est/{EPOCH_COMMANDS} {v2e} ({v2e / plain:.2f}x)"
        )
    r = down[0]
    print(
        f"  answers (ed25519 vehicle): v1 {r['v1_response']} B keyed by command id, v2 "
        f"{r['v2_response']} B keyed by vehicle id, verified record {r['verified_response']} B"
    )
    tel = telemetry(args.vehicles, args.seconds)
    print(f"\ntelemetry, {args.vehicles} vehicles' uplink epochs open (bytes per reading)")
    for r in tel[:-1]:
        print(
            f"  {r['readings_per_batch']:>3}/batch  plain {r['plain_bytes_per_reading']:>6}  "
            f"v1 {r['v1_bytes_per_reading']:>7}  v2 {r['v2_bytes_per_reading']:>6} "
            f"({r['v2_vs_plain']}x plain)  signed: ed25519 "
            f"{r['v2_signed_ed25519_bytes_per_reading']:>6} composite "
            f"{r['v2_signed_composite_bytes_per_reading']:>7}  "
            f"{r['verified_readings_per_cpu_s']:>7} readings/cpu-s "
            f"({r['verified_signed_ed25519_readings_per_cpu_s']} signed ed25519)"
        )
    print(f"  setup: {tel[-1]['setup_epochs']} epochs established in {tel[-1]['setup_s']} s")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "machine": {
                    "python": platform.python_version(),
                    "cpus": os.cpu_count(),
                    "platform": platform.platform(),
                },
                "downlink": down,
                "telemetry": tel,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()

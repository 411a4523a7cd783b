"""Build the hostile-input corpus (``cases/<target>/<name>.json``) and its test fleet (``fleet/``).

Run by hand, never by tests: ``.venv/bin/python tests/vectors/hostile/generate.py``. The
committed files are the source of truth; ``tests/unit/test_hostile_corpus.py`` and
``tests/integration/test_hostile_pipeline.py`` load them.

Determinism: every key is SHA-256 of a fixed label (test keys only, never use them elsewhere),
every signature is Ed25519 (deterministic), ids, times, IVs, epoch ids and key-path secrets come
from a seeded DRBG. The one exception is the HPKE ephemeral key inside the key refs of envelope
cases (``cryptography`` draws it from OpenSSL): regenerating changes those bytes, never a case's
expected reason code. ``--check`` regenerates into a temporary folder and reports which files
differ in more than those bytes (it compares everything but ``value``/``key`` of envelope cases).

Case file (JSON)::

    name, target, category, description
    key       hex | null                  Kafka record key
    value     hex | null                  record value (null: a tombstone)
    value_gen [[hex, n], ...]             instead of value: each hex string repeated n times
    headers   [[name, hex], ...]          Kafka headers (never trusted: must change nothing)
    setup     [case name, ...]            cases fed first, in order (they expect ok/pending)
    expect    reason code (bus/errors.py) | "ok" | "pending"
    dlq_of    name of the case whose bytes the DLQ record carries (default: this case)
    after_approval_window  true: the rejection comes from the approval-window timer

Targets: ``commands.requested`` / ``commands.approvals`` (authorize stage),
``commands.responses`` (track stage), ``telemetry.raw`` (telemetry stage) — all the worker's —
and ``commands.outbound`` (a VehicleAgent); ``keys`` (a ``KeyDirectory`` following the key
topic from the fleet's ``directory.cbor``). Topic names carry the fixed prefix ``hostile.``
because envelopes bind the full topic name.

Over 500 lines because it is one deterministic generator: every case shares the seeded DRBG, the
fleet and the encoders, and the committed corpus is its output.
"""

from __future__ import annotations

import argparse
import dataclasses
import filecmp
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cbor2
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519

from fleetbus.bus.commands import (
    APPROVAL_CONTEXT,
    Approval,
    Command,
    Decision,
    Response,
    SignedApproval,
    SignedCommand,
    Target,
    Telemetry,
    UUIDv7Generator,
)
from fleetbus.bus.directory import (
    HEAD_KAFKA_KEY,
    FleetRoot,
    KeyDirectory,
    KeyRecord,
    PrincipalKeyFile,
    RootPublicKey,
    derive_key_id,
    sign_directory,
    to_kafka,
    write_directory_file,
)
from fleetbus.bus.keys import KeyPath, RecipientKeys, SecurityProfile
from fleetbus.bus.registry import load_key_provider
from fleetbus.providers.hpke import XWingProvider
from fleetbus.providers.keypath import KeyPathRunner, ProfileSealer
from fleetbus.providers.sealing import EnvelopeSealer, SealRequest

HERE = Path(__file__).resolve().parent
PREFIX = "hostile."
SUITE = "ed25519"

# Fixed times (UTC seconds). Valid cases are valid from 2026-01-01 to 2099-01-01, so they stay
# valid for the wall clock of integration tests; unit tests open at OPEN_AT.
OPEN_AT = 1_800_000_000.0  # 2027-01-15
KEY_NOT_BEFORE = 1_735_689_600.0  # 2025-01-01
KEY_NOT_AFTER = 4_102_444_800.0  # 2100-01-01
ISSUED = 1_767_225_600.0  # 2026-01-01
EXPIRES = 4_070_908_800.0  # 2099-01-01
OLD_EXPIRES = ISSUED + 60.0  # expired long before any test runs
FUTURE_ISSUED = 4_060_000_000.0  # 2098-08
TOO_LONG_EXPIRES = 4_900_000_000.0  # lifetime above the worker's replay_ttl_s (3e9 s)
REVOKED_AT = 1_750_000_000.0
EXPIRED_KEY_NOT_AFTER = 1_751_328_000.0  # 2025-07-01
#: What the worker of the integration test must be configured with for these cases.
WORKER_SETTINGS = {
    "replay_ttl_s": 3e9,
    "approval_window_s": 15.0,
    "approvals_required": 1,
    "uplink_max_lifetime_s": 3e9,  # the envelopes expire in 2099; TOO_LONG_EXPIRES is beyond
}

SEALER = "bus-sealer"
DISPATCHER = "dispatch-1"
APPROVER = "dispatch-2"
REVOKED_DISPATCHER = "dispatch-revoked"
EXPIRED_DISPATCHER = "dispatch-expired"
INTRUDER = "intruder"
V1, V2, V_REVOKED = "V-0001", "V-0002", "V-0099"


def topic(name: str) -> str:
    return PREFIX + name


REQUESTED = "commands.requested"
APPROVALS = "commands.approvals"
KEYS = "keys"
RESPONSES = "commands.responses"
TELEMETRY = "telemetry.raw"
OUTBOUND = "commands.outbound"


# --- deterministic randomness --------------------------------------------------------------


class Drbg:
    """SHA-256 counter-mode byte stream (test data only)."""

    def __init__(self, seed: bytes) -> None:
        self.seed, self.counter = seed, 0

    def __call__(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            out += hashlib.sha256(self.seed + self.counter.to_bytes(8, "big")).digest()
            self.counter += 1
        return out[:n]


@contextmanager
def seeded_urandom(drbg: Drbg) -> Iterator[None]:
    """IVs, epoch ids and key-path secrets (``os.urandom``) from ``drbg``."""
    real = os.urandom
    os.urandom = drbg  # type: ignore[assignment]
    try:
        yield
    finally:
        os.urandom = real


def secret(label: str) -> bytes:
    return hashlib.sha256(b"fleetbus hostile corpus test key/" + label.encode()).digest()


# --- the fleet -----------------------------------------------------------------------------


def principal_keys(label: str, kems: tuple[str, ...]) -> tuple[dict[str, bytes], dict[str, bytes]]:
    sk = secret(f"{label}/ed25519")
    private = {"ed25519": sk}
    public = {
        "ed25519": ed25519.Ed25519PrivateKey.from_private_bytes(sk).public_key().public_bytes_raw()
    }
    for kem in kems:
        seed = secret(f"{label}/{kem}")
        if kem == "x25519":
            x_key = x25519.X25519PrivateKey.from_private_bytes(seed)
            public[kem] = x_key.public_key().public_bytes_raw()
        elif kem == "xwing":
            public[kem] = XWingProvider.public_from_seed(seed)
        else:  # pragma: no cover
            raise ValueError(kem)
        private[kem] = seed
    return private, public


class Fleet:
    """The corpus fleet: one root, principals with fixed keys, revocations in the directory."""

    def __init__(self) -> None:
        root_sk = secret("root/ed25519")
        root_pub = {
            "ed25519": ed25519.Ed25519PrivateKey.from_private_bytes(root_sk)
            .public_key()
            .public_bytes_raw()
        }
        self.root = FleetRoot(
            {"ed25519": root_sk}, RootPublicKey(derive_key_id(root_pub), SUITE, root_pub)
        )
        stranger_sk = secret("stranger-root/ed25519")
        stranger_pub = {
            "ed25519": ed25519.Ed25519PrivateKey.from_private_bytes(stranger_sk)
            .public_key()
            .public_bytes_raw()
        }
        stranger = FleetRoot(
            {"ed25519": stranger_sk},
            RootPublicKey(derive_key_id(stranger_pub), SUITE, stranger_pub),
        )
        self.files: dict[str, PrincipalKeyFile] = {}
        self.signed: list[Any] = []
        kems = ("xwing", "x25519")
        specs: list[tuple[str, str, str, int, tuple[str, ...], tuple[str, ...], float, bool]] = [
            # file name, principal, kind, version, kems, groups, not_after, revoked
            ("bus-sealer.v1", SEALER, "sealer", 1, kems, (), KEY_NOT_AFTER, True),
            (SEALER, SEALER, "sealer", 2, kems, (), KEY_NOT_AFTER, False),
            (DISPATCHER, DISPATCHER, "dispatcher", 1, (), (), KEY_NOT_AFTER, False),
            (APPROVER, APPROVER, "approver", 1, (), (), KEY_NOT_AFTER, False),
            (REVOKED_DISPATCHER, REVOKED_DISPATCHER, "dispatcher", 1, (), (), KEY_NOT_AFTER, True),
            (EXPIRED_DISPATCHER, EXPIRED_DISPATCHER, "dispatcher", 1, (), (),
             EXPIRED_KEY_NOT_AFTER, False),
            (V1, V1, "vehicle", 1, kems, ("north",), KEY_NOT_AFTER, False),
            (V2, V2, "vehicle", 1, kems, ("north",), KEY_NOT_AFTER, False),
            (V_REVOKED, V_REVOKED, "vehicle", 1, kems, ("south",), KEY_NOT_AFTER, True),
        ]  # fmt: skip
        for file_name, pid, kind, version, kem_list, groups, not_after, revoked in specs:
            private, public = principal_keys(file_name, kem_list)
            record = KeyRecord(
                principal_id=pid,
                kind=kind,
                version=version,
                key_id=derive_key_id(public),
                public_keys=public,
                signature_suite=SUITE,
                capabilities=frozenset({"pqc"} if "xwing" in public else ()),
                not_before=KEY_NOT_BEFORE,
                not_after=not_after,
                groups=frozenset(groups),
            )
            self.signed.append(self.root.sign(record))
            if revoked:
                self.signed.append(self.root.sign(record.revocation(at=REVOKED_AT)))
            self.files[file_name] = PrincipalKeyFile.from_record(record, private)
        # The intruder's record is signed by another root and is not in the directory.
        private, public = principal_keys(INTRUDER, ())
        record = KeyRecord(
            principal_id=INTRUDER,
            kind="dispatcher",
            version=1,
            key_id=derive_key_id(public),
            public_keys=public,
            signature_suite=SUITE,
            not_before=KEY_NOT_BEFORE,
            not_after=KEY_NOT_AFTER,
        )
        self.intruder_record = stranger.sign(record)
        self.stranger = stranger
        self.files[INTRUDER] = PrincipalKeyFile.from_record(record, private)
        add_not_yet_valid_principals(self, kems)
        self.directory = KeyDirectory(self.root.public)
        self.directory.ingest_all(self.signed)
        # Directory heads: 1 before the revocations, 2 (the fleet's file) after them.
        issuances = [s for s in self.signed if not s.record.revoked]
        self.head_before, _ = sign_directory(self.root, issuances, at=KEY_NOT_BEFORE)
        self.head, self.records = sign_directory(
            self.root, self.signed, previous=self.head_before.head, at=REVOKED_AT
        )

    def write(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "root.pub").write_bytes(self.root.public.to_bytes())
        write_directory_file(folder / "directory.cbor", self.head, self.records)
        for name, key_file in sorted(self.files.items()):
            (folder / f"{name}.key").write_bytes(key_file.to_json())

    def signer(self, name: str) -> Any:
        return self.files[name].signer()

    def recipient(self, principal: str) -> RecipientKeys:
        return self.directory.recipient_keys(principal, at=OPEN_AT)


def runner() -> KeyPathRunner:
    return KeyPathRunner({n: load_key_provider(n) for n in ("x25519", "xwing")})


def profile(path: str) -> SecurityProfile:
    key_path = KeyPath.parse(path)
    return SecurityProfile(
        name=f"corpus-{path}",
        key_paths=(key_path,),
        signature_suite=SUITE,
        allow_fallback=False,
        minimum_path=key_path,
    )


# --- CBOR helpers for hand-made mutations --------------------------------------------------


def dumps(value: object) -> bytes:
    return cbor2.dumps(value, canonical=True)


def head(major: int, n: int, *, long_form: bool = False) -> bytes:
    """A CBOR item head; ``long_form`` uses a 4-byte argument (non-canonical for small n)."""
    if long_form:
        return bytes([(major << 5) | 26]) + n.to_bytes(4, "big")
    if n < 24:
        return bytes([(major << 5) | n])
    for info, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if n < 1 << (8 * size):
            return bytes([(major << 5) | info]) + n.to_bytes(size, "big")
    raise ValueError(n)


def split_envelope(env: bytes) -> tuple[dict[int, Any], bytes, list[Any]]:
    """(protected header map, ciphertext, signature block) of an envelope."""
    outer = cbor2.loads(env)
    _version, encrypt0, block = outer.value
    protected, _unprotected, ciphertext = encrypt0.value
    return dict(cbor2.loads(protected)), ciphertext, list(block)


def join_envelope(
    protected: bytes, ciphertext: bytes, block: list[Any], *, version: int = 1
) -> bytes:
    encrypt0 = cbor2.CBORTag(16, [protected, {}, ciphertext])
    return dumps(cbor2.CBORTag(0x66627573, [version, encrypt0, block]))


def tbs(protected: bytes, ciphertext: bytes) -> bytes:
    return dumps(["Signature1", protected, b"", ciphertext])


def resign(protected: bytes, ciphertext: bytes, signer: Any) -> list[Any]:
    return [0, signer.sign(tbs(protected, ciphertext))]


def with_header(env: bytes, changes: dict[int, Any], *, signer: Any = None) -> bytes:
    """Change protected-header fields; keep the old signature unless ``signer`` re-signs."""
    fields, ciphertext, block = split_envelope(env)
    fields.update(changes)
    protected = dumps(fields)
    if signer is not None:
        block = resign(protected, ciphertext, signer)
    return join_envelope(protected, ciphertext, block)


LABEL = {
    "version": -65537,
    "topic": -65539,
    "recipient": -65540,
    "message_id": -65541,
    "expires": -65544,
    "key_path": -65545,
    "key_refs": -65546,
    "sender": -65547,
    "suite": -65549,
    "epoch_id": -65550,
    "issued": -65543,
}


def ms(seconds: float) -> int:
    return round(seconds * 1000)


# --- the corpus ----------------------------------------------------------------------------


class Corpus:
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.cases: dict[str, dict[str, Any]] = {}
        self.ids = UUIDv7Generator(clock_ms=lambda: ms(ISSUED), random_bytes=Drbg(b"command ids"))

    def add(
        self,
        target: str,
        name: str,
        category: str,
        description: str,
        expect: str,
        *,
        value: bytes | None = None,
        value_gen: list[list[Any]] | None = None,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        setup: list[str] | None = None,
        dlq_of: str | None = None,
        after_approval_window: bool = False,
    ) -> None:
        assert name not in self.cases, name
        for dep in setup or []:
            assert dep in self.cases, (name, dep)
        case: dict[str, Any] = {
            "name": name,
            "target": target,
            "category": category,
            "description": description,
            "expect": expect,
            "key": None if key is None else key.hex(),
            "headers": [[h, v.hex()] for h, v in headers or []],
            "setup": setup or [],
        }
        if value_gen is not None:
            case["value_gen"] = value_gen
        else:
            case["value"] = None if value is None else value.hex()
        if dlq_of:
            case["dlq_of"] = dlq_of
        if after_approval_window:
            case["after_approval_window"] = True
        self.cases[name] = case

    # -- builders -------------------------------------------------------------------------

    def command(
        self,
        *,
        issuer: str = DISPATCHER,
        vehicle: str = V1,
        action: str = "ping",
        issued: float = ISSUED,
        expires: float = EXPIRES,
        signer: str | None = None,
    ) -> SignedCommand:
        command = Command(
            id=self.ids.new(),
            issuer=issuer,
            target=Target(vehicle=vehicle),
            action=action,
            params={},
            issued_at=issued,
            expires_at=expires,
        )
        return SignedCommand.sign(command, self.fleet.signer(signer or issuer))

    def approval(
        self, command: SignedCommand, *, approver: str = APPROVER, issued: float = ISSUED
    ) -> SignedApproval:
        approval = Approval.for_command(command, approver=approver, issued_at=issued)
        return SignedApproval.sign(approval, self.fleet.signer(approver))

    def envelope(
        self,
        *,
        sender: str,
        recipient: str,
        topic_name: str,
        kind: str,
        message_id: str,
        action: str,
        payload: bytes,
        path: str = "xwing",
        issued: float = ISSUED,
        expires: float = EXPIRES,
        sender_file: str | None = None,
    ) -> bytes:
        sealer = EnvelopeSealer(
            sender,
            self.fleet.signer(sender_file or sender),
            ProfileSealer(runner()),
            clock=lambda: OPEN_AT,
        )
        return sealer.seal(
            kind,
            topic(topic_name),
            self.fleet.recipient(recipient),
            message_id,
            action,
            payload,
            issued,
            expires,
            profile(path),
        )

    def batch(self, *, sender: str, requests: list[tuple[str, bytes]], kind: str,
              topic_name: str, recipient: str, action: str) -> list[bytes]:  # fmt: skip
        sealer = EnvelopeSealer(
            sender,
            self.fleet.signer(sender),
            ProfileSealer(runner()),
            batch_signing=True,
            clock=lambda: OPEN_AT,
        )
        rcpt = self.fleet.recipient(recipient)
        return sealer.seal_batch(
            [
                SealRequest(kind, topic(topic_name), rcpt, mid, action, payload, ISSUED,
                            EXPIRES, profile("xwing"))
                for mid, payload in requests
            ]
        )  # fmt: skip

    def response(self, vehicle: str = V1, *, command_id: str | None = None, **kw: Any) -> bytes:
        cid = command_id or self.ids.new()
        payload = Response(
            command_id=kw.pop("payload_command_id", cid),
            vehicle_id=kw.pop("payload_vehicle", vehicle),
            status=200,
            detail="ok",
            executed_at=ISSUED,
        ).encode()
        return self.envelope(
            sender=vehicle,
            recipient=SEALER,
            topic_name=kw.pop("topic_name", RESPONSES),
            kind=kw.pop("kind", "rsp"),
            message_id=cid,
            action="response",
            payload=kw.pop("payload", payload),
            **kw,
        )

    def telemetry(self, vehicle: str = V1, **kw: Any) -> bytes:
        payload = Telemetry(
            vehicle_id=kw.pop("payload_vehicle", vehicle), at=ISSUED, fields={"speed_kmh": 42}
        ).encode()
        return self.envelope(
            sender=vehicle,
            recipient=SEALER,
            topic_name=TELEMETRY,
            kind="tel",
            message_id=self.ids.new(),
            action="telemetry",
            payload=kw.pop("payload", payload),
            **kw,
        )

    def outbound(self, command: SignedCommand | None = None, *, vehicle: str = V1,
                 **kw: Any) -> bytes:  # fmt: skip
        signed = command or self.command(vehicle=vehicle)
        return self.envelope(
            sender=kw.pop("sender", SEALER),
            recipient=kw.pop("recipient", vehicle),
            topic_name=kw.pop("topic_name", OUTBOUND),
            kind="cmd",
            message_id=kw.pop("message_id", signed.command.id),
            action=kw.pop("action", signed.command.action),
            payload=kw.pop("payload", signed.encode()),
            **kw,
        )


def partition_of(key: bytes, partitions: int = 2) -> int:
    """Kafka's default partitioner (murmur2), as for the integration test's 2 partitions."""
    from kafka.partitioner import murmur2

    return (murmur2(key) & 0x7FFFFFFF) % partitions


def other_partition_key(key: bytes) -> bytes:
    """A key that Kafka puts on another partition than ``key`` (of 2)."""
    for i in range(100):
        candidate = f"replay-under-another-key-{i}".encode()
        if partition_of(candidate) != partition_of(key):
            return candidate
    raise AssertionError("no key on the other partition")


def flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


def bombs(c: Corpus, target: str, key: bytes) -> None:
    """Compression-bomb style inputs: tiny records that declare or nest huge structures."""
    cat = "compression-bomb"
    short = {REQUESTED: "cmd", RESPONSES: "rsp", TELEMETRY: "tel", OUTBOUND: "veh"}[target]
    n = 30000 if target == REQUESTED else 60000  # under each reader's size limit
    c.add(target, f"{short}-bomb-deep-arrays", cat,
          f"{n:,} nested one-element arrays (stack/recursion bomb): rejected at the depth limit",
          "malformed", value_gen=[["81", n], ["00", 1]],
          key=key)  # fmt: skip
    c.add(target, f"{short}-bomb-deep-maps", cat,
          f"{n // 2:,} nested one-entry maps {{0: {{0: ...}}}}: rejected at the depth limit",
          "malformed", value_gen=[["a100", n // 2], ["00", 1]],
          key=key)  # fmt: skip
    c.add(target, f"{short}-bomb-deep-tags", cat, f"{n:,} nested CBOR tags 6(6(6(...)))",
          "malformed", value_gen=[["c6", n], ["00", 1]],
          key=key)  # fmt: skip
    c.add(target, f"{short}-bomb-array-declares-2e63", cat,
          "an array head declaring 2^63-1 elements and no content (must not pre-allocate)",
          "malformed", value=bytes.fromhex("9b7fffffffffffffff"), key=key)  # fmt: skip
    c.add(target, f"{short}-bomb-map-declares-2e32", cat,
          "a map head declaring 2^32-1 pairs and no content", "malformed",
          value=bytes.fromhex("baffffffff"), key=key)  # fmt: skip
    c.add(target, f"{short}-bomb-bstr-declares-2e63", cat,
          "a byte string declaring 2^63-1 bytes, 9 bytes long", "malformed",
          value=bytes.fromhex("5b7fffffffffffffff"), key=key)  # fmt: skip
    c.add(target, f"{short}-bomb-tstr-declares-4gib", cat, "a text string declaring 4 GiB",
          "malformed",
          value=bytes.fromhex("7affffffff") + b"abc", key=key)  # fmt: skip
    c.add(target, f"{short}-bomb-array-of-declared-arrays", cat,
          "255 elements, each an array declaring 2^28 elements", "malformed",
          value=bytes.fromhex("98ff") + bytes.fromhex("9a10000000") * 255, key=key)  # fmt: skip
    c.add(target, f"{short}-bomb-indefinite-nesting", cat,
          f"{n // 2:,} nested indefinite-length arrays, all closed", "malformed",
          value_gen=[["9f", n // 2], ["ff", n // 2]],
          key=key)  # fmt: skip
    c.add(target, f"{short}-bomb-indefinite-bstr-chunks", cat,
          "an indefinite-length byte string of 10,000 one-byte chunks (indefinite lengths are "
          "never canonical)", "malformed",
          value_gen=[["5f", 1], ["4161", 10000], ["ff", 1]],
          key=key)  # fmt: skip


def build(fleet: Fleet) -> Corpus:
    c = Corpus(fleet)
    with seeded_urandom(Drbg(b"hostile corpus")):
        build_commands(c)
        build_approvals(c)
        build_responses(c)
        build_telemetry(c)
        build_outbound(c)
        build_uplink(c)
        build_keys(c)
        build_approval_races(c)
        build_not_yet_valid_signers(c)
        build_wire_v2(c)
        build_vehicle_keyed_responses(c)
        build_approval_binding(c)
        build_uplink_recovery(c)
    return c


def build_commands(c: Corpus) -> None:
    t = REQUESTED
    base = c.command()
    b = base.encode()
    cid = base.command.id.encode()
    good = lambda name, desc, expect, value, **kw: c.add(  # noqa: E731
        t, name, kw.pop("category", "signature"), desc, expect, value=value,
        key=kw.pop("key", cid), **kw,
    )  # fmt: skip
    good("cmd-ok-base", "control: a valid routine command (ping V-0001), window 2026..2099",
         "ok", b, category="control")  # fmt: skip
    p = "parse"
    good("cmd-truncated", "the base command without its last 10 bytes", "malformed", b[:-10],
         category=p)  # fmt: skip
    good("cmd-truncated-head", "only the first byte of the base command", "malformed", b[:1],
         category=p)  # fmt: skip
    good("cmd-empty", "an empty (zero-byte) value", "malformed", b"", category=p)
    good("cmd-tombstone", "a null value (Kafka tombstone)", "malformed", None, category=p)
    c.add(t, "cmd-oversize", "size",
          "a 40,000-byte value (limit 32 KiB): rejected before parsing", "oversize",
          value_gen=[[b.hex(), 1], ["00", 40000 - len(b)]], key=cid)  # fmt: skip
    good("cmd-not-cbor", "bytes that are not CBOR at all", "malformed", b"\xff\x00garbage",
         category=p)  # fmt: skip
    good("cmd-trailing-bytes", "a valid command followed by one extra byte", "malformed",
         b + b"\x00", category=p)  # fmt: skip
    items = cbor2.loads(b)
    body = dict(items[1])
    w = "wrong-type"
    good("cmd-map-instead-of-array", "the body map alone, without the signed wrapper",
         "malformed", dumps(body), category=w)  # fmt: skip
    good("cmd-issued-at-text", "issued_at as a text string", "malformed",
         dumps([1, {**body, "issued_at": "2026-01-01"}, *items[2:]]), category=w)  # fmt: skip
    good("cmd-priority-bool", "priority as a boolean", "malformed",
         dumps([1, {**body, "priority": True}, *items[2:]]), category=w)  # fmt: skip
    good("cmd-signature-text", "signature as a text string", "malformed",
         dumps([*items[:4], items[4].hex()]), category=w)  # fmt: skip
    good("cmd-extra-field", "an extra body field (role: admin)", "malformed",
         dumps([1, {**body, "role": "admin"}, *items[2:]]), category=w)  # fmt: skip
    good("cmd-params-nested-map", "a parameter value that is a map", "malformed",
         dumps([1, {**body, "params": {"x": {"y": 1}}}, *items[2:]]), category=w)  # fmt: skip
    # Duplicate map keys: the body map with "action" twice (second value "unlock_doors").
    enc_body = dumps(body)
    n = len(body)
    assert enc_body[0] == 0xA0 + n
    dup = bytes([0xA0 + n + 1]) + dumps("action") + dumps("unlock_doors") + enc_body[1:]
    good("cmd-duplicate-map-key", "the body map has 'action' twice (ping, unlock_doors)",
         "malformed", head(4, 5) + dumps(1) + dup + b"".join(dumps(x) for x in items[2:]),
         category="non-canonical")  # fmt: skip
    nc = "non-canonical"
    good("cmd-long-form-int", "version 1 encoded as a 4-byte integer (0x1a00000001)",
         "malformed", head(4, 5) + head(0, 1, long_form=True) + b[2:], category=nc)  # fmt: skip
    good("cmd-indefinite-array", "the outer array with indefinite length", "malformed",
         b"\x9f" + b[1:] + b"\xff", category=nc)  # fmt: skip
    unsorted = cbor2.dumps([1, dict(sorted(body.items(), reverse=True)), *items[2:]])
    good("cmd-unsorted-map-keys", "body map keys in reverse order", "malformed", unsorted,
         category=nc)  # fmt: skip
    good("cmd-unknown-version", "wire version 2", "unsupported_version",
         dumps([2, *items[1:]]), category="version")  # fmt: skip
    good("cmd-version-zero", "wire version 0", "unsupported_version",
         dumps([0, *items[1:]]), category="version")  # fmt: skip
    good("cmd-forged-signature", "every signature bit inverted", "bad_signature",
         dumps([*items[:4], bytes(x ^ 0xFF for x in items[4])]))  # fmt: skip
    good("cmd-stripped-signature", "signature replaced by an empty byte string", "malformed",
         dumps([*items[:4], b""]))  # fmt: skip
    good("cmd-signature-removed", "the signature element removed (4-element array)",
         "malformed", dumps(items[:4]))  # fmt: skip
    other = c.command()
    good("cmd-swapped-signature", "the signature of another command of the same issuer",
         "bad_signature", dumps([*items[:4], other.signature]))  # fmt: skip
    good("cmd-suite-swapped", "suite field says mldsa65 for an Ed25519 signature",
         "bad_signature", dumps([*items[:3], "mldsa65", items[4]]))  # fmt: skip
    approver_kid = c.fleet.files[APPROVER].key_id
    good("cmd-key-id-of-other-principal", "issuer key id of dispatch-2 with dispatch-1 as issuer",
         "unknown_signer", dumps([items[0], items[1], approver_kid, *items[3:]]))  # fmt: skip
    good("cmd-issuer-swapped", "issuer changed to dispatch-2, dispatch-1's key id and signature",
         "unknown_signer", dumps([1, {**body, "issuer": APPROVER}, *items[2:]]))  # fmt: skip
    revoked = c.command(issuer=REVOKED_DISPATCHER)
    good("cmd-revoked-signer", "signed by dispatch-revoked, whose key the directory revokes",
         "signer_revoked", revoked.encode(), key=revoked.command.id.encode())  # fmt: skip
    resigned = c.command(issuer=DISPATCHER, signer=REVOKED_DISPATCHER)
    good("cmd-resigned-by-revoked-key",
         "dispatch-1's command re-signed with dispatch-revoked's (revoked) key and key id",
         "unknown_signer", resigned.encode(), key=resigned.command.id.encode())  # fmt: skip
    expired_key = c.command(issuer=EXPIRED_DISPATCHER)
    good("cmd-expired-signer", "signed by a key whose validity ended 2025-07-01",
         "signer_expired", expired_key.encode(), key=expired_key.command.id.encode())  # fmt: skip
    intr = c.command(issuer=INTRUDER)
    good("cmd-unknown-signer", "signed by the intruder (record signed by another root)",
         "unknown_signer", intr.encode(), key=intr.command.id.encode())  # fmt: skip
    f = "freshness"
    old = c.command(expires=OLD_EXPIRES)
    good("cmd-expired", "validly signed, expired 2026-01-01T00:01Z", "expired", old.encode(),
         key=old.command.id.encode(), category=f)  # fmt: skip
    old_items = cbor2.loads(old.encode())
    pushed = {**dict(old_items[1]), "expires_at": ms(EXPIRES)}
    good("cmd-expiry-pushed-forward", "the expired command with expires_at moved to 2099, "
         "not re-signed", "bad_signature", dumps([1, pushed, *old_items[2:]]),
         key=old.command.id.encode(), category=f)  # fmt: skip
    intruder = c.fleet.signer(INTRUDER)
    tbs_pushed = dumps(["fleetbus-command-v1", intruder.key_id, SUITE, pushed])
    good("cmd-expiry-pushed-forward-resigned", "expiry moved to 2099 and re-signed with a key "
         "that is not in the directory (issuer still dispatch-1)", "unknown_signer",
         dumps([1, pushed, intruder.key_id, SUITE, intruder.sign(tbs_pushed)]),
         key=old.command.id.encode(), category=f)  # fmt: skip
    future = c.command(issued=FUTURE_ISSUED)
    good("cmd-not-yet-valid", "issued in 2098", "not_yet_valid", future.encode(),
         key=future.command.id.encode(), category=f)  # fmt: skip
    too_long = c.command(expires=TOO_LONG_EXPIRES)
    good("cmd-lifetime-beyond-replay-window", "a lifetime longer than the worker's replay "
         "window (ids could be forgotten before expiry)", "policy_denied", too_long.encode(),
         key=too_long.command.id.encode(), category=f)  # fmt: skip
    r = "replay"
    good("cmd-replayed", "the base command again, same key", "replayed", b, category=r,
         setup=["cmd-ok-base"])  # fmt: skip
    good("cmd-replayed-under-other-key", "the base command again under a Kafka key that is not "
         "its command id (another partition, whose replay set has not seen it): the record key "
         "must be the command id", "malformed", b,
         key=other_partition_key(cid), category=r, setup=["cmd-ok-base"])  # fmt: skip
    good("cmd-replayed-to-other-vehicle", "the base command re-targeted at V-0002, not "
         "re-signed", "bad_signature",
         dumps([1, {**body, "target": {"vehicle": V2}}, *items[2:]]), category=r)  # fmt: skip
    good("cmd-replayed-as-group", "the base command re-targeted at group north",
         "bad_signature", dumps([1, {**body, "target": {"group": "north"}}, *items[2:]]),
         category=r)  # fmt: skip
    apr = c.approval(base)
    good("cmd-approval-on-requested", "a valid approval published on commands.requested",
         "malformed", apr.encode(), category=r)  # fmt: skip
    env = c.outbound(base)
    good("cmd-envelope-on-requested", "a sealed outbound envelope published on "
         "commands.requested", "malformed", env, category=r)  # fmt: skip
    unknown_vehicle = c.command(vehicle="V-9999")
    good("cmd-unknown-vehicle", "validly signed, for a vehicle the fleet does not have",
         "policy_denied", unknown_vehicle.encode(), key=unknown_vehicle.command.id.encode(),
         category="policy")  # fmt: skip
    by_approver = c.command(issuer=APPROVER)
    good("cmd-issuer-without-dispatch-role", "validly signed by the approver (not a "
         "dispatcher)", "policy_denied", by_approver.encode(),
         key=by_approver.command.id.encode(), category="policy")  # fmt: skip
    forged = dumps([*items[:4], flip(items[4], 3)])
    inject = [
        ("fleetbus-verified", b"true"), ("fleetbus-issuer", DISPATCHER.encode()),
        ("fleetbus-signature", base.signature), ("fleetbus-reason", b""),
        ("traceparent", b"00-" + b"f" * 32 + b"-" + b"f" * 16 + b"-01"),
    ]  # fmt: skip
    good("cmd-header-injection", "a forged signature with Kafka headers claiming it verified "
         "and carrying the real signature: headers are ignored", "bad_signature", forged,
         headers=inject, category="header-injection")  # fmt: skip
    bombs(c, t, b"bomb")


def build_approvals(c: Corpus) -> None:
    t = APPROVALS
    victim = c.command(action="unlock_doors")
    vid = victim.command.id.encode()
    c.add(REQUESTED, "apr-setup-pending-command", "control",
          "a high-criticality command (unlock_doors V-0001) that waits for one approval; "
          "rejected with policy_denied when its approval window elapses", "pending",
          value=victim.encode(), key=vid)  # fmt: skip
    apr = c.approval(victim)
    a = cbor2.loads(apr.encode())
    body = dict(a[1])
    add = lambda name, desc, expect, value, **kw: c.add(  # noqa: E731
        t, name, kw.pop("category", "signature"), desc, expect, value=value,
        key=kw.pop("key", vid), **kw,
    )  # fmt: skip
    add("apr-forged-signature", "approval with a flipped signature byte", "bad_signature",
        dumps([*a[:4], flip(a[4], 0)]), setup=["apr-setup-pending-command"])  # fmt: skip
    intr = c.approval(victim, approver=INTRUDER)
    add("apr-unknown-signer", "approval by the intruder", "unknown_signer", intr.encode())
    rev = SignedApproval.sign(
        Approval.for_command(victim, approver=APPROVER, issued_at=ISSUED),
        c.fleet.signer(REVOKED_DISPATCHER),
    )
    add("apr-resigned-by-revoked-key", "dispatch-2's approval signed with dispatch-revoked's "
        "revoked key and key id", "unknown_signer", rev.encode())  # fmt: skip
    rev2 = SignedApproval.sign(
        Approval.for_command(victim, approver=REVOKED_DISPATCHER, issued_at=ISSUED),
        c.fleet.signer(REVOKED_DISPATCHER),
    )
    add("apr-revoked-approver", "approval by dispatch-revoked (revoked key)", "signer_revoked",
        rev2.encode())  # fmt: skip
    other = c.approval(c.command())
    o = cbor2.loads(other.encode())
    moved = {**dict(o[1]), "command_id": victim.command.id}
    add("apr-from-another-command", "an approval of another command with its command id "
        "changed to the pending one, not re-signed", "bad_signature",
        dumps([1, moved, *o[2:]]), category="replay")  # fmt: skip
    add("apr-verbatim-for-another-command", "a valid approval of another command published "
        "under the pending command's key: the record key must be the command id the approval "
        "names, so it goes to the DLQ and approves nothing", "malformed",
        other.encode(), category="replay", setup=["apr-setup-pending-command"])  # fmt: skip
    add("apr-command-on-approvals", "the pending signed command published on "
        "commands.approvals", "malformed", victim.encode(), category="replay")  # fmt: skip
    add("apr-self-approval", "the issuer approves its own pending command", "policy_denied",
        c.approval(victim, approver=DISPATCHER).encode(), category="policy",
        setup=["apr-setup-pending-command"])  # fmt: skip
    future = c.approval(victim, issued=FUTURE_ISSUED)
    add("apr-not-yet-valid", "approval issued in 2098", "not_yet_valid", future.encode(),
        category="freshness")  # fmt: skip
    add("apr-truncated", "approval without its last byte", "malformed", apr.encode()[:-1],
        category="parse")  # fmt: skip
    add("apr-unknown-version", "approval wire version 7", "unsupported_version",
        dumps([7, *a[1:]]), category="version")  # fmt: skip
    add("apr-decision-maybe", "decision 'maybe' (not approve/deny)", "malformed",
        dumps([1, {**body, "decision": "maybe"}, *a[2:]]), category="wrong-type")  # fmt: skip
    add("apr-header-injection", "forged approval with headers naming a valid approver and "
        "decision: ignored", "bad_signature", dumps([*a[:4], flip(a[4], 1)]),
        headers=[("fleetbus-approver", APPROVER.encode()), ("fleetbus-decision", b"approve"),
                 ("fleetbus-verified", b"1")], category="header-injection")  # fmt: skip


# --- approval races between commands.requested and commands.approvals (issue 11, 1-2) -----


def build_approval_races(c: Corpus) -> None:
    """Approvals and denies that reach the authorize stage before their command. Each case is
    the command, fed after its early approval (the setup case, held: ``ok``); the same outcome
    is required when the command comes first (the integration test produces commands first).
    Own id stream, so that cases added elsewhere do not change these bytes, nor these theirs."""
    ids = UUIDv7Generator(clock_ms=lambda: ms(ISSUED), random_bytes=Drbg(b"approval races"))

    def early(name: str, desc: str, approver: str, decision: Decision) -> SignedCommand:
        command = Command(ids.new(), DISPATCHER, Target(vehicle=V1), "unlock_doors", {}, ISSUED,
                          EXPIRES)  # fmt: skip
        victim = SignedCommand.sign(command, c.fleet.signer(DISPATCHER))
        signed = SignedApproval.sign(
            Approval.for_command(victim, approver=approver, decision=decision, issued_at=ISSUED),
            c.fleet.signer(approver),
        )
        c.add(APPROVALS, name, "control", desc, "ok", value=signed.encode(),
              key=victim.command.id.encode())  # fmt: skip
        return victim

    by_vehicle = early("race-setup-vehicle-approves-first", "V-0001 approves a high-criticality "
                       "command to itself before the command arrives: held, not counted",
                       V1, Decision.APPROVE)  # fmt: skip
    c.add(REQUESTED, "race-vehicle-approval-before-command", "ordering-race",
          "the command V-0001 approved first: its approval is judged when the command arrives "
          "(a vehicle may not approve) and dead-lettered; the command waits for a real approver",
          "policy_denied", value=by_vehicle.encode(), key=by_vehicle.command.id.encode(),
          setup=["race-setup-vehicle-approves-first"],
          dlq_of="race-setup-vehicle-approves-first")  # fmt: skip
    by_issuer = early("race-setup-issuer-approves-first", "dispatch-1 approves its own command "
                      "before the command arrives: held, not counted", DISPATCHER,
                      Decision.APPROVE)  # fmt: skip
    c.add(REQUESTED, "race-self-approval-before-command", "ordering-race",
          "the command its issuer approved first: the self-approval is dead-lettered when the "
          "command arrives", "policy_denied", value=by_issuer.encode(),
          key=by_issuer.command.id.encode(), setup=["race-setup-issuer-approves-first"],
          dlq_of="race-setup-issuer-approves-first")  # fmt: skip
    vetoed = early("race-setup-approver-denies-first", "dispatch-2 (an approver) denies a "
                   "command before it arrives: held", APPROVER, Decision.DENY)  # fmt: skip
    c.add(REQUESTED, "race-deny-before-command", "ordering-race",
          "the command an approver denied first: rejected (vetoed) on arrival, not left to "
          "wait for an approval", "policy_denied", value=vetoed.encode(),
          key=vetoed.command.id.encode(),
          setup=["race-setup-approver-denies-first"])  # fmt: skip
    no_veto = early("race-setup-vehicle-denies-first", "V-0002 denies a command before it "
                    "arrives: held", V2, Decision.DENY)  # fmt: skip
    c.add(REQUESTED, "race-vehicle-deny-before-command", "ordering-race",
          "the command a vehicle denied first: the deny vetoes nothing (a vehicle may not "
          "approve) and is dead-lettered when the command arrives", "policy_denied",
          value=no_veto.encode(), key=no_veto.command.id.encode(),
          setup=["race-setup-vehicle-denies-first"],
          dlq_of="race-setup-vehicle-denies-first")  # fmt: skip


def build_responses(c: Corpus) -> None:
    t = RESPONSES
    cid = c.ids.new()
    base = c.response(command_id=cid)
    key = cid.encode()
    add = lambda name, desc, expect, value, **kw: c.add(  # noqa: E731
        t, name, kw.pop("category", "signature"), desc, expect, value=value,
        key=kw.pop("key", key), **kw,
    )  # fmt: skip
    add("rsp-ok-base", "control: V-0001's valid response envelope (xwing, Ed25519), for a "
        "command no authorized record has named V-0001 a target of yet: held, not an outcome",
        "pending", base, category="control")  # fmt: skip
    fields, ct, block = split_envelope(base)
    prot = dumps(fields)
    signer_v1 = c.fleet.signer(V1)
    add("rsp-truncated", "the base envelope cut in half", "malformed", base[: len(base) // 2],
        category="parse")  # fmt: skip
    c.add(t, "rsp-oversize", "size", "70,000 bytes (envelope limit 64 KiB)", "oversize",
          value_gen=[[base.hex(), 1], ["00", 70000 - len(base)]], key=key)  # fmt: skip
    add("rsp-forged-signature", "one signature byte flipped", "bad_signature",
        join_envelope(prot, ct, [0, flip(block[1], 10)]))  # fmt: skip
    add("rsp-flipped-ciphertext", "one ciphertext byte flipped (signature covers it)",
        "bad_signature", join_envelope(prot, flip(ct, 0), block))  # fmt: skip
    add("rsp-stripped-signature", "signature block [0, h'']", "malformed",
        join_envelope(prot, ct, [0, b""]))  # fmt: skip
    other = c.response()
    add("rsp-swapped-signature", "the signature of another envelope of the same vehicle",
        "bad_signature", join_envelope(prot, ct, split_envelope(other)[2]))  # fmt: skip
    add("rsp-unknown-outer-version", "outer version 3 (2 is wire format v2 since issue 13)",
        "unsupported_version", join_envelope(prot, ct, block, version=3),
        category="version")  # fmt: skip
    add("rsp-unknown-header-version", "protected-header version 2, re-signed by the vehicle",
        "unsupported_version",
        with_header(base, {LABEL["version"]: 2}, signer=signer_v1), category="version")  # fmt: skip
    enc = dumps(fields)
    nfields = len(fields)
    dup = bytes([0xA0 + nfields + 1]) + dumps(LABEL["recipient"]) + dumps(V2) + enc[1:]
    add("rsp-duplicate-header-key", "protected header with the recipient label twice "
        "(re-signed)", "malformed",
        join_envelope(dup, ct, resign(dup, ct, signer_v1)), category="non-canonical")  # fmt: skip
    outer = base
    assert outer[:6] == bytes.fromhex("da6662757383")
    add("rsp-long-form-version", "outer version as 0x1a00000001", "malformed",
        outer[:6] + head(0, 1, long_form=True) + outer[7:], category="non-canonical")  # fmt: skip
    add("rsp-indefinite-outer-array", "outer array of indefinite length", "malformed",
        outer[:5] + b"\x9f" + outer[6:] + b"\xff", category="non-canonical")  # fmt: skip
    add("rsp-unprotected-not-empty", "unprotected header {4: 'kid'}", "malformed",
        dumps(cbor2.CBORTag(0x66627573, [1, cbor2.CBORTag(16, [prot, {4: b"kid"}, ct]), block])),
        category="wrong-type")  # fmt: skip
    b = "binding"
    to_v2 = c.envelope(sender=V1, recipient=V2, topic_name=RESPONSES, kind="rsp",
                       message_id=c.ids.new(), action="response", payload=b"\xa0")  # fmt: skip
    add("rsp-wrong-recipient", "V-0001 seals to V-0002 and publishes on responses",
        "wrong_recipient", to_v2, category=b)  # fmt: skip
    wrong_topic = c.response(topic_name=TELEMETRY)
    add("rsp-sealed-for-telemetry-topic", "a response sealed for telemetry.raw, replayed on "
        "commands.responses", "wrong_recipient", wrong_topic, category="replay")  # fmt: skip
    f = "freshness"
    add("rsp-expired", "validly signed, expired 2026-01-01T00:01Z", "expired",
        c.response(expires=OLD_EXPIRES), category=f)  # fmt: skip
    old = c.response(expires=OLD_EXPIRES)
    add("rsp-expiry-pushed-forward", "expired envelope with expires-at moved to 2099, not "
        "re-signed", "bad_signature", with_header(old, {LABEL["expires"]: ms(EXPIRES)}),
        category=f)  # fmt: skip
    intruder = c.fleet.signer(INTRUDER)
    add("rsp-expiry-pushed-forward-resigned", "expires-at moved to 2099 and re-signed by the "
        "intruder (sender still V-0001, key id the intruder's)", "unknown_signer",
        with_header(old, {LABEL["expires"]: ms(EXPIRES), -65548: intruder.key_id},
                    signer=intruder), category=f)  # fmt: skip
    add("rsp-not-yet-valid", "issued in 2098", "not_yet_valid",
        c.response(issued=FUTURE_ISSUED), category=f)  # fmt: skip
    add("rsp-downgraded-key-path", "V-0001 (pqc) answers on the classical x25519 path",
        "downgrade", c.response(path="x25519"), category="downgrade")  # fmt: skip
    add("rsp-downgrade-header-injection", "x25519 path with Kafka headers claiming xwing",
        "downgrade", c.response(path="x25519"),
        headers=[("fleetbus-key-path", b"xwing"), ("fleetbus-minimum-path", b"x25519")],
        category="header-injection")  # fmt: skip
    add("rsp-revoked-vehicle", "response by V-0099, whose key is revoked", "signer_revoked",
        c.response(V_REVOKED), category=b)  # fmt: skip
    add("rsp-sender-swapped", "V-0002's envelope with the sender changed to V-0001, not "
        "re-signed", "unknown_signer",
        with_header(c.response(V2), {LABEL["sender"]: V1}), category="replay")  # fmt: skip
    add("rsp-replayed", "the base response again", "replayed", base, category="replay",
        setup=["rsp-ok-base"])  # fmt: skip
    # A malicious but authentic sender: ciphertext changed, then signed.
    # Fresh message ids from here on: a case must not be a replay of another (the integration
    # test feeds every case to one worker, whose replay check precedes decryption).
    fresh = c.response()
    fp, fct, _ = split_envelope(fresh)
    add("rsp-tampered-resigned", "ciphertext changed and re-signed by V-0001 (authentic "
        "sender, AEAD fails)", "tampered",
        join_envelope(dumps(fp), flip(fct, 1), resign(dumps(fp), flip(fct, 1), signer_v1)),
        category="tamper")  # fmt: skip
    refs = [list(r) for r in fields[LABEL["key_refs"]]]
    refs[0][1] = "k" + "0" * 32
    add("rsp-unknown-key-id", "key ref names a recipient key id the bus does not have "
        "(re-signed)", "unknown_key_id",
        with_header(c.response(), {LABEL["key_refs"]: refs}, signer=signer_v1),
        category="tamper")  # fmt: skip
    refs2 = [list(r) for r in fields[LABEL["key_refs"]]]
    refs2[0][2] = flip(refs2[0][2], 5)
    add("rsp-key-ref-changed", "one byte of the HPKE key ref changed (re-signed)", "tampered",
        with_header(c.response(), {LABEL["key_refs"]: refs2}, signer=signer_v1),
        category="tamper")  # fmt: skip
    add("rsp-suite-mismatch", "header suite mldsa65, Ed25519 key (re-signed)", "bad_signature",
        with_header(base, {LABEL["suite"]: "mldsa65"}, signer=signer_v1))  # fmt: skip
    add("rsp-payload-not-a-response", "authentic envelope whose payload is telemetry",
        "malformed", c.response(payload=Telemetry(V1, ISSUED, {}).encode()),
        category="wrong-type")  # fmt: skip
    add("rsp-names-other-vehicle", "authentic envelope from V-0001 whose response names "
        "V-0002", "wrong_recipient", c.response(payload_vehicle=V2), category=b)  # fmt: skip
    add("rsp-names-other-command", "authentic envelope whose response names another command "
        "id than the envelope", "wrong_recipient",
        c.response(payload_command_id=c.ids.new()), category=b)  # fmt: skip
    # Merkle batches: two batches of two responses each.
    ids_a = [c.ids.new(), c.ids.new()]
    ids_b = [c.ids.new(), c.ids.new()]

    def payload(i: str) -> bytes:
        return Response(i, V1, 200, "ok", None, ISSUED).encode()

    batch_a = c.batch(sender=V1, requests=[(i, payload(i)) for i in ids_a], kind="rsp",
                      topic_name=RESPONSES, recipient=SEALER, action="response")  # fmt: skip
    batch_b = c.batch(sender=V1, requests=[(i, payload(i)) for i in ids_b], kind="rsp",
                      topic_name=RESPONSES, recipient=SEALER, action="response")  # fmt: skip
    pa, cta, blka = split_envelope(batch_a[0])
    _, _, blkb = split_envelope(batch_b[0])
    m = "merkle"
    add("rsp-merkle-path-from-other-batch", "batch envelope whose inclusion path and root "
        "signature come from another batch", "bad_signature",
        join_envelope(dumps(pa), cta, [1, blkb[1], blkb[2], blkb[3], blkb[4]]),
        key=ids_a[0].encode(), category=m)  # fmt: skip
    add("rsp-merkle-path-only-from-other-batch", "own root signature, inclusion path from "
        "another batch", "bad_signature",
        join_envelope(dumps(pa), cta, [1, blka[1], blka[2], blka[3], blkb[4]]),
        key=ids_a[0].encode(), category=m)  # fmt: skip
    add("rsp-merkle-tree-size-changed", "tree size 2 -> 4 (path no longer fits)",
        "bad_signature", join_envelope(dumps(pa), cta, [1, blka[1], 4, blka[3], blka[4]]),
        key=ids_a[0].encode(), category=m)  # fmt: skip
    add("rsp-merkle-leaf-index-out-of-range", "leaf index 2 in a tree of 2", "malformed",
        join_envelope(dumps(pa), cta, [1, blka[1], 2, 2, blka[4]]), key=ids_a[0].encode(),
        category=m)  # fmt: skip
    add("rsp-unknown-signature-mode", "signature block mode 7", "malformed",
        join_envelope(prot, ct, [7, block[1]]), category="wrong-type")  # fmt: skip
    bombs(c, t, key)


def build_telemetry(c: Corpus) -> None:
    t = TELEMETRY
    key = V1.encode()
    base = c.telemetry()
    add = lambda name, desc, expect, value, **kw: c.add(  # noqa: E731
        t, name, kw.pop("category", "signature"), desc, expect, value=value,
        key=kw.pop("key", key), **kw,
    )  # fmt: skip
    add("tel-ok-base", "control: V-0001's valid telemetry envelope", "ok", base,
        category="control")  # fmt: skip
    add("tel-replayed", "the base telemetry again", "replayed", base, category="replay",
        setup=["tel-ok-base"])  # fmt: skip
    add("tel-tombstone", "a null value", "malformed", None, category="parse")
    c.add(t, "tel-oversize", "size", "a 100,000-byte value", "oversize",
          value_gen=[[base.hex(), 1], ["ff", 100000 - len(base)]], key=key)  # fmt: skip
    add("tel-response-envelope-on-telemetry", "a valid response envelope (bound to "
        "commands.responses) replayed on telemetry.raw", "wrong_recipient", c.response(),
        category="replay")  # fmt: skip
    intruder_env = c.envelope(sender=INTRUDER, recipient=SEALER, topic_name=TELEMETRY,
                              kind="tel", message_id=c.ids.new(), action="telemetry",
                              payload=Telemetry(INTRUDER, ISSUED, {}).encode())  # fmt: skip
    add("tel-unknown-signer", "telemetry sealed by the intruder", "unknown_signer",
        intruder_env)  # fmt: skip
    add("tel-names-other-vehicle", "authentic V-0001 envelope whose telemetry names V-0002",
        "wrong_recipient", c.telemetry(payload_vehicle=V2), category="binding")  # fmt: skip
    nan = dumps({"vehicle_id": V1, "at": ms(ISSUED), "fields": {"speed_kmh": float("nan")}})
    add("tel-nan-field", "authentic envelope, a NaN measurement", "malformed",
        c.telemetry(payload=nan), category="wrong-type")  # fmt: skip
    fields, ct, block = split_envelope(base)
    signer_v1 = c.fleet.signer(V1)
    add("tel-epoch-id-short", "epoch id of 15 bytes (re-signed)", "malformed",
        with_header(base, {LABEL["epoch_id"]: b"\x00" * 15}, signer=signer_v1),
        category="wrong-type")  # fmt: skip
    add("tel-key-path-mismatch", "key path name x25519, key ref xwing (re-signed)", "malformed",
        with_header(base, {LABEL["key_path"]: "x25519"}, signer=signer_v1),
        category="downgrade")  # fmt: skip
    add("tel-negative-issued-at", "issued-at -1 (re-signed)", "malformed",
        with_header(base, {LABEL["issued"]: -1}, signer=signer_v1),
        category="wrong-type")  # fmt: skip
    add("tel-issued-at-float", "issued-at as a float (re-signed)", "malformed",
        with_header(base, {LABEL["issued"]: float(ms(ISSUED))}, signer=signer_v1),
        category="wrong-type")  # fmt: skip
    add("tel-extra-header-label", "an 18th protected-header label (re-signed)", "malformed",
        with_header(base, {-65552: "admin"}, signer=signer_v1),
        category="wrong-type")  # fmt: skip
    add("tel-topic-overlong", "topic of 300 characters (re-signed)", "malformed",
        with_header(base, {LABEL["topic"]: "t" * 300}, signer=signer_v1),
        category="wrong-type")  # fmt: skip
    add("tel-not-an-envelope", "a CBOR map instead of the tagged envelope", "malformed",
        dumps({"vehicle_id": V1, "fields": {}}), category="parse")  # fmt: skip
    add("tel-wrong-outer-tag", "COSE_Encrypt0 without the fleetbus tag", "malformed",
        base[5:], category="parse")  # fmt: skip
    add("tel-header-injection", "forged signature with Kafka headers impersonating the bus",
        "bad_signature", join_envelope(dumps(fields), ct, [0, flip(block[1], 63)]),
        headers=[("fleetbus-sender", SEALER.encode()), ("fleetbus-topic", b"any"),
                 ("fleetbus-expires-at", b"0")], category="header-injection")  # fmt: skip
    bombs(c, t, key)


def build_outbound(c: Corpus) -> None:
    t = OUTBOUND
    key = V1.encode()
    base_cmd = c.command()
    base = c.outbound(base_cmd)
    add = lambda name, desc, expect, value, **kw: c.add(  # noqa: E731
        t, name, kw.pop("category", "signature"), desc, expect, value=value,
        key=kw.pop("key", key), **kw,
    )  # fmt: skip
    add("veh-ok-base", "control: the bus sealer's valid envelope with a ping for V-0001", "ok",
        base, category="control")  # fmt: skip
    add("veh-replayed", "the base envelope again (not executed twice)", "replayed", base,
        category="replay", setup=["veh-ok-base"])  # fmt: skip
    fields, ct, block = split_envelope(base)
    prot = dumps(fields)
    sealer = c.fleet.signer(SEALER)
    add("veh-forged-signature", "one signature byte flipped", "bad_signature",
        join_envelope(prot, ct, [0, flip(block[1], 7)]))  # fmt: skip
    add("veh-stripped-signature", "signature block [0, h'']", "malformed",
        join_envelope(prot, ct, [0, b""]))  # fmt: skip
    add("veh-swapped-signature", "signature of another bus envelope", "bad_signature",
        join_envelope(prot, ct, split_envelope(c.outbound())[2]))  # fmt: skip
    b = "binding"
    add("veh-wrong-recipient", "an envelope for V-0002 delivered under V-0001's key",
        "wrong_recipient", c.outbound(vehicle=V2), category=b)  # fmt: skip
    add("veh-sealed-for-responses-topic", "sealed for commands.responses, replayed on "
        "commands.outbound", "wrong_recipient", c.outbound(topic_name=RESPONSES),
        category="replay")  # fmt: skip
    add("veh-downgraded-key-path", "a command on the classical x25519 path to a pqc vehicle",
        "downgrade", c.outbound(path="x25519"), category="downgrade")  # fmt: skip
    add("veh-downgrade-header-injection", "x25519 path with headers claiming xwing and a "
        "verified sender", "downgrade", c.outbound(path="x25519"),
        headers=[("fleetbus-key-path", b"xwing"), ("fleetbus-sender", SEALER.encode()),
                 ("fleetbus-command-id", base_cmd.command.id.encode())],
        category="header-injection")  # fmt: skip
    add("veh-unknown-signer", "sealed by the intruder claiming to be the bus sealer",
        "unknown_signer", c.outbound(sender=SEALER, sender_file=INTRUDER))  # fmt: skip
    add("veh-revoked-sealer-key", "sealed with the bus sealer's revoked version-1 key",
        "signer_revoked", c.outbound(sender=SEALER, sender_file="bus-sealer.v1"))  # fmt: skip
    add("veh-sealed-by-dispatcher", "an authentic envelope sealed by dispatch-1 directly, "
        "bypassing the bus", "wrong_recipient", c.outbound(sender=DISPATCHER),
        category=b)  # fmt: skip
    f = "freshness"
    old = c.outbound(expires=OLD_EXPIRES)
    add("veh-expired", "envelope expired 2026-01-01T00:01Z", "expired", old, category=f)
    add("veh-expiry-pushed-forward", "expires-at moved to 2099, not re-signed",
        "bad_signature", with_header(old, {LABEL["expires"]: ms(EXPIRES)}),
        category=f)  # fmt: skip
    intruder = c.fleet.signer(INTRUDER)
    add("veh-expiry-pushed-forward-resigned", "expires-at moved to 2099, re-signed by a key "
        "not in the directory", "unknown_signer",
        with_header(old, {LABEL["expires"]: ms(EXPIRES), -65548: intruder.key_id},
                    signer=intruder), category=f)  # fmt: skip
    forged_cmd = cbor2.loads(c.command().encode())
    forged_inner = dumps([*forged_cmd[:4], flip(forged_cmd[4], 2)])
    inner_id = forged_cmd[1]["id"]
    add("veh-inner-command-forged", "authentic bus envelope around a command whose issuer "
        "signature is forged", "bad_signature",
        c.envelope(sender=SEALER, recipient=V1, topic_name=OUTBOUND, kind="cmd",
                   message_id=inner_id, action="ping", payload=forged_inner),
        category="inner-command")  # fmt: skip
    for_v2 = c.command(vehicle=V2)
    add("veh-inner-command-for-other-vehicle", "authentic envelope to V-0001 around a valid "
        "command for V-0002", "wrong_recipient", c.outbound(for_v2, vehicle=V1),
        category="inner-command")  # fmt: skip
    mismatch = c.command()
    add("veh-inner-command-id-mismatch", "envelope message id differs from the inner "
        "command id", "tampered", c.outbound(mismatch, message_id=c.ids.new()),
        category="inner-command")  # fmt: skip
    add("veh-inner-command-action-mismatch", "envelope action 'ping', inner command "
        "unlock_doors", "tampered",
        c.outbound(c.command(action="unlock_doors"), action="ping"),
        category="inner-command")  # fmt: skip
    inner_old = c.command(expires=OLD_EXPIRES)
    add("veh-inner-command-expired", "valid envelope until 2099 around an expired command",
        "expired", c.outbound(inner_old), category="inner-command")  # fmt: skip
    add("veh-inner-command-revoked-issuer", "valid envelope around a command by "
        "dispatch-revoked", "signer_revoked",
        c.outbound(c.command(issuer=REVOKED_DISPATCHER)), category="inner-command")  # fmt: skip
    add("veh-unknown-version", "outer version 3", "unsupported_version",
        join_envelope(prot, ct, block, version=3), category="version")  # fmt: skip
    vp, vct, _ = split_envelope(c.outbound())  # a fresh message id: not a replay of the base
    add("veh-tampered-resigned", "ciphertext changed and re-signed with the bus sealer key",
        "tampered",
        join_envelope(dumps(vp), flip(vct, 2), resign(dumps(vp), flip(vct, 2), sealer)),
        category="tamper")  # fmt: skip
    ids_a = [c.command(), c.command()]
    ids_b = [c.command(), c.command()]
    batch_a = c.batch(sender=SEALER, requests=[(s.command.id, s.encode()) for s in ids_a],
                      kind="cmd", topic_name=OUTBOUND, recipient=V1, action="ping")  # fmt: skip
    batch_b = c.batch(sender=SEALER, requests=[(s.command.id, s.encode()) for s in ids_b],
                      kind="cmd", topic_name=OUTBOUND, recipient=V1, action="ping")  # fmt: skip
    pa, cta, blka = split_envelope(batch_a[1])
    blkb = split_envelope(batch_b[1])[2]
    add("veh-merkle-path-from-other-batch", "batch envelope with the root signature and "
        "inclusion path of another batch", "bad_signature",
        join_envelope(dumps(pa), cta, blkb), category="merkle")  # fmt: skip
    add("veh-merkle-path-only-from-other-batch", "own root signature, path of another batch",
        "bad_signature", join_envelope(dumps(pa), cta, [1, blka[1], 2, 1, blkb[4]]),
        category="merkle")  # fmt: skip
    c.add(t, "veh-oversize", "size", "70,000 bytes", "oversize",
          value_gen=[[base.hex(), 1], ["00", 70000 - len(base)]], key=key)  # fmt: skip
    add("veh-tombstone", "a null value", "malformed", None, category="parse")
    bombs(c, t, key)


# --- uplink replay and lifetimes (issue 11 findings 3, 6, 7) -------------------------------
# Kept in its own block, drawn after every other case, so that its ids do not move theirs.
# The ordering race of finding 3 (a non-target vehicle answering before the authorized record)
# needs two topics and is covered by tests/unit/test_uplink_replay.py.


def build_uplink(c: Corpus) -> None:
    cid = c.ids.new()
    rsp_key = cid.encode()
    fresh = c.response(command_id=cid)
    c.add(RESPONSES, "rsp-under-another-key", "replay", "a valid response published under "
          "a Kafka key that is not its command id (another partition: neither its command's "
          "state nor its replay state is there)", "malformed", value=fresh,
          key=other_partition_key(rsp_key))  # fmt: skip
    c.add(RESPONSES, "rsp-expiry-beyond-uplink-lifetime", "freshness", "a response expiring "
          "further ahead than uplink_max_lifetime_s (its id would have to be kept that long)",
          "policy_denied", value=c.response(expires=TOO_LONG_EXPIRES),
          key=rsp_key)  # fmt: skip
    tel = c.telemetry()
    c.add(TELEMETRY, "tel-under-another-key", "replay", "V-0001's telemetry published under "
          "V-0002's key (another partition, whose replay state has not seen it)", "malformed",
          value=tel, key=V2.encode())  # fmt: skip
    c.add(TELEMETRY, "tel-expiry-beyond-uplink-lifetime", "freshness", "telemetry expiring "
          "further ahead than uplink_max_lifetime_s", "policy_denied",
          value=c.telemetry(expires=TOO_LONG_EXPIRES), key=V1.encode())  # fmt: skip


# --- key topic: rollback of signed material (directory heads) --------------------------------
# Cases for a loader following the compacted key topic, which starts from the fleet's
# directory.cbor (head 2). Outcome: the reason ingest refuses the value with, else the reason
# the record's key is refused with at OPEN_AT, else ok.


def build_keys(c: Corpus) -> None:
    t, fleet = KEYS, c.fleet
    issued = [s for s in fleet.signed if not s.record.revoked]
    [revoked] = [s for s in issued if s.record.principal_id == REVOKED_DISPATCHER]
    key, issuance = to_kafka(revoked)
    rb = "rollback"
    c.add(t, "keys-current-head-again", "control", "the fleet's current head (2) again", "ok",
          value=fleet.head.to_cbor(), key=HEAD_KAFKA_KEY)  # fmt: skip
    c.add(t, "keys-republished-issuance", rb, "the genuine issuance record of dispatch-revoked "
          "re-published under its Kafka key (compaction would drop the revocation)",
          "signer_revoked", value=issuance, key=key)  # fmt: skip
    c.add(t, "keys-older-head", rb, "head 1, signed before the revocations", "directory_rollback",
          value=fleet.head_before.to_cbor(), key=HEAD_KAFKA_KEY)  # fmt: skip
    fork, _ = sign_directory(
        fleet.root, issued, previous=fleet.head_before.head, at=REVOKED_AT,
    )  # fmt: skip
    c.add(t, "keys-forked-head", rb, "a root-signed head 2 over the records without the "
          "revocations (a second history)", "directory_rollback", value=fork.to_cbor(),
          key=HEAD_KAFKA_KEY)  # fmt: skip
    c.add(t, "keys-head-other-root", "signature", "head 3 signed by another root",
          "bad_signature",
          value=dataclasses.replace(
              fleet.stranger.sign_head(dataclasses.replace(fleet.head.head, seq=3)),
              root_key_id=fleet.root.key_id,
          ).to_cbor(), key=HEAD_KAFKA_KEY)  # fmt: skip
    c.add(t, "keys-record-other-root", "signature", "the intruder's record (another root)",
          "bad_signature", value=fleet.intruder_record.to_cbor(),
          key=to_kafka(fleet.intruder_record)[0])  # fmt: skip
    c.add(t, "keys-head-under-record-key", "replay", "the current head under a record's key",
          "malformed", value=fleet.head.to_cbor(), key=key)  # fmt: skip
    outer = cbor2.loads(fleet.head.to_cbor())
    c.add(t, "keys-head-non-canonical", "non-canonical", "the current head, map keys unsorted",
          "malformed", value=cbor2.dumps(dict(reversed(outer.items()))),
          key=HEAD_KAFKA_KEY)  # fmt: skip
    c.add(t, "keys-tombstone", "parse", "a null value (deleting a record would un-revoke it)",
          "malformed", value=None, key=key)  # fmt: skip


# --- wire format v2 (issue 13): records decided before an epoch is accepted ----------------
# Kept in its own block, drawn last. Cases that need an accepted epoch (wrong epoch, reused
# sequence, sequence far ahead) depend on the epoch's validity window and the clock, which the
# unit and integration runs of this corpus do not share; they are in tests/unit/
# test_envelope_v2.py.


def v2_records(c: Corpus, *, recipient: str = V1, topic_name: str = OUTBOUND,
               path: str = "xwing") -> tuple[bytes, bytes]:  # fmt: skip
    from fleetbus.providers.sealing_v2 import EpochSealer

    sealer = EpochSealer(
        SEALER, c.fleet.signer(SEALER), ProfileSealer(runner()), clock=lambda: OPEN_AT
    )
    signed = c.command(vehicle=recipient)
    est, message = sealer.seal(
        SealRequest("cmd", topic(topic_name), c.fleet.recipient(recipient), signed.command.id,
                    signed.command.action, signed.encode(), ISSUED, EXPIRES, profile(path))
    )  # fmt: skip
    return est, message


def build_wire_v2(c: Corpus) -> None:
    from fleetbus.bus.envelope import ENVELOPE_TAG
    from fleetbus.providers.sealing_v2 import make_status, sign_status

    key = V1.encode()
    est, message = v2_records(c)
    add = lambda name, desc, expect, value, **kw: c.add(  # noqa: E731
        OUTBOUND, name, kw.pop("category", "wire-v2"), desc, expect, value=value,
        key=kw.pop("key", key), **kw,
    )  # fmt: skip
    add("veh-v2-truncated-establishment", "a v2 establishment cut after half its bytes",
        "malformed", est[: len(est) // 2])  # fmt: skip
    add("veh-v2-unknown-epoch", "a v2 message whose establishment never arrived (held, and "
        "the vehicle asks for the epoch)", "epoch_unknown", message)  # fmt: skip
    other_est, other_msg = v2_records(c, recipient=V2)
    add("veh-v2-establishment-of-other-vehicle", "V-0002's establishment delivered under "
        "V-0001's key", "wrong_recipient", other_est)  # fmt: skip
    add("veh-v2-message-readdressed", "V-0002's v2 message, recipient field intact, under "
        "V-0001's key", "wrong_recipient", other_msg)  # fmt: skip
    resp_est, _ = v2_records(c, topic_name=RESPONSES)
    add("veh-v2-establishment-for-responses-topic", "an establishment made for "
        "commands.responses replayed on commands.outbound", "wrong_recipient",
        resp_est)  # fmt: skip
    body = cbor2.loads(message).value
    v1_protected = split_envelope(c.outbound())[0]
    add("veh-v2-v1-header-in-v2-record", "a v1 protected header inside a v2 message",
        "malformed",
        dumps(cbor2.CBORTag(ENVELOPE_TAG, [2, 1, cbor2.CBORTag(16, [dumps(v1_protected), {},
                                                                    body[2].value[2]])])),
        category="version-confusion")  # fmt: skip
    add("veh-v2-record-type-unknown", "v2 record type 9", "malformed",
        dumps(cbor2.CBORTag(ENVELOPE_TAG, [2, 9, body[2]])),
        category="version-confusion")  # fmt: skip
    add("veh-v2-version-as-text", "outer version \"2\" (text)", "malformed",
        dumps(cbor2.CBORTag(ENVELOPE_TAG, ["2", 1, body[2]])),
        category="version-confusion")  # fmt: skip
    status = sign_status(
        c.fleet.signer(V1), V1,
        make_status(topic=topic(RESPONSES), recipient=SEALER, epoch_id=bytes(8), sequence=0,
                    at=OPEN_AT),
    )  # fmt: skip
    add("veh-v2-status-on-outbound", "a vehicle's signed status record fed to a vehicle "
        "(read as a status: addressed to the bus sealer, not to the vehicle)",
        "wrong_recipient", status)  # fmt: skip
    misaddressed = sign_status(
        c.fleet.signer(V1), V1,
        make_status(topic=topic(RESPONSES), recipient=DISPATCHER, epoch_id=bytes(8),
                    sequence=0, at=OPEN_AT),
    )  # fmt: skip
    c.add(RESPONSES, "rsp-v2-status-for-another-principal", "wire-v2", "V-0001's status "
          "addressed to dispatch-1, not the bus sealer", "wrong_recipient", value=misaddressed,
          key=key)  # fmt: skip
    c.add(RESPONSES, "rsp-v2-establishment-from-vehicle", "wire-v2", "a downlink-shaped "
          "establishment signed by V-0001 (only the bus's copies are kept)", "wrong_recipient",
          value=v2_vehicle_establishment(c), key=key)  # fmt: skip
    c.add(RESPONSES, "rsp-v2-establishment-under-other-key", "wire-v2", "the bus's copy of "
          "V-0001's establishment under V-0002's key", "wrong_recipient", value=est,
          key=V2.encode())  # fmt: skip


def v2_vehicle_establishment(c: Corpus) -> bytes:
    from fleetbus.providers.sealing_v2 import EpochSealer

    sealer = EpochSealer(V1, c.fleet.signer(V1), ProfileSealer(runner()), clock=lambda: OPEN_AT)
    est, _ = sealer.seal(
        SealRequest("rsp", topic(OUTBOUND), c.fleet.recipient(V2), "x", "ping", b"",
                    ISSUED, EXPIRES, profile("xwing"))
    )  # fmt: skip
    return est


# --- vehicle-keyed v2 responses (issues 12, 13; f-uplink) ----------------------------------
# Vehicles answer in wire v2 keyed by their id, in an uplink epoch bound to commands.responses;
# the response stage verifies them. Only records decided before an epoch is accepted (as for
# build_wire_v2); the accepted-epoch cases are in tests/unit/test_wire_v2_pipeline.py.


def v2_uplink_records(c: Corpus, *, sender: str = V1, topic_name: str = RESPONSES,
                      kind: str = "rsp") -> tuple[bytes, bytes]:  # fmt: skip
    from fleetbus.bus.envelope_v2 import Direction
    from fleetbus.providers.sealing_v2 import EpochSealer

    sealer = EpochSealer(sender, c.fleet.signer(sender), ProfileSealer(runner()),
                         direction=Direction.UPLINK, clock=lambda: OPEN_AT)  # fmt: skip
    cid = c.ids.new()
    payload = Response(command_id=cid, vehicle_id=sender, status=200, detail="ok",
                       executed_at=ISSUED).encode()  # fmt: skip
    est, message = sealer.seal(
        SealRequest(kind, topic(topic_name), c.fleet.recipient(SEALER), cid, "", payload,
                    ISSUED, EXPIRES, profile("xwing"))
    )  # fmt: skip
    return est, message


def build_vehicle_keyed_responses(c: Corpus) -> None:
    est, message = v2_uplink_records(c)
    c.add(RESPONSES, "rsp-v2-uplink-establishment-under-other-key", "wire-v2", "V-0001's "
          "uplink establishment for commands.responses under V-0002's key (its epoch would "
          "land on a partition V-0001's answers never reach)", "malformed", value=est,
          key=V2.encode())  # fmt: skip
    c.add(RESPONSES, "rsp-v2-response-without-establishment", "wire-v2", "V-0001's v2 "
          "answer whose establishment never arrived", "epoch_unknown", value=message,
          key=V1.encode())  # fmt: skip
    tel_est, _ = v2_uplink_records(c, topic_name=TELEMETRY, kind="tel")
    c.add(RESPONSES, "rsp-v2-telemetry-establishment-on-responses", "wire-v2", "V-0001's "
          "uplink establishment bound to telemetry.raw, replayed on commands.responses",
          "wrong_recipient", value=tel_est, key=V1.encode())  # fmt: skip
    dispatcher_est, _ = v2_uplink_records(c, sender=DISPATCHER)
    c.add(RESPONSES, "rsp-v2-uplink-establishment-from-dispatcher", "wire-v2", "an uplink "
          "establishment signed by dispatch-1 (only vehicles and edge units answer)",
          "policy_denied", value=dispatcher_est, key=DISPATCHER.encode())  # fmt: skip


# --- approvals bind the exact command; command ids are never reused (s-approve) ------------


def build_approval_binding(c: Corpus) -> None:
    """An approval names its command by id *and* digest (docs/wire-format.md, "Approvals"):
    approvals of another command under the same id, of the old format (id only) and command ids
    the replay set could not keep. Own id stream, so that other blocks keep their bytes."""
    ids = UUIDv7Generator(clock_ms=lambda: ms(ISSUED), random_bytes=Drbg(b"approval binding"))
    pending = SignedCommand.decode(bytes.fromhex(c.cases["apr-setup-pending-command"]["value"]))
    pid = pending.command.id.encode()
    swapped = SignedCommand.sign(
        dataclasses.replace(pending.command, params={"door": "all"}), c.fleet.signer(DISPATCHER)
    )
    c.add(APPROVALS, "apr-for-another-command-same-id", "replay", "a valid approval by "
          "dispatch-2 of another command under the pending command's id (door=all): its "
          "command_digest differs, it approves nothing", "approval_mismatch",
          value=c.approval(swapped).encode(), key=pid,
          setup=["apr-setup-pending-command"])  # fmt: skip
    signer = c.fleet.signer(APPROVER)
    v1_body = {"command_id": pending.command.id, "approver": APPROVER, "decision": "approve",
               "issued_at": ms(ISSUED)}  # fmt: skip
    v1_tbs = dumps(["fleetbus-approval-v1", signer.key_id, signer.suite, v1_body])
    c.add(APPROVALS, "apr-v1-without-digest", "version", "a correctly signed approval of the "
          "old format (command id only, context fleetbus-approval-v1): refused, never "
          "upgraded", "unsupported_version",
          value=dumps([1, v1_body, signer.key_id, signer.suite, signer.sign(v1_tbs)]),
          key=pid)  # fmt: skip
    good = c.approval(pending)
    short = {**cbor2.loads(good.encode())[1], "command_digest": pending.digest()[:31]}
    short_tbs = dumps([APPROVAL_CONTEXT, signer.key_id, signer.suite, short])
    c.add(APPROVALS, "apr-digest-31-bytes", "wrong-type", "a signed approval whose "
          "command_digest is 31 bytes", "malformed",
          value=dumps([1, short, signer.key_id, signer.suite, signer.sign(short_tbs)]),
          key=pid)  # fmt: skip
    shown = SignedCommand.sign(
        Command(ids.new(), DISPATCHER, Target(vehicle=V1), "unlock_doors", {"door": "driver"},
                ISSUED, EXPIRES), c.fleet.signer(DISPATCHER))  # fmt: skip
    sent = SignedCommand.sign(
        dataclasses.replace(shown.command, target=Target(vehicle=V2)), c.fleet.signer(DISPATCHER)
    )
    c.add(APPROVALS, "bind-setup-approval-of-shown-command", "control", "dispatch-2 approves "
          "the command it was shown (unlock_doors V-0001) before any command arrives: held",
          "ok", value=c.approval(shown).encode(), key=shown.command.id.encode())  # fmt: skip
    c.add(REQUESTED, "bind-swapped-command-after-approval", "ordering-race", "a command "
          "under the approved id but for V-0002 arrives: the held approval is dead-lettered "
          "approval_mismatch and the command waits for an approval of itself",
          "approval_mismatch", value=sent.encode(), key=sent.command.id.encode(),
          setup=["bind-setup-approval-of-shown-command"],
          dlq_of="bind-setup-approval-of-shown-command")  # fmt: skip
    future_id = UUIDv7Generator(clock_ms=lambda: ms(FUTURE_ISSUED),
                                random_bytes=Drbg(b"future id")).new()  # fmt: skip
    ahead = SignedCommand.sign(
        Command(future_id, DISPATCHER, Target(vehicle=V1), "ping", {}, ISSUED, EXPIRES),
        c.fleet.signer(DISPATCHER),
    )
    c.add(REQUESTED, "cmd-id-from-the-future", "freshness", "a command issued in 2026 whose "
          "UUIDv7 id carries 2098: the replay set would have to keep it until then",
          "not_yet_valid", value=ahead.encode(), key=future_id.encode())  # fmt: skip


# --- uplink recovery (issue 13): the bus's uplink_epoch_unknown status on commands.outbound --


def build_uplink_recovery(c: Corpus) -> None:
    from fleetbus.bus.envelope_v2 import StatusCode
    from fleetbus.providers.sealing_v2 import make_status, sign_status

    def status(signer: str = SEALER, **kw: Any) -> bytes:
        fields: dict[str, Any] = {
            "topic": topic(OUTBOUND), "recipient": V1, "epoch_id": bytes(8), "sequence": 0,
            "at": OPEN_AT, "code": StatusCode.UPLINK_EPOCH_UNKNOWN,
        }  # fmt: skip
        return sign_status(c.fleet.signer(signer), signer, make_status(**(fields | kw)))

    add = lambda name, desc, expect, value: c.add(  # noqa: E731
        OUTBOUND, name, "uplink-recovery", desc, expect, value=value, key=V1.encode()
    )  # fmt: skip
    # Only cases whose outcome is the same at the unit test's clock (OPEN_AT) and the wall clock
    # of the integration test: a status is fresh for 60 s + skew, so a forged signature or a
    # genuine status for no open epoch are unit-tested (tests/unit/test_uplink_recovery.py).
    add("veh-uplink-status-for-another-vehicle", "the bus's uplink status addressed to V-0002 "
        "under V-0001's key", "wrong_recipient", status(recipient=V2))  # fmt: skip
    add("veh-uplink-status-replayed-old", "a bus uplink status made before the corpus's "
        "commands were issued (an old status replayed)", "expired",
        status(at=ISSUED - 3600))  # fmt: skip
    add("veh-uplink-status-forged-by-a-vehicle", "an uplink status signed by V-0002 claiming "
        "to be from it, not the bus sealer (only the sealer's statuses are read)",
        "wrong_recipient", status(V2))  # fmt: skip


# --- writing -------------------------------------------------------------------------------


# --- fail closed (issue 14): signer keys whose validity has not begun ----------------------
# Reported as not_yet_valid, not folded into unknown_signer (authorize stage and opener).

LATE_DISPATCHER = "dispatch-not-yet-valid"
LATE_VEHICLE = "V-0098"
LATE_KEY_NOT_BEFORE = 4_090_000_000.0  # 2099-08: after every time the corpus is opened at


def add_not_yet_valid_principals(fleet: Fleet, kems: tuple[str, ...]) -> None:
    """A dispatcher and a vehicle, in the directory and root-signed, not valid before 2099."""
    for pid, kind, kem_list in [
        (LATE_DISPATCHER, "dispatcher", ()),
        (LATE_VEHICLE, "vehicle", kems),
    ]:
        private, public = principal_keys(pid, kem_list)
        record = KeyRecord(
            principal_id=pid,
            kind=kind,
            version=1,
            key_id=derive_key_id(public),
            public_keys=public,
            signature_suite=SUITE,
            capabilities=frozenset({"pqc"} if "xwing" in public else ()),
            not_before=LATE_KEY_NOT_BEFORE,
            not_after=KEY_NOT_AFTER,
            groups=frozenset({"north"} if kind == "vehicle" else ()),
        )
        fleet.signed.append(fleet.root.sign(record))
        fleet.files[pid] = PrincipalKeyFile.from_record(record, private)


def build_not_yet_valid_signers(c: Corpus) -> None:
    late = c.command(issuer=LATE_DISPATCHER)
    c.add(REQUESTED, "cmd-signer-not-yet-valid", "signature", "signed by dispatch-not-yet-valid, "
          "whose key is valid from 2099-08 only", "not_yet_valid", value=late.encode(),
          key=late.command.id.encode())  # fmt: skip
    pending = c.cases["apr-setup-pending-command"]
    early = SignedApproval.sign(
        Approval.for_command(
            SignedCommand.decode(bytes.fromhex(pending["value"])),
            approver=LATE_DISPATCHER,
            issued_at=ISSUED,
        ),
        c.fleet.signer(LATE_DISPATCHER),
    )
    c.add(APPROVALS, "apr-approver-not-yet-valid", "signature", "approval by "
          "dispatch-not-yet-valid, whose key is valid from 2099-08 only", "not_yet_valid",
          value=early.encode(), key=bytes.fromhex(pending["key"]),
          setup=["apr-setup-pending-command"])  # fmt: skip
    rcid = c.ids.new()
    c.add(RESPONSES, "rsp-vehicle-not-yet-valid", "signature", "response by V-0098, whose key "
          "is valid from 2099-08 only", "not_yet_valid",
          value=c.response(LATE_VEHICLE, command_id=rcid), key=rcid.encode())  # fmt: skip


def write(out: Path) -> int:
    fleet = Fleet()
    corpus = build(fleet)
    if (out / "cases").exists():
        shutil.rmtree(out / "cases")
    if (out / "fleet").exists():
        shutil.rmtree(out / "fleet")
    fleet.write(out / "fleet")
    order = []
    for name, case in corpus.cases.items():
        folder = out / "cases" / case["target"]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.json").write_text(json.dumps(case, indent=1, sort_keys=True) + "\n")
        order.append(f"{case['target']}/{name}")
    meta = {
        "prefix": PREFIX,
        "open_at": OPEN_AT,
        "worker_settings": WORKER_SETTINGS,
        "order": order,
    }
    (out / "corpus.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return len(corpus.cases)


def _has_envelope(case: dict[str, Any]) -> bool:
    text = json.dumps([case.get("value"), case.get("value_gen")])
    return "da66627573" in text or case["target"] in (RESPONSES, TELEMETRY, OUTBOUND)


def _same_except_envelopes(a: Path, b: Path) -> list[str]:
    differ = []
    for path in sorted(a.rglob("*")):
        if path.is_dir():
            continue
        rel = path.relative_to(a)
        other = b / rel
        if not other.exists():
            differ.append(f"missing {rel}")
        elif not filecmp.cmp(path, other, shallow=False):
            if path.suffix == ".json" and rel.parts[0] == "cases":
                x, y = json.loads(path.read_text()), json.loads(other.read_text())
                if _has_envelope(x) and _has_envelope(y):  # HPKE ephemeral keys differ
                    for doc in (x, y):
                        doc.pop("value", None), doc.pop("value_gen", None)
                if x == y:
                    continue
            differ.append(str(rel))
    return differ


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--check", action="store_true", help="compare with the committed files")
    args = parser.parse_args(argv)
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            write(Path(tmp))
            differ = _same_except_envelopes(Path(tmp), args.out)
        for item in differ:
            print("differs:", item)
        return 1 if differ else 0
    count = write(args.out)
    print(f"wrote {count} cases to {args.out / 'cases'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

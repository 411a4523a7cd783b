"""Test scaffolding for the unit tests: parties with real keys, an in-memory signer directory,
a settable clock, helpers that rebuild (and optionally re-sign) mutated envelopes, an issued
fleet and a stage runner that never connects."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fleetbus.bus.directory import FleetRoot, IssuedKey, KeyDirectory, PrincipalKeyFile, issue_key
from fleetbus.bus.envelope import (
    BatchSignature,
    ParsedEnvelope,
    ProtectedHeader,
    SingleSignature,
    decode_envelope,
    encode_envelope,
    encode_protected,
    to_be_signed,
)
from fleetbus.bus.errors import FleetbusError, ReasonCode
from fleetbus.bus.keys import (
    KeyPath,
    KeyProvider,
    PrivateKeySet,
    RecipientKeys,
    SecurityProfile,
    SignatureSuite,
    Signer,
    Verifier,
)
from fleetbus.devtools.kme_pki import TestPKI
from fleetbus.processors.eos import TransactionalStage
from fleetbus.processors.fleet_registry import FleetRegistry
from fleetbus.processors.policy import PolicyEngine
from fleetbus.providers.hpke import MLKEM768Provider, X25519Provider, XWingProvider
from fleetbus.providers.keypath import KeyPathRunner, ProfileSealer
from fleetbus.providers.qkd import API_PREFIX, QKDProvider
from fleetbus.providers.sealing import EnvelopeOpener, EnvelopeSealer, EpochPolicy, ReplayCache
from fleetbus.providers.signers import (
    CompositeMLDSA65Ed25519Suite,
    Ed25519Suite,
    MLDSA65Suite,
)

NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z
TOPIC = "fleet.commands.outbound"
SUITES: dict[str, Callable[[], SignatureSuite]] = {
    "ed25519": Ed25519Suite,
    "mldsa65": MLDSA65Suite,
    "composite-mldsa65-ed25519": CompositeMLDSA65Ed25519Suite,
}


@dataclass
class Fleet:
    """A directory of issued keys, every principal's key file and a policy over the fleet."""

    directory: KeyDirectory
    files: dict[str, PrincipalKeyFile]
    policy: PolicyEngine


def issuer(root: FleetRoot, suite: str, now: float) -> Callable[..., IssuedKey]:
    """``issue(principal_id, kind, **extra)``: a key of ``root``'s fleet signed with ``suite``,
    valid from an hour before ``now`` to a day after unless ``extra`` says otherwise (``kems``,
    ``groups``, ``capabilities``, ``qkd_sae_id``, ``not_before``, ``not_after``). The unit tests
    build their fleets with it and ``fleet_of``."""

    def issue(principal_id: str, kind: str, **extra: Any) -> IssuedKey:
        extra.setdefault("not_before", now - 3600)
        extra.setdefault("not_after", now + 86400)
        return issue_key(root, principal_id=principal_id, kind=kind, signature_suite=suite, **extra)

    return issue


def fleet_of(
    root: FleetRoot, issued: list[IssuedKey], outsiders: list[IssuedKey] | None = None
) -> Fleet:
    """The fleet ``root`` issued; ``outsiders`` have key files but are not in the directory."""
    directory = KeyDirectory(root.public)
    directory.ingest_all([i.signed for i in issued])
    files = {i.key_file.principal_id: i.key_file for i in [*issued, *(outsiders or [])]}
    registry = FleetRegistry.from_mapping({}).with_directory_records(directory.records())
    return Fleet(directory, files, PolicyEngine(registry))


def unconnected(logic: Any, **options: Any) -> TransactionalStage:
    """A stage runner for ``logic`` that never reaches its (unroutable) bootstrap server."""
    return TransactionalStage(
        logic,
        bootstrap="127.0.0.1:1",
        app_id="t",
        state_topic="state",
        audit_topic="audit",
        dlq_topic="dlq",
        **options,
    )


class Clock:
    """A settable wall clock."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class DirectoryEntry:
    verifier: Verifier
    not_before: float = 0.0
    not_after: float = float("inf")
    revoked: bool = False


@dataclass
class StaticDirectory:
    """In-memory ``SignerDirectory``: (principal, key id) -> verifier with a validity window."""

    entries: dict[tuple[str, str], DirectoryEntry] = field(default_factory=dict)

    def add(self, principal: str, key_id: str, verifier: Verifier, **kw: object) -> None:
        self.entries[(principal, key_id)] = DirectoryEntry(verifier, **kw)  # type: ignore[arg-type]

    def verifier_for(self, principal_id: str, key_id: str, *, at: float) -> Verifier:
        entry = self.entries.get((principal_id, key_id))
        if entry is None:
            raise FleetbusError("unknown signer", reason=ReasonCode.UNKNOWN_SIGNER)
        if entry.revoked:
            raise FleetbusError("revoked", reason=ReasonCode.SIGNER_REVOKED)
        if not entry.not_before <= at <= entry.not_after:
            raise FleetbusError("expired", reason=ReasonCode.SIGNER_EXPIRED)
        return entry.verifier


def providers() -> dict[str, KeyProvider]:
    return {"x25519": X25519Provider(), "mlkem768": MLKEM768Provider(), "xwing": XWingProvider()}


class RecordedKME(QKDProvider):
    """The recipient's ``qkd-etsi014`` provider with its HTTPS exchange replaced by a recorded
    one (a vector's ``qkd`` block): the ``dec_keys`` request the recording names gets the
    recorded answer, through the provider's own checks of key_ID, size and encoding; any other
    request gets the 400 a KME gives an unknown key_ID."""

    def __init__(self, recording: dict[str, Any], pki: TestPKI) -> None:
        pair = next(iter(pki.saes.values()))  # TLS material only: no connection is made
        super().__init__(
            kme_url="https://kme.recorded.invalid",
            kme_id="KME-RECORDED",
            sae_id=recording["slave_sae_id"],
            master_sae_id=recording["master_sae_id"],
            ca_file=pki.ca_cert,
            cert_file=pair.cert,
            key_file=pair.key,
            key_size_bits=recording["key_size_bits"],
        )
        self.recording = recording
        self.requests: list[tuple[str, str, Any]] = []

    def _request(
        self, method: str, path: str, body: Mapping[str, Any] | None
    ) -> tuple[int, dict[str, Any]]:
        self.requests.append((method, path, body))
        expected = f"{API_PREFIX}/{self.recording['master_sae_id']}/dec_keys"
        if (method, path, body) == ("POST", expected, self.recording["dec_keys_request"]):
            return 200, dict(self.recording["dec_keys_response"])
        return 400, {"message": "key_ID not in the recording"}


@dataclass
class Vehicle:
    own: PrivateKeySet
    keys: RecipientKeys


def make_vehicle(principal: str = "V-17", version: int = 1) -> Vehicle:
    private: dict[str, bytes] = {}
    public: dict[str, bytes] = {}
    ids: dict[str, str] = {}
    for name, provider in providers().items():
        private[name], public[name] = provider.generate_keypair()
        ids[name] = f"{principal}/{name}/{version}"
    return Vehicle(
        own=PrivateKeySet(principal, private, ids),
        keys=RecipientKeys(principal, public, ids, capabilities=frozenset({"pqc"})),
    )


def profile(path: str = "xwing", suite: str = "ed25519", name: str = "standard") -> SecurityProfile:
    key_path = KeyPath.parse(path)
    return SecurityProfile(name, [key_path], suite, allow_fallback=True, minimum_path=key_path)


@dataclass
class World:
    clock: Clock
    runner: KeyPathRunner
    directory: StaticDirectory
    vehicle: Vehicle
    sender: str
    signer: Signer
    suite: SignatureSuite
    sealer: EnvelopeSealer
    profile: SecurityProfile

    def opener(
        self,
        *,
        minimum: str | None = None,
        vehicle: Vehicle | None = None,
        max_size: int = 64 * 1024,
        skew_s: float = 30.0,
        replay_cache: ReplayCache | None = None,
    ) -> EnvelopeOpener:
        return EnvelopeOpener(
            (vehicle or self.vehicle).own,
            self.directory,
            self.runner,
            KeyPath.parse(minimum) if minimum else self.profile.minimum_path,
            max_size=max_size,
            clock=self.clock,
            skew_s=skew_s,
            replay_cache=replay_cache,
        )

    def seal(self, message_id: str = "cmd-1", payload: bytes = b"unlock", **kw: object) -> bytes:
        args: dict[str, object] = {
            "kind": "cmd",
            "topic": TOPIC,
            "recipient": self.vehicle.keys,
            "message_id": message_id,
            "action": "doors.unlock",
            "payload": payload,
            "issued_at": self.clock.now,
            "expires_at": self.clock.now + 60,
            "profile": self.profile,
        }
        args.update(kw)
        return self.sealer.seal(**args)  # type: ignore[arg-type]

    def resign(self, parsed: ParsedEnvelope, protected: bytes, ciphertext: bytes) -> bytes:
        """Rebuild with the sender's real key: the signature verifies, so later checks run."""
        signature = SingleSignature(self.signer.sign(to_be_signed(protected, ciphertext)))
        return encode_envelope(protected, ciphertext, signature)


def make_world(
    *,
    path: str = "xwing",
    suite: str = "ed25519",
    epochs: EpochPolicy | None = None,
    batch_signing: bool = False,
    sender: str = "bus-sealer-1",
) -> World:
    clock = Clock()
    runner = KeyPathRunner(providers())
    suite_impl = SUITES[suite]()
    private, public = suite_impl.generate()
    signer = suite_impl.signer(private, f"{sender}/sig/1")
    directory = StaticDirectory()
    directory.add(sender, signer.key_id, suite_impl.verifier(public))
    prof = profile(path, suite)
    sealer = EnvelopeSealer(
        sender,
        signer,
        ProfileSealer(runner, provider_timeout_s=None),
        epochs=epochs,
        batch_signing=batch_signing,
        clock=clock,
    )
    return World(clock, runner, directory, make_vehicle(), sender, signer, suite_impl, sealer, prof)


def with_header(parsed: ParsedEnvelope, **changes: object) -> bytes:
    """New protected-header bytes with ``changes`` applied (canonically encoded)."""
    header: ProtectedHeader = dataclasses.replace(parsed.header, **changes)  # type: ignore[arg-type]
    return encode_protected(header)


def rebuild(
    envelope: bytes,
    *,
    protected: bytes | None = None,
    ciphertext: bytes | None = None,
    signature: SingleSignature | BatchSignature | None = None,
) -> bytes:
    """Re-encode ``envelope`` with parts swapped, keeping the rest (no re-signing)."""
    parsed = decode_envelope(envelope)
    return encode_envelope(
        parsed.protected if protected is None else protected,
        parsed.ciphertext if ciphertext is None else ciphertext,
        parsed.signature if signature is None else signature,
    )


def flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]

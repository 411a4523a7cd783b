"""Command-bus message models: UUIDv7 ids, strict canonical CBOR codecs, signatures."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetbus.bus.commands import (
    MAX_MESSAGE_SIZE,
    Approval,
    Command,
    CommandState,
    Decision,
    Response,
    SignedApproval,
    SignedCommand,
    StatusEvent,
    Target,
    Telemetry,
    UUIDv7Generator,
    new_command_id,
    uuid7_timestamp_ms,
)
from fleetbus.bus.directory import FleetRoot, KeyDirectory, PrincipalKeyFile, issue_key
from fleetbus.bus.errors import FleetbusError, ReasonCode

NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z
DIGEST = bytes(range(32))  # a command digest for approvals whose command does not matter


# --- UUIDv7 --------------------------------------------------------------------------------


def _bits(text: str) -> int:
    return int(text.replace("-", ""), 16)


def test_uuid7_has_version_7_variant_10_and_the_clock_in_its_first_48_bits() -> None:
    before = time.time_ns() // 1_000_000
    value = new_command_id()
    after = time.time_ns() // 1_000_000
    bits = _bits(value)
    assert len(value) == 36
    assert value == value.lower()
    assert (bits >> 76) & 0xF == 7
    assert (bits >> 62) & 0b11 == 0b10
    assert before <= uuid7_timestamp_ms(value) <= after


def test_uuid7_ids_sort_in_creation_order_within_one_millisecond_and_across() -> None:
    ticks = iter([5, 5, 5, 6, 6, 4, 7])  # includes a clock step backwards
    gen = UUIDv7Generator(clock_ms=lambda: next(ticks))
    ids = [gen.new() for _ in range(7)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 7
    assert uuid7_timestamp_ms(ids[5]) == 6  # did not go back to 4


def test_uuid7_counter_overflow_moves_to_the_next_millisecond() -> None:
    gen = UUIDv7Generator(clock_ms=lambda: 10, random_bytes=lambda n: b"\xff" * n)
    first, second = gen.new(), gen.new()
    assert uuid7_timestamp_ms(first) == 10
    assert uuid7_timestamp_ms(second) == 11
    assert first < second


def test_uuid7_random_bits_come_from_the_random_source() -> None:
    gen = UUIDv7Generator(clock_ms=lambda: 1, random_bytes=lambda n: b"\x00" * n)
    assert gen.new() == "00000000-0001-7000-8000-000000000000"


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet() -> tuple[KeyDirectory, dict[str, PrincipalKeyFile]]:
    root = FleetRoot.generate("ed25519")
    window = {"not_before": NOW - 86400, "not_after": NOW + 86400}
    files = {}
    directory = KeyDirectory(root.public)
    for principal, kind, suite in [
        ("dispatch-1", "dispatcher", "ed25519"),
        ("dispatch-2", "approver", "composite-mldsa65-ed25519"),
    ]:
        issued = issue_key(root, principal_id=principal, kind=kind, signature_suite=suite, **window)
        directory.ingest(issued.signed)
        files[principal] = issued.key_file
    return directory, files


def _command(**kw: Any) -> Command:
    args: dict[str, Any] = {
        "issuer": "dispatch-1",
        "target": Target(vehicle="V-0001"),
        "action": "unlock_doors",
        "params": {"door": "driver", "count": 2, "level": 0.5, "force": False, "neg": -7},
        "now": NOW,
        "ttl_s": 60,
        "correlation_id": "corr-1",
    }
    args.update(kw)
    return Command.create(**args)


def _signed(fleet: tuple[KeyDirectory, dict[str, PrincipalKeyFile]], **kw: Any) -> SignedCommand:
    return SignedCommand.sign(_command(**kw), fleet[1]["dispatch-1"].signer())


# --- round trips ---------------------------------------------------------------------------


def test_signed_command_round_trip_is_byte_exact_and_verifies(fleet: Any) -> None:
    signed = _signed(fleet)
    data = signed.encode()
    decoded = SignedCommand.decode(data)
    assert decoded == signed
    assert decoded.encode() == data
    assert decoded.verify(fleet[0], at=NOW) == signed.command
    assert signed.command.expires_at == NOW + 60


def test_group_target_and_empty_optional_fields_round_trip(fleet: Any) -> None:
    signed = _signed(
        fleet, target=Target(group="north"), params={}, correlation_id=None, priority=-5
    )
    decoded = SignedCommand.decode(signed.encode())
    assert decoded.command.target == Target(group="north")
    assert decoded.command.correlation_id is None
    assert decoded.command.idempotency_key is None


def test_times_travel_as_integer_milliseconds(fleet: Any) -> None:
    signed = _signed(fleet, now=NOW + 0.123456)
    body = cbor2.loads(signed.encode())[1]
    assert body["issued_at"] == round((NOW + 0.123456) * 1000)
    assert type(body["expires_at"]) is int
    assert SignedCommand.decode(signed.encode()).command.issued_at == NOW + 0.123


def test_other_models_round_trip_byte_exact() -> None:
    cid = new_command_id()
    values: list[Any] = [
        Response(command_id=cid, vehicle_id="V-0001", status=200, detail="ok", executed_at=NOW),
        Response(command_id=cid, vehicle_id="V-0001", status=503, correlation_id="c"),
        StatusEvent(command_id=cid, state=CommandState.SUCCEEDED, at=NOW, vehicle_id="V-0001"),
        StatusEvent(
            command_id=cid, state="rejected", at=NOW, reason=ReasonCode.POLICY_DENIED, detail="no"
        ),
        Telemetry(vehicle_id="V-0001", at=NOW, fields={"soc": 0.81, "odo": 12345, "ok": True}),
    ]
    for value in values:
        data = value.encode()
        again = type(value).decode(data)
        assert again == value
        assert again.encode() == data


def test_status_event_final_states() -> None:
    cid = new_command_id()
    assert StatusEvent(command_id=cid, state="expired", at=NOW).final
    assert not StatusEvent(command_id=cid, state="delivered", at=NOW).final


# --- strict decoding -----------------------------------------------------------------------


def _reason(fn: Callable[[], object]) -> ReasonCode:
    with pytest.raises(FleetbusError) as info:
        fn()
    return info.value.reason


def _reencode(data: bytes, mutate: Callable[[list[Any]], None]) -> bytes:
    items = cbor2.loads(data)
    items[1] = dict(items[1])
    mutate(items)
    return cbor2.dumps(items, canonical=True)


def test_non_canonical_encodings_are_malformed(fleet: Any) -> None:
    data = _signed(fleet).encode()
    items = cbor2.loads(data)
    not_sorted = cbor2.dumps(items)  # map keys in insertion order, not canonical order
    assert not_sorted != data
    assert _reason(lambda: SignedCommand.decode(not_sorted)) is ReasonCode.MALFORMED
    assert _reason(lambda: SignedCommand.decode(data + b"\x00")) is ReasonCode.MALFORMED
    # The same array with an indefinite-length outer array.
    indefinite = b"\x9f" + data[1:] + b"\xff"
    assert _reason(lambda: SignedCommand.decode(indefinite)) is ReasonCode.MALFORMED


@pytest.mark.parametrize(
    "mutate",
    [
        lambda i: i[1].pop("priority"),
        lambda i: i[1].__setitem__("extra", 1),
        lambda i: i[1].__setitem__("id", "not-a-uuid"),
        lambda i: i[1].__setitem__("id", "0190a000-0000-4000-8000-000000000000"),  # v4
        lambda i: i[1].__setitem__("priority", True),
        lambda i: i[1].__setitem__("issued_at", 1.5),
        lambda i: i[1].__setitem__("expires_at", 0),
        lambda i: i[1].__setitem__("action", "Unlock Doors"),
        lambda i: i[1].__setitem__("target", {"vehicle": "V", "group": "g"}),
        lambda i: i[1].__setitem__("target", {"fleet": "all"}),
        lambda i: i[1].__setitem__("params", {"x": [1, 2]}),
        lambda i: i[1].__setitem__("params", {"x": None}),
        lambda i: i[1].__setitem__("params", {"x": float("nan")}),
        lambda i: i[1].__setitem__("params", {"x": 1 << 64}),
        lambda i: i[1].__setitem__("params", {str(n): n for n in range(65)}),
        lambda i: i[1].__setitem__("correlation_id", ""),
        lambda i: i.__setitem__(4, b""),
        lambda i: i.__setitem__(2, 7),
        lambda i: i.append(b"x"),
    ],
)
def test_wrong_fields_or_types_are_malformed(
    fleet: Any, mutate: Callable[[list[Any]], None]
) -> None:
    bad = _reencode(_signed(fleet).encode(), mutate)
    assert _reason(lambda: SignedCommand.decode(bad)) is ReasonCode.MALFORMED


def test_other_format_versions_are_unsupported(fleet: Any) -> None:
    bad = _reencode(_signed(fleet).encode(), lambda i: i.__setitem__(0, 2))
    assert _reason(lambda: SignedCommand.decode(bad)) is ReasonCode.UNSUPPORTED_VERSION


def test_oversize_is_rejected_before_parsing(fleet: Any) -> None:
    data = _signed(fleet, params={"blob": "x" * 4000}).encode()
    assert _reason(lambda: SignedCommand.decode(data, max_size=1024)) is ReasonCode.OVERSIZE
    huge = b"\xa0" * (MAX_MESSAGE_SIZE + 1)
    assert _reason(lambda: SignedCommand.decode(huge)) is ReasonCode.OVERSIZE
    assert _reason(lambda: Response.decode(huge)) is ReasonCode.OVERSIZE


def test_not_bytes_is_malformed() -> None:
    assert _reason(lambda: SignedCommand.decode("text")) is ReasonCode.MALFORMED  # type: ignore[arg-type]
    assert _reason(lambda: StatusEvent.decode(bytearray(b"\xa0"))) is ReasonCode.MALFORMED  # type: ignore[arg-type]


def test_unknown_state_or_reason_in_a_status_event_is_malformed() -> None:
    event = StatusEvent(command_id=new_command_id(), state="sealed", at=NOW)
    raw = dict(cbor2.loads(event.encode()))
    for key, value in [("state", "teleported"), ("reason", "because")]:
        bad = cbor2.dumps({**raw, key: value}, canonical=True)
        assert _reason(lambda bad=bad: StatusEvent.decode(bad)) is ReasonCode.MALFORMED


# --- signatures ----------------------------------------------------------------------------


def test_tampered_body_or_signature_is_a_bad_signature(fleet: Any) -> None:
    directory = fleet[0]
    data = _signed(fleet).encode()
    for mutate in [
        lambda i: i[1].__setitem__("action", "open_trunk"),
        lambda i: i[1].__setitem__("params", {"door": "all"}),
        lambda i: i[1].__setitem__("target", {"vehicle": "V-0002"}),
        lambda i: i[1].__setitem__("expires_at", i[1]["expires_at"] + 3_600_000),
        lambda i: i.__setitem__(4, bytes([i[4][0] ^ 1]) + i[4][1:]),
    ]:
        forged = SignedCommand.decode(_reencode(data, mutate))
        assert _reason(lambda f=forged: f.verify(directory, at=NOW)) is ReasonCode.BAD_SIGNATURE


def test_suite_substitution_is_a_bad_signature(fleet: Any) -> None:
    data = _reencode(_signed(fleet).encode(), lambda i: i.__setitem__(3, "mldsa65"))
    forged = SignedCommand.decode(data)
    assert _reason(lambda: forged.verify(fleet[0], at=NOW)) is ReasonCode.BAD_SIGNATURE


def test_issuer_claiming_another_principal_is_unknown_signer(fleet: Any) -> None:
    data = _reencode(_signed(fleet).encode(), lambda i: i[1].__setitem__("issuer", "dispatch-2"))
    forged = SignedCommand.decode(data)
    assert _reason(lambda: forged.verify(fleet[0], at=NOW)) is ReasonCode.UNKNOWN_SIGNER


def test_signer_validity_is_checked_at_the_given_time(fleet: Any) -> None:
    signed = _signed(fleet)
    assert _reason(lambda: signed.verify(fleet[0], at=NOW + 2 * 86400)) is (
        ReasonCode.SIGNER_EXPIRED
    )


def test_a_command_signature_does_not_verify_as_an_approval(fleet: Any) -> None:
    """Domain separation: the two ToBeSigned structures never collide."""
    signed = _signed(fleet)
    assert cbor2.loads(signed.to_be_signed())[0] == "fleetbus-command-v1"
    approval = SignedApproval(
        Approval.for_command(signed, approver="dispatch-1", issued_at=NOW),
        signed.key_id,
        signed.suite,
        signed.signature,
    )
    assert _reason(lambda: approval.verify(fleet[0], at=NOW)) is ReasonCode.BAD_SIGNATURE


def test_approval_round_trip_verifies_and_is_bound_to_its_command_id(fleet: Any) -> None:
    directory, files = fleet
    command_id, other_id = new_command_id(), new_command_id()
    approval = Approval(command_id, "dispatch-2", "approve", NOW, DIGEST)  # type: ignore[arg-type]
    signed = SignedApproval.sign(approval, files["dispatch-2"].signer())
    data = signed.encode()
    decoded = SignedApproval.decode(data)
    assert decoded.encode() == data
    verified = decoded.verify(directory, at=NOW)
    assert verified.decision is Decision.APPROVE
    assert verified.command_id == command_id
    # Re-pointing the approval at another command breaks the signature.
    moved = _reencode(data, lambda i: i[1].__setitem__("command_id", other_id))
    assert _reason(lambda: SignedApproval.decode(moved).verify(directory, at=NOW)) is (
        ReasonCode.BAD_SIGNATURE
    )
    deny = SignedApproval.decode(
        SignedApproval.sign(
            Approval(command_id, "dispatch-2", Decision.DENY, NOW, DIGEST),
            files["dispatch-2"].signer(),
        ).encode()
    ).verify(directory, at=NOW)
    assert deny.decision is Decision.DENY


def test_an_approval_for_the_wrong_principal_key_is_unknown_signer(fleet: Any) -> None:
    directory, files = fleet
    approval = Approval(new_command_id(), "dispatch-1", Decision.APPROVE, NOW, DIGEST)
    signed = SignedApproval.sign(approval, files["dispatch-2"].signer())  # dispatch-2's key
    assert _reason(lambda: signed.verify(directory, at=NOW)) is ReasonCode.UNKNOWN_SIGNER


# --- model validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {"action": "rm -rf"},
        {"ttl_s": 0},
        {"ttl_s": float("inf")},
        {"priority": 10_000},
        {"params": {"x": object()}},
        {"now": -1.0},
    ],
)
def test_invalid_commands_are_refused_when_built(kw: dict[str, Any]) -> None:
    with pytest.raises(FleetbusError):
        _command(**kw)


def test_target_needs_exactly_one_of_vehicle_or_group() -> None:
    for kw in [{}, {"vehicle": "V", "group": "g"}, {"vehicle": ""}]:
        with pytest.raises(FleetbusError):
            Target(**kw)


# --- fuzzing -------------------------------------------------------------------------------

_cbor_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(1 << 65), max_value=1 << 65),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.binary(max_size=20),
)
_cbor = st.recursive(
    _cbor_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=12), inner, max_size=6)
    ),
    max_leaves=30,
)
_DECODERS: list[Callable[[bytes], object]] = [
    SignedCommand.decode,
    SignedApproval.decode,
    Response.decode,
    StatusEvent.decode,
    Telemetry.decode,
]


def _only_fleetbus_errors(data: bytes) -> None:
    for decode in _DECODERS:
        with contextlib.suppress(FleetbusError):
            decode(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_decode_of_random_bytes_raises_only_fleetbus_errors(data: bytes) -> None:
    _only_fleetbus_errors(data)


@settings(max_examples=300, deadline=None)
@given(_cbor)
def test_decode_of_random_cbor_raises_only_fleetbus_errors(value: object) -> None:
    _only_fleetbus_errors(cbor2.dumps(value, canonical=True))


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_decode_of_mutated_commands_raises_only_fleetbus_errors(
    fleet: Any, data: st.DataObject
) -> None:
    encoded = bytearray(_signed(fleet).encode())
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(encoded) - 1))
        encoded[position] = data.draw(st.integers(0, 255))
    with contextlib.suppress(FleetbusError):
        SignedCommand.decode(bytes(encoded)).verify(fleet[0], at=NOW)


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=64),
        st.one_of(
            st.booleans(),
            st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1),
            st.floats(allow_nan=False, allow_infinity=False),
            st.text(max_size=50),
        ),
        max_size=20,
    )
)
def test_any_valid_params_round_trip_byte_exact(params: dict[str, Any]) -> None:
    command = _command(params=params)
    body = cbor2.dumps(command.to_wire(), canonical=True)
    again = Command.from_wire(cbor2.loads(body))
    assert again == command
    assert cbor2.dumps(again.to_wire(), canonical=True) == body

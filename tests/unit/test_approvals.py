"""M-of-N approvals in the authorize stage whatever the order of its two input topics.

``commands.requested`` and ``commands.approvals`` are separate topics, so an approval or a deny
can reach the stage before its command. Every approval counts only if it passes, at the moment
it is counted, the checks a late one passes: a signature by a key valid at that moment, an
approver who is not the issuer and whom Cedar lets approve that command's vehicle or group, the
window. A deny from such a principal vetoes; an approver counts once; what does not pass goes
to the DLQ with its reason and original bytes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import cbor2
import pytest

from fleetbus.bus.commands import (
    Approval,
    Command,
    Decision,
    ParamValue,
    SignedApproval,
    SignedCommand,
    Target,
    command_id_at,
    uuid7_timestamp_ms,
)
from fleetbus.bus.directory import (
    FleetRoot,
    KeyDirectory,
    PrincipalKeyFile,
    SignedKeyRecord,
    issue_key,
)
from fleetbus.bus.errors import ReasonCode
from fleetbus.bus.settings import FleetbusSettings
from fleetbus.processors.eos import DeadLetter, InputRecord, PartitionState, StageResult
from fleetbus.processors.policy import PolicyEngine, load_policy_text
from fleetbus.processors.stages import (
    AuthorizedCommand,
    AuthorizeStage,
    PipelineTopics,
    RejectedCommand,
)
from fleetbus.processors.stages.common import FOR_TRACK
from tests.support.envelope import fleet_of, issuer

NOW = time.time() - 7200
TOPICS = PipelineTopics.from_settings(FleetbusSettings().topics)
SUITE = "ed25519"
WINDOW_S = 60.0
HIGH = "unlock_doors"  # high criticality: waits for approvals


@dataclass
class Fleet:
    root: FleetRoot
    records: list[SignedKeyRecord]
    files: dict[str, PrincipalKeyFile]
    policy: PolicyEngine

    def directory(self, *revoked: str) -> KeyDirectory:
        """A directory of the fleet, with the keys of ``revoked`` principals revoked."""
        directory = KeyDirectory(self.root.public)
        directory.ingest_all(self.records)
        for signed in self.records:
            if signed.record.principal_id in revoked:
                directory.ingest(self.root.sign(signed.record.revocation(at=NOW)))
        return directory


@pytest.fixture(scope="module")
def fleet() -> Fleet:
    root = FleetRoot.generate(SUITE)
    issue = issuer(root, SUITE, NOW)
    issued = [
        issue("dispatch-1", "dispatcher"),
        issue("dispatch-4", "dispatcher"),
        issue("dispatch-2", "approver"),
        issue("dispatch-3", "approver"),
        # An approver whose key expires 30 s after NOW: valid when it signs, not later.
        issue("approver-short", "approver", not_after=NOW + 30),
        *(issue(v, "vehicle", kems=["x25519"], groups=["north"]) for v in ("V-1", "V-2")),
        issue("V-3", "vehicle", kems=["x25519"], groups=["south"]),
    ]
    issued_fleet = fleet_of(root, issued)
    records = [i.signed for i in issued]
    return Fleet(root, records, issued_fleet.files, issued_fleet.policy)


def authorize(
    fleet: Fleet,
    *,
    required: int = 1,
    max_early: int = 8,
    directory: KeyDirectory | None = None,
    max_lifetime_s: float = 86400,
) -> AuthorizeStage:
    return AuthorizeStage(
        topics=TOPICS,
        directory=directory or fleet.directory(),
        policy=fleet.policy,
        approvals_required=required,
        approval_window_s=WINDOW_S,
        clock_skew_s=30,
        max_lifetime_s=max_lifetime_s,
        max_message_bytes=32 * 1024,
        max_early_approvals=max_early,
    )


def command(
    fleet: Fleet,
    target: Target | None = None,
    *,
    action: str = HIGH,
    ttl_s: float = 600,
    now: float = NOW,
    command_id: str | None = None,
    params: dict[str, ParamValue] | None = None,
) -> SignedCommand:
    cmd = Command.create(
        issuer="dispatch-1",
        target=target or Target(vehicle="V-1"),
        action=action,
        params=params,
        ttl_s=ttl_s,
        now=now,
        command_id=command_id,
    )
    return SignedCommand.sign(cmd, fleet.files["dispatch-1"].signer())


def approval(
    fleet: Fleet,
    cmd: SignedCommand,
    approver: str = "dispatch-2",
    decision: Decision = Decision.APPROVE,
) -> bytes:
    a = Approval.for_command(cmd, approver=approver, decision=decision, issued_at=NOW)
    return SignedApproval.sign(a, fleet.files[approver].signer()).encode()


def deny(fleet: Fleet, cmd: SignedCommand, approver: str = "dispatch-2") -> bytes:
    return approval(fleet, cmd, approver, Decision.DENY)


class Run:
    """One stage and one partition state; every result kept, in order."""

    def __init__(self, stage: AuthorizeStage) -> None:
        self.stage, self.state = stage, PartitionState()
        self.results: list[StageResult] = []
        self.offset = 0

    def feed(self, topic: str, value: bytes, cid: str, at: float = NOW) -> StageResult:
        record = InputRecord(topic, 0, self.offset, cid.encode(), value)
        self.offset += 1
        result = self.stage.process(record, self.state, at)
        self.state.commit()
        self.results.append(result)
        return result

    def command(self, cmd: SignedCommand, at: float = NOW) -> StageResult:
        return self.feed(TOPICS.requested, cmd.encode(), cmd.command.id, at)

    def approval(self, value: bytes, cmd: SignedCommand, at: float = NOW) -> StageResult:
        return self.feed(TOPICS.approvals, value, cmd.command.id, at)

    def tick(self, at: float) -> StageResult:
        result = self.stage.tick(0, self.state, at)
        self.state.commit()
        self.results.append(result)
        return result

    def values(self, topic: str) -> list[bytes]:
        return [o.value for r in self.results for o in r.outputs if o.topic == topic and o.value]

    def authorized(self) -> list[AuthorizedCommand]:
        decoded = [AuthorizedCommand.decode(v) for v in self.values(TOPICS.authorized)]
        return [a for a in decoded if a.reader != FOR_TRACK]  # the seal stage's copies

    def rejected(self) -> list[RejectedCommand]:
        return [RejectedCommand.decode(v) for v in self.values(TOPICS.rejected)]

    def letters(self) -> list[DeadLetter]:
        return [DeadLetter.decode(v) for v in self.values(TOPICS.dlq)]

    def events(self) -> list[str]:
        return [e.event for r in self.results for e in r.audit]


def letters_of(result: StageResult) -> list[DeadLetter]:
    return [DeadLetter.decode(o.value) for o in result.outputs if o.topic == TOPICS.dlq and o.value]


# --- finding 1: an approval before its command is judged like any other ------------------


@pytest.mark.parametrize("approver", ["V-1", "dispatch-4"])
def test_an_early_approval_by_a_non_approver_does_not_authorize(
    fleet: Fleet, approver: str
) -> None:
    """A vehicle (the command's own target, even) or a dispatcher without approve rights,
    publishing first, gets nothing counted: the approval is dead-lettered when judged."""
    run, cmd = Run(authorize(fleet)), command(fleet)
    forged_consent = approval(fleet, cmd, approver)
    run.approval(forged_consent, cmd)
    result = run.command(cmd)
    assert result.outcome == "pending"
    assert not run.authorized()
    [letter] = letters_of(result)
    assert (letter.reason, letter.value) == (ReasonCode.POLICY_DENIED, forged_consent)
    assert letter.source_topic == TOPICS.approvals
    assert f"{approver} may not approve" in letter.detail
    # The same principal's approval after the command is refused the same way.
    late = run.approval(forged_consent, cmd, NOW + 1)
    assert [d.reason for d in letters_of(late)] == [ReasonCode.POLICY_DENIED]
    # A real approver still completes the command.
    run.approval(approval(fleet, cmd), cmd, NOW + 2)
    [auth] = run.authorized()
    assert auth.approvers == ("dispatch-2",)


def test_an_approval_is_judged_against_the_command_it_names(fleet: Fleet) -> None:
    """May-approve is decided for the vehicle or group of that command: with approvers limited
    to the south group, dispatch-2's early approval counts for V-3 (south), not for V-1."""
    text = load_policy_text()
    everywhere = 'permit (principal in Role::"approver", action == Action::"approve", resource);'
    assert everywhere in text
    south_only = everywhere.replace("resource)", 'resource in Group::"south")')
    policy = PolicyEngine(fleet.policy.registry, policy_text=text.replace(everywhere, south_only))
    stage = authorize(fleet)
    stage.policy = policy
    run = Run(stage)
    north, south = command(fleet, Target(vehicle="V-1")), command(fleet, Target(vehicle="V-3"))
    for cmd in (north, south):
        run.approval(approval(fleet, cmd), cmd)
        run.command(cmd)
    assert [a.vehicle_id for a in run.authorized()] == ["V-3"]
    [letter] = run.letters()
    assert (letter.reason, letter.value) == (ReasonCode.POLICY_DENIED, approval(fleet, north))


@pytest.mark.parametrize("order", ["approval first", "command first"])
def test_the_issuer_cannot_approve_its_own_command_in_either_order(
    fleet: Fleet, order: str
) -> None:
    run, cmd = Run(authorize(fleet)), command(fleet)
    own = approval(fleet, cmd, "dispatch-1")
    if order == "approval first":
        run.approval(own, cmd)
        run.command(cmd)
    else:
        run.command(cmd)
        run.approval(own, cmd)
    assert not run.authorized()
    [letter] = run.letters()
    assert (letter.reason, letter.value) == (ReasonCode.POLICY_DENIED, own)
    assert "cannot approve its own command" in letter.detail


@pytest.mark.parametrize(
    "sequence",
    [
        ("approve", "approve", "command", "approve"),
        ("approve", "command", "approve"),
        ("command", "approve", "approve"),
    ],
)
def test_an_approver_counts_once_whatever_the_order(
    fleet: Fleet, sequence: tuple[str, ...]
) -> None:
    """Two approvals needed; dispatch-2 approving twice (early, late or both) is one."""
    run, cmd = Run(authorize(fleet, required=2)), command(fleet)
    for i, step in enumerate(sequence):
        if step == "command":
            run.command(cmd, NOW + i)
        else:
            run.approval(approval(fleet, cmd), cmd, NOW + i)
    assert not run.authorized()
    assert run.events().count("approval_duplicate") == 1
    assert not run.letters()
    run.approval(approval(fleet, cmd, "dispatch-3"), cmd, NOW + 10)
    [auth] = run.authorized()
    assert sorted(auth.approvers) == ["dispatch-2", "dispatch-3"]


# --- finding 2: a deny vetoes whatever the order -------------------------------------------


@pytest.mark.parametrize(
    "sequence",
    [
        ("deny", "command", "approve"),
        ("deny", "approve", "command"),
        ("approve", "deny", "command"),
        ("command", "deny", "approve"),
    ],
)
def test_a_deny_vetoes_whatever_the_order(fleet: Fleet, sequence: tuple[str, ...]) -> None:
    """dispatch-2 denies, dispatch-3 approves: rejected, in every interleaving of the two
    topics where the deny reaches the stage before the quorum does."""
    run, cmd = Run(authorize(fleet)), command(fleet)
    steps = {
        "deny": lambda at: run.approval(deny(fleet, cmd), cmd, at),
        "approve": lambda at: run.approval(approval(fleet, cmd, "dispatch-3"), cmd, at),
        "command": lambda at: run.command(cmd, at),
    }
    for i, step in enumerate(sequence):
        steps[step](NOW + i)
    assert not run.authorized()
    [rejected] = run.rejected()
    assert rejected.reason is ReasonCode.POLICY_DENIED
    assert rejected.detail == "denied by approver dispatch-2"
    assert "approval_ignored" in run.events() or sequence[-1] == "command"


def test_an_approvers_deny_replaces_its_own_earlier_approval(fleet: Fleet) -> None:
    """One entry per approver; a change of mind to deny before the command arrives wins."""
    run, cmd = Run(authorize(fleet)), command(fleet)
    run.approval(approval(fleet, cmd), cmd)
    run.approval(deny(fleet, cmd), cmd, NOW + 1)
    run.approval(approval(fleet, cmd), cmd, NOW + 2)  # and does not flip back
    run.command(cmd, NOW + 3)
    assert not run.authorized()
    assert [r.detail for r in run.rejected()] == ["denied by approver dispatch-2"]


@pytest.mark.parametrize("denier", ["V-2", "dispatch-1", "dispatch-4"])
def test_a_deny_from_a_principal_who_may_not_approve_vetoes_nothing(
    fleet: Fleet, denier: str
) -> None:
    run, cmd = Run(authorize(fleet)), command(fleet)
    no_veto = deny(fleet, cmd, denier)
    run.approval(no_veto, cmd)
    run.command(cmd, NOW + 1)
    run.approval(approval(fleet, cmd), cmd, NOW + 2)
    assert [a.approvers for a in run.authorized()] == [("dispatch-2",)]
    [letter] = run.letters()
    assert (letter.reason, letter.value) == (ReasonCode.POLICY_DENIED, no_veto)


# --- the sweep: validity at decision time, expiry, bounded state --------------------------


def test_an_early_approval_by_a_key_revoked_before_its_command_does_not_count(
    fleet: Fleet,
) -> None:
    directory = fleet.directory()
    run, cmd = Run(authorize(fleet, directory=directory)), command(fleet)
    early = approval(fleet, cmd)
    run.approval(early, cmd)
    for signed in fleet.records:
        if signed.record.principal_id == "dispatch-2":
            directory.ingest(fleet.root.sign(signed.record.revocation(at=NOW)))
    run.command(cmd, NOW + 1)
    assert not run.authorized()
    [letter] = run.letters()
    assert (letter.reason, letter.value) == (ReasonCode.SIGNER_REVOKED, early)


def test_counted_approvals_are_judged_again_at_each_decision(fleet: Fleet) -> None:
    """Two needed: approver-short's approval counted at NOW no longer counts once its key has
    expired (NOW + 30), when dispatch-3's approval would complete the quorum."""
    run, cmd = Run(authorize(fleet, required=2)), command(fleet)
    run.command(cmd)
    first = approval(fleet, cmd, "approver-short")
    run.approval(first, cmd, NOW + 1)
    run.approval(approval(fleet, cmd, "dispatch-3"), cmd, NOW + 40)
    assert not run.authorized()
    [letter] = run.letters()
    assert (letter.reason, letter.value) == (ReasonCode.SIGNER_EXPIRED, first)
    run.approval(approval(fleet, cmd), cmd, NOW + 41)
    [auth] = run.authorized()
    assert sorted(auth.approvers) == ["dispatch-2", "dispatch-3"]


def test_a_pending_commands_issuer_is_verified_again_when_approved(fleet: Fleet) -> None:
    directory = fleet.directory()
    run, cmd = Run(authorize(fleet, directory=directory)), command(fleet)
    run.command(cmd)
    for signed in fleet.records:
        if signed.record.principal_id == "dispatch-1":
            directory.ingest(fleet.root.sign(signed.record.revocation(at=NOW)))
    run.approval(approval(fleet, cmd), cmd, NOW + 1)
    assert not run.authorized()
    [rejected] = run.rejected()
    assert rejected.reason is ReasonCode.SIGNER_REVOKED


def test_a_pending_command_that_expires_is_not_authorized_by_a_later_approval(
    fleet: Fleet,
) -> None:
    """The window (60 s) outlives the command (10 s + 30 s skew)."""
    run, cmd = Run(authorize(fleet)), command(fleet, ttl_s=10)
    run.command(cmd)
    run.approval(approval(fleet, cmd), cmd, NOW + 45)
    assert not run.authorized()
    assert [r.reason for r in run.rejected()] == [ReasonCode.EXPIRED]


def test_the_timer_rejects_a_pending_command_at_its_expiry(fleet: Fleet) -> None:
    run, cmd = Run(authorize(fleet)), command(fleet, ttl_s=10)
    run.command(cmd)
    assert not run.tick(NOW + 35).outputs
    run.tick(NOW + 45)
    assert [r.reason for r in run.rejected()] == [ReasonCode.EXPIRED]
    [letter] = run.letters()
    assert letter.value == cmd.encode()


def test_early_approvals_per_command_id_are_bounded(fleet: Fleet) -> None:
    """One entry per approver and at most ``max_early`` per command id; the excess is refused
    with a reason, and every held one is judged when the command comes."""
    run, cmd = Run(authorize(fleet, max_early=3)), command(fleet)
    flood = [approval(fleet, cmd, p) for p in ("V-1", "V-2", "V-3", "dispatch-4")]
    for value in flood:
        run.approval(value, cmd)
    [refused] = run.letters()
    assert (refused.reason, refused.value) == (ReasonCode.TOO_MANY_APPROVALS, flood[3])
    run.command(cmd, NOW + 1)
    judged = run.letters()[1:]
    assert sorted(d.value for d in judged) == sorted(flood[:3])
    assert {d.reason for d in judged} == {ReasonCode.POLICY_DENIED}
    assert not run.authorized()


def test_an_early_approval_whose_command_never_comes_is_dead_lettered(fleet: Fleet) -> None:
    run, cmd = Run(authorize(fleet)), command(fleet)
    early = approval(fleet, cmd)
    run.approval(early, cmd)
    assert not run.tick(NOW + WINDOW_S - 1).outputs
    run.tick(NOW + WINDOW_S + 1)
    [letter] = run.letters()
    assert (letter.reason, letter.value) == (ReasonCode.EXPIRED, early)
    assert letter.source_topic == TOPICS.approvals
    assert not dict(run.state.items())
    # The command after that waits for a fresh approval.
    assert run.command(cmd, NOW + WINDOW_S + 2).outcome == "pending"
    assert not run.authorized()


def test_an_early_approval_past_its_hold_is_not_counted_even_before_the_timer(
    fleet: Fleet,
) -> None:
    """The result must not depend on whether the timer ran between the two records."""
    run, cmd = Run(authorize(fleet)), command(fleet, ttl_s=3600)
    early = approval(fleet, cmd)
    run.approval(early, cmd)
    run.command(cmd, NOW + WINDOW_S + 1)
    assert not run.authorized()
    assert [(d.reason, d.value) for d in run.letters()] == [(ReasonCode.EXPIRED, early)]


def test_decided_commands_keep_no_approval_bytes(fleet: Fleet) -> None:
    """The replay set keeps ids, not the held approvals of decided commands."""
    run, cmd = Run(authorize(fleet)), command(fleet)
    run.approval(approval(fleet, cmd), cmd)
    run.command(cmd)
    assert run.authorized()
    [(key, raw)] = list(run.state.items())
    assert key == f"cmd/{cmd.command.id}"
    assert approval(fleet, cmd) not in raw


def test_an_approvers_newer_approval_replaces_one_whose_key_lapsed(fleet: Fleet) -> None:
    """approver-short approves at NOW + 1, its key is rotated, it approves again with the new
    key: when dispatch-3 completes the quorum its newer approval counts (the older one, whose
    key is rotated out, is not judged any more)."""
    renewed = issue_key(
        fleet.root,
        principal_id="approver-short",
        kind="approver",
        version=2,
        signature_suite=SUITE,
        not_before=NOW - 3600,
        not_after=NOW + 86400,
    )
    directory = fleet.directory()
    run, cmd = Run(authorize(fleet, required=2, directory=directory)), command(fleet)
    run.command(cmd)
    run.approval(approval(fleet, cmd, "approver-short"), cmd, NOW + 1)
    directory.ingest(renewed.signed)  # rotation: version 1 is superseded from now on
    again = Approval.for_command(cmd, approver="approver-short", issued_at=NOW + 20)
    run.approval(SignedApproval.sign(again, renewed.key_file.signer()).encode(), cmd, NOW + 20)
    run.approval(approval(fleet, cmd, "dispatch-3"), cmd, NOW + 40)
    [auth] = run.authorized()
    assert sorted(auth.approvers) == ["approver-short", "dispatch-3"]
    assert not run.letters()


# --- an approval binds exactly one command (its digest), and an id is never reused ---------


def test_approvals_of_a_forgotten_command_do_not_approve_another_under_its_id(
    fleet: Fleet,
) -> None:
    """Regression: the bus once forgot a command id at its expiry + skew; an insider could then
    publish a different command under the same id and replay the old signed approvals."""
    run = Run(authorize(fleet))
    first = command(fleet, ttl_s=10)
    approved = approval(fleet, first)
    run.command(first)
    run.approval(approved, first, NOW + 1)
    assert [a.action for a in run.authorized()] == [HIGH]
    later = NOW + 100  # long past the first command's expiry + skew
    run.tick(later)
    other = command(
        fleet,
        Target(vehicle="V-2"),
        action="disable_vehicle",
        now=later,
        command_id=first.command.id,
    )
    run.command(other, later)
    run.approval(approved, other, later)
    assert [a.action for a in run.authorized()] == [HIGH]
    [rejected] = run.rejected()
    assert rejected.reason is ReasonCode.REPLAYED


@pytest.mark.parametrize(
    "change",
    [
        {"params": {"door": "all"}},
        {"target": Target(vehicle="V-2")},
        {"action": "disable_vehicle"},
    ],
)
@pytest.mark.parametrize("order", ["approval first", "command first"])
def test_an_approval_counts_only_for_the_exact_command_it_signed(
    fleet: Fleet, change: dict[str, object], order: str
) -> None:
    """The approver saw one command; another under the same id is published (or reaches the bus
    first): the approval is ``approval_mismatch`` for it, whichever topic comes first."""
    shown = command(fleet, params={"door": "driver"})
    kw: dict[str, object] = {"params": {"door": "driver"}, **change}
    sent = command(fleet, command_id=shown.command.id, **kw)  # type: ignore[arg-type]
    run = Run(authorize(fleet))
    value = approval(fleet, shown)
    if order == "approval first":
        run.approval(value, sent)
        run.command(sent, NOW + 1)
    else:
        run.command(sent)
        run.approval(value, sent, NOW + 1)
    assert not run.authorized()
    [letter] = run.letters()
    assert (letter.reason, letter.value) == (ReasonCode.APPROVAL_MISMATCH, value)
    run.approval(approval(fleet, sent), sent, NOW + 2)  # an approval of what was sent counts
    assert [a.command_id for a in run.authorized()] == [sent.command.id]


def test_a_command_id_older_than_the_replay_window_is_refused(fleet: Fleet) -> None:
    """Once the replay set may have forgotten an id, no command under it is accepted."""
    run = Run(authorize(fleet, max_lifetime_s=600))
    first = command(fleet, action="ping", ttl_s=10)
    run.command(first)
    late = NOW + 600 + 30 + 1  # the id's time + max lifetime + skew has passed
    run.tick(late)
    assert run.state.get(f"cmd/{first.command.id}") is None
    again = command(fleet, action="ping", now=late, command_id=first.command.id)
    run.command(again, late)
    assert len(run.authorized()) == 1
    [rejected] = run.rejected()
    assert rejected.reason is ReasonCode.EXPIRED
    assert "older than the replay window" in rejected.detail


def test_the_replay_set_keeps_an_id_until_it_is_too_old(fleet: Fleet) -> None:
    run = Run(authorize(fleet, max_lifetime_s=600))
    first = command(fleet, action="ping", ttl_s=10)
    run.command(first)
    # The last moment a command under this id is accepted: its time + max lifetime + skew.
    just_before = uuid7_timestamp_ms(first.command.id) / 1000 + 600 + 30
    run.tick(just_before)
    again = command(fleet, action="ping", now=just_before, command_id=first.command.id)
    run.command(again, just_before)
    [rejected] = run.rejected()
    assert rejected.reason is ReasonCode.REPLAYED


def test_a_command_id_from_the_future_is_refused(fleet: Fleet) -> None:
    """Else one entry of the replay set could be kept for as long as the id's time says."""
    ahead = command(fleet, action="ping", command_id=command_id_at(NOW + 3600))
    run = Run(authorize(fleet))
    run.command(ahead)
    [rejected] = run.rejected()
    assert rejected.reason is ReasonCode.NOT_YET_VALID
    assert run.state.get(f"cmd/{ahead.command.id}") is None


def test_a_held_approval_of_the_old_format_never_counts(fleet: Fleet) -> None:
    """Migration: a v1 approval (command id only, no digest) held in state or published by an
    old client is refused ``unsupported_version``; the command needs a new approval."""
    cmd = command(fleet)
    body = {"command_id": cmd.command.id, "approver": "dispatch-2", "decision": "approve",
            "issued_at": round(NOW * 1000)}  # fmt: skip
    signer = fleet.files["dispatch-2"].signer()
    tbs = cbor2.dumps(["fleetbus-approval-v1", signer.key_id, signer.suite, body], canonical=True)
    old = cbor2.dumps([1, body, signer.key_id, signer.suite, signer.sign(tbs)], canonical=True)
    for order in ("approval first", "command first"):
        run = Run(authorize(fleet))
        if order == "approval first":
            run.approval(old, cmd)
            run.command(cmd, NOW + 1)
        else:
            run.command(cmd)
            run.approval(old, cmd, NOW + 1)
        assert not run.authorized()
        assert [letter.reason for letter in run.letters()] == [ReasonCode.UNSUPPORTED_VERSION]

"""The demo scenario: the traffic it sends (routine, high-criticality, attacks, replays, a QKD
link outage and recovery) and, per command and vehicle, the outcome it expects."""

from __future__ import annotations

import random
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from rich.console import Console
from rich.progress import Progress

from fleetbus.bus.commands import (
    FINAL_STATES,
    Command,
    CommandState,
    ParamValue,
    SignedCommand,
    StatusEvent,
    Target,
)
from fleetbus.bus.errors import ConfigError, ReasonCode
from fleetbus.bus.keyfolder import KeyFolder
from fleetbus.bus.settings import FleetbusSettings
from fleetbus.devtools.demo.fleet import APPROVER, DISPATCHER, INTRUDER, DemoFleet, DemoOptions
from fleetbus.devtools.demo.observe import StatusFollower

QKD_PATH: Final = "qkd-etsi014+xwing"
_FINAL: Final = frozenset(str(s) for s in FINAL_STATES)
_KEY_PATH_RE: Final = re.compile(r"key path (\S+)")
#: Routine actions (policy catalogue) and an elevated one dispatchers may send to one vehicle.
ROUTINE_ACTIONS: Final = ("lock_doors", "set_climate", "push_route", "ping", "set_battery_profile")


@dataclass
class Expectation:
    """What one (command, vehicle) must end as. ``vehicle_id`` None: the command as a whole."""

    case: str
    command_id: str
    vehicle_id: str | None
    state: str
    reason: str | None
    sent_at: float
    phase: str
    routine: bool
    detail_contains: str | None = None
    outcome: StatusEvent | None = None

    def resolve(self, events: list[StatusEvent]) -> bool:
        if self.outcome is not None:
            return True
        for event in events:
            if str(event.state) not in _FINAL:
                continue
            replay = event.reason is ReasonCode.REPLAYED
            if replay != (self.reason == ReasonCode.REPLAYED.value):
                continue
            if self.vehicle_id and event.vehicle_id not in (self.vehicle_id, None):
                continue
            self.outcome = event
            return True
        return False

    @property
    def held(self) -> bool:
        o = self.outcome
        if o is None or str(o.state) != self.state:
            return False
        if self.reason is not None and (o.reason is None or o.reason.value != self.reason):
            return False
        return self.detail_contains is None or self.detail_contains in o.detail

    @property
    def observed(self) -> str:
        o = self.outcome
        if o is None:
            return "no final status"
        return str(o.state) + (f" ({o.reason.value})" if o.reason else "")

    @property
    def latency_s(self) -> float | None:
        return None if self.outcome is None else max(0.0, self.outcome.at - self.sent_at)


class Scenario:
    """Sends the demo's traffic and keeps one ``Expectation`` per outcome it waits for."""

    def __init__(
        self,
        settings: FleetbusSettings,
        fleet: DemoFleet,
        options: DemoOptions,
        kme: Any,
        follower: StatusFollower,
        progress: Progress,
    ) -> None:
        from fleetbus.bus.directory import load_key_file
        from fleetbus.sdk.dispatch import CommandPublisher

        self.settings = settings
        self.fleet = fleet
        self.options = options
        self.kme = kme
        self.follower = follower
        self.progress = progress
        self.rng = random.Random(options.seed)  # noqa: S311 - traffic mix, not crypto
        self.expectations: list[Expectation] = []
        self.phase_of: dict[str, str] = {}
        self.qkd_restored_after_s: float | None = None
        self.signed: dict[str, SignedCommand] = {}
        self.sent: Counter[str] = Counter()
        self.outage_s = 0.0
        self.enclave_ok = ""
        keys = fleet.keys_dir
        self.dispatch = CommandPublisher(
            settings,
            principal_id=DISPATCHER,
            private_key_file=KeyFolder(keys).private_key(DISPATCHER),
        )
        self.approver = CommandPublisher(
            settings, principal_id=APPROVER, private_key_file=KeyFolder(keys).private_key(APPROVER)
        )
        self.intruder = CommandPublisher(
            settings,
            principal_id=INTRUDER,
            signer=load_key_file(KeyFolder(keys).private_key(INTRUDER)).signer(),
        )
        self.task = progress.add_task("starting", total=0)
        self.phase = "ready"
        self.phases: list[str] = []

    def close(self) -> None:
        for publisher in (self.dispatch, self.approver, self.intruder):
            publisher.close()

    def enter(self, phase: str) -> None:
        self.phase = phase
        self.phases.append(phase)
        self.tick()

    # -- sending --------------------------------------------------------------------------

    def _publish(self, publisher: Any, signed: SignedCommand, kind: str) -> None:
        publisher.publish(signed)
        self.signed.setdefault(signed.command.id, signed)
        self.sent[kind] += 1

    def _expect(
        self,
        case: str,
        signed: SignedCommand,
        sent_at: float,
        state: CommandState,
        *,
        reason: ReasonCode | None = None,
        vehicles: list[str] | None = None,
        routine: bool = False,
        detail_contains: str | None = None,
    ) -> None:
        cid = signed.command.id
        self.phase_of.setdefault(cid, self.phase)
        targets: list[str | None] = list(vehicles) if vehicles else [None]
        for vid in targets:
            self.expectations.append(
                Expectation(
                    case=case,
                    command_id=cid,
                    vehicle_id=vid,
                    state=str(state),
                    reason=reason.value if reason else None,
                    sent_at=sent_at,
                    phase=self.phase,
                    routine=routine,
                    detail_contains=detail_contains,
                )
            )
        self.progress.update(self.task, total=len(self.expectations))

    def routine(self, target: str, action: str | None = None, *, group: bool = False) -> str:
        """Send one routine command to a vehicle (or a group) and expect success per vehicle."""
        action = action or self.rng.choice(ROUTINE_ACTIONS[:-1] if group else ROUTINE_ACTIONS)
        catalogue: dict[str, dict[str, ParamValue]] = {
            "lock_doors": {},
            "set_climate": {"celsius": 21},
            "push_route": {"route": f"R-{self.rng.randrange(1000):03d}"},
            "ping": {},
            "set_battery_profile": {"profile": "eco"},
        }
        params = catalogue[action]
        tgt = Target(group=target) if group else Target(vehicle=target)
        signed = self.dispatch.sign(tgt, action, params, ttl_s=self.options.final_timeout_s)
        sent_at = time.time()
        self._publish(self.dispatch, signed, "group commands" if group else "routine commands")
        members = self.fleet.groups[target] if group else [target]
        self._expect(
            "routine", signed, sent_at, CommandState.SUCCEEDED, vehicles=members, routine=True
        )
        return signed.command.id

    def high(
        self, case: str, vehicle: str, decision: str | None, state: CommandState, reason: Any
    ) -> str:
        """A high-criticality command (unlock_doors), approved, denied or left waiting."""
        signed = self.dispatch.sign(Target(vehicle=vehicle), "unlock_doors", {"door": "driver"})
        sent_at = time.time()
        self._publish(self.dispatch, signed, "high-criticality commands")
        if decision is not None:
            self.approver.approve(signed, decision)
        self._expect(
            case,
            signed,
            sent_at,
            state,
            reason=reason,
            vehicles=[vehicle] if state is CommandState.SUCCEEDED else None,
            detail_contains="approval window elapsed" if decision is None else None,
        )
        return signed.command.id

    def attacks(self) -> None:
        """Unauthorized principals, expired, forged and junk input."""
        victim = self.fleet.pqc[0]
        signed = self.intruder.sign(Target(vehicle=victim), "unlock_doors")
        at = time.time()
        self._publish(self.intruder, signed, "attacks")
        self._expect("intruder (key not in the directory)", signed, at, CommandState.REJECTED,
                     reason=ReasonCode.UNKNOWN_SIGNER)  # fmt: skip
        signed = self.approver.sign(Target(vehicle=victim), "lock_doors")
        at = time.time()
        self._publish(self.approver, signed, "attacks")
        self._expect("approver issuing a command (no dispatcher role)", signed, at,
                     CommandState.REJECTED, reason=ReasonCode.POLICY_DENIED)  # fmt: skip
        signed = self.dispatch.sign(Target(group="south"), "set_battery_profile", {"p": "eco"})
        at = time.time()
        self._publish(self.dispatch, signed, "attacks")
        self._expect("elevated action to a whole group", signed, at, CommandState.REJECTED,
                     reason=ReasonCode.POLICY_DENIED)  # fmt: skip
        old = Command.create(issuer=DISPATCHER, target=Target(vehicle=victim), action="lock_doors",
                             ttl_s=30, now=time.time() - 3600)  # fmt: skip
        signed = SignedCommand.sign(old, self.dispatch.signer)
        at = time.time()
        self._publish(self.dispatch, signed, "attacks")
        self._expect("expired command", signed, at, CommandState.REJECTED,
                     reason=ReasonCode.EXPIRED)  # fmt: skip
        good = self.dispatch.sign(Target(vehicle=victim), "unlock_doors")
        forged = SignedCommand(
            good.command, good.key_id, good.suite, bytes(b ^ 0x5A for b in good.signature)
        )
        at = time.time()
        self._publish(self.dispatch, forged, "attacks")
        self._expect("forged signature", forged, at, CommandState.REJECTED,
                     reason=ReasonCode.BAD_SIGNATURE)  # fmt: skip
        from kafka import KafkaProducer

        producer = KafkaProducer(bootstrap_servers=self.settings.kafka_bootstrap)
        try:
            producer.send(
                self.settings.topics.full(self.settings.topics.commands_requested),
                key=b"junk",
                value=b"\xff\x00 not a command",
            ).get(timeout=10)
            self.sent["attacks"] += 1
        finally:
            producer.close()

    def replay(self, original: str) -> None:
        """Publish the exact signed bytes of an already executed command again."""
        signed = self.signed[original]
        at = time.time()
        self._publish(self.dispatch, signed, "replays")
        self._expect("replay of an executed command", signed, at, CommandState.REJECTED,
                     reason=ReasonCode.REPLAYED)  # fmt: skip

    # -- waiting --------------------------------------------------------------------------

    def pending(self, select: Callable[[Expectation], bool] | None = None) -> list[Expectation]:
        return [
            e
            for e in self.expectations
            if e.outcome is None and (select is None or select(e))
            and not e.resolve(self.follower.events(e.command_id))
        ]  # fmt: skip

    def tick(self) -> None:
        self.pending()
        done = sum(1 for e in self.expectations if e.outcome is not None)
        self.progress.update(self.task, completed=done, description=self._describe())

    def _describe(self) -> str:
        return f"[bold]{self.phase}[/bold]"

    def wait(self, timeout_s: float, select: Callable[[Expectation], bool] | None = None) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.tick()
            if not self.pending(select):
                return True
            time.sleep(0.2)
        self.tick()
        return not self.pending(select)

    def paced(self, sends: list[Callable[[], object]], duration_s: float) -> None:
        """Run ``sends`` spread evenly over ``duration_s``, updating progress meanwhile."""
        start = time.monotonic()
        for i, send in enumerate(sends):
            due = start + duration_s * i / max(1, len(sends))
            while (left := due - time.monotonic()) > 0:
                self.tick()
                time.sleep(min(left, 0.2))
            send()
        self.tick()

    def sealed_path(self, command_id: str, vehicle_id: str) -> str | None:
        for event in self.follower.events(command_id):
            if str(event.state) == "sealed" and event.vehicle_id == vehicle_id:
                found = _KEY_PATH_RE.search(event.detail)
                return found.group(1).rstrip(",") if found else None
        return None

    # -- the story ------------------------------------------------------------------------

    def play(self, console: Console) -> None:
        opts = self.options
        fleet = self.fleet
        singles = opts.commands - 3  # three group commands
        share = [int(singles * 0.4), int(singles * 0.3)]
        share.append(singles - sum(share))
        targets = [*fleet.vehicles, *fleet.vehicles, *fleet.edge]  # edge units ~2-4 %

        def single() -> Callable[[], object]:
            return lambda: self.routine(self.rng.choice(targets))

        # Ready: one command per kind of recipient proves the pipeline is up end to end.
        self.enter("warm-up")
        console.print("[bold]5/7[/bold] warm-up: one command each to a PQC vehicle, a legacy "
                      "vehicle and an edge unit")  # fmt: skip
        first = self.routine(fleet.pqc[0], "ping")
        for vid in [*fleet.legacy[:1], fleet.edge[0]]:
            self.routine(vid, "ping")
        if not self.wait(120):
            raise ConfigError("the pipeline did not complete the warm-up commands in 120 s")
        for e in self.expectations:
            e.case = "warm-up"

        self.enter("1 QKD link up")
        console.print("[bold]6/7[/bold] scenario: routine traffic, approvals, attacks, "
                      "QKD outage and recovery")  # fmt: skip
        self.high("high-criticality, no approval", fleet.pqc[1], None,
                  CommandState.REJECTED, ReasonCode.POLICY_DENIED)  # fmt: skip
        self.high("high-criticality, approved", fleet.pqc[2], "approve",
                  CommandState.SUCCEEDED, None)  # fmt: skip
        self.high("high-criticality, denied by the approver", fleet.pqc[3], "deny",
                  CommandState.REJECTED, ReasonCode.POLICY_DENIED)  # fmt: skip
        enclave_ok = self.high("high-criticality to an edge unit (enclave: QKD only), approved",
                               fleet.edge[0], "approve", CommandState.SUCCEEDED, None)  # fmt: skip
        self.attacks()
        self.routine("north", "set_climate", group=True)
        self.routine("depot", "push_route", group=True)
        self.replay(first)
        self.paced([single() for _ in range(share[0])], opts.outage_s)
        # No QKD-keyed envelope may be in flight when the link drops (its key could not be
        # fetched at KME-B any more); wait for the edge units' commands.
        self.wait(60, lambda e: e.vehicle_id in fleet.edge)

        self.enter("2 QKD link DOWN")
        self.kme.admin("/admin/link", {"up": False})
        down_at = time.monotonic()
        sends = [single() for _ in range(share[1])]
        for k, eid in enumerate(fleet.edge):
            sends.insert(k * max(1, len(sends) // len(fleet.edge)), self._edge_ping(eid))
        self.paced(sends, opts.outage_s)
        self.high("enclave command during the QKD outage (no fallback)", fleet.edge[1],
                  "approve", CommandState.REJECTED, ReasonCode.KEY_PATH_EXHAUSTED)  # fmt: skip
        self.wait(60, lambda e: e.vehicle_id in fleet.edge or e.reason == "key_path_exhausted")
        outage_s = time.monotonic() - down_at

        self.enter("3 QKD link up again")
        self.kme.admin("/admin/link", {"up": True})
        up_at = time.monotonic()
        self.routine("south", "lock_doors", group=True)
        sends = [single() for _ in range(share[2])]
        self.paced(sends, opts.outage_s)
        # The bus's QKD circuit breaker lets a trial through 30 s after it opened: probe the
        # edge units until an envelope is QKD-keyed again.
        probes: list[tuple[str, str]] = []
        deadline = up_at + opts.qkd_recovery_timeout_s
        while self.qkd_restored_after_s is None and time.monotonic() < deadline:
            eid = fleet.edge[len(probes) % len(fleet.edge)]
            probes.append((self.routine(eid, "ping"), eid))
            for _ in range(10):
                self.tick()
                time.sleep(0.2)
            if any(self.sealed_path(c, v) == QKD_PATH for c, v in probes):
                self.qkd_restored_after_s = time.monotonic() - up_at
        self.outage_s = outage_s
        self.wait(opts.final_timeout_s)
        self.enter("done")
        self.tick()
        self.enclave_ok = enclave_ok

    def _edge_ping(self, eid: str) -> Callable[[], object]:
        return lambda: self.routine(eid, "ping")

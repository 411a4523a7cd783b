"""The dispatch SDK: sign commands and approvals, publish them, and wait for their outcome.

``CommandPublisher`` is a dispatch system's first touch::

    publisher = CommandPublisher(settings, principal_id="dispatch-1",
                                 private_key_file="keys/dispatch-1.key")
    handle = publisher.send(Target(vehicle="V-0017"), "unlock_doors", {"door": "driver"})
    outcome = handle.wait(30)  # outcome.state; outcome.vehicles: each vehicle's final event

Commands go to ``commands.requested`` keyed by command id; approvals to ``commands.approvals``;
outcomes are read from ``commands.status``. See ``docs/sdk.md``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from fleetbus.bus.commands import (
    FINAL_STATES,
    Approval,
    Command,
    CommandState,
    Decision,
    ParamValue,
    SignedApproval,
    SignedCommand,
    StatusEvent,
    Target,
    group_targets,
)
from fleetbus.bus.directory import load_key_file
from fleetbus.bus.errors import ConfigError, FleetbusError, ReasonCode
from fleetbus.bus.keys import Signer
from fleetbus.bus.settings import FleetbusSettings
from fleetbus.sdk.kafka_transport import KafkaTransport
from fleetbus.sdk.status import StatusReader, kafka_error, read_status_events, status_partition
from fleetbus.sdk.transport import Transport

__all__ = [
    "CommandHandle",
    "CommandOutcome",
    "CommandPublisher",
    "StatusTimeoutError",
    "read_status_events",
    "status_partition",
]

#: Status events may be stamped by another host whose clock runs a little behind ours.
STATUS_LOOKBACK_MS: Final = 30_000
DEFAULT_UNTIL: Final = frozenset(str(s) for s in FINAL_STATES)


class StatusTimeoutError(FleetbusError, TimeoutError):
    """No status event in the wanted states arrived before the wait timed out.

    The command may still complete later; its status stays readable on ``commands.status``.
    """

    reason = ReasonCode.EXPIRED


class CommandPublisher:
    """Signs commands (and approvals) as ``principal_id`` and publishes them.

    Give either ``private_key_file`` (a ``fleetbus keys`` ``<principal>.key`` file, mode 0600)
    or an already loaded ``signer``. The Kafka producer is idempotent with ``acks=all``: a
    retried send never duplicates a record and a confirmed send is on every in-sync replica.
    ``transport``: where records go (default: a ``KafkaTransport`` of the settings, connected
    here); ``MemoryTransport`` for tests. ``CommandHandle.wait`` reads ``commands.status`` from
    Kafka whatever the transport.
    """

    def __init__(
        self,
        settings: FleetbusSettings,
        *,
        principal_id: str,
        private_key_file: str | Path | None = None,
        signer: Signer | None = None,
        timeout_s: float = 10.0,
        client_id: str | None = None,
        transport: Transport | None = None,
    ) -> None:
        if (private_key_file is None) == (signer is None):
            raise ConfigError("give exactly one of private_key_file or signer")
        if signer is None:
            assert private_key_file is not None
            key_file = load_key_file(Path(private_key_file).expanduser())
            if key_file.principal_id != principal_id:
                raise ConfigError(
                    f"{private_key_file} holds the keys of {key_file.principal_id!r}, "
                    f"not {principal_id!r}"
                )
            signer = key_file.signer()
        self.settings = settings
        self.principal_id = principal_id
        self.signer = signer
        self.timeout_s = timeout_s
        self._bootstrap = settings.kafka_bootstrap
        self.client_id = client_id or f"fleetbus-dispatch-{principal_id}"
        from kafka.errors import KafkaError

        self.transport: Transport = (
            transport
            if transport is not None
            else KafkaTransport(
                settings,
                client_id=self.client_id,
                producer_options={
                    # kafka-python waits bootstrap_timeout_ms (30 s) for the first metadata answer
                    # unless told otherwise: the constructor too must give up within timeout_s.
                    "bootstrap_timeout_ms": int(timeout_s * 1000),
                    "max_block_ms": int(timeout_s * 1000),
                    "request_timeout_ms": int(timeout_s * 1000),
                    "linger_ms": 5,
                },
                close_timeout_s=timeout_s,
            )
        )
        try:
            self.transport.connect()
        except (KafkaError, OSError) as exc:
            raise kafka_error("connecting the command producer", self._bootstrap, exc) from exc

    # -- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> CommandPublisher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- publishing -----------------------------------------------------------------------

    def _publish(self, topic_name: str, key: str, value: bytes) -> Any:
        from kafka.errors import KafkaError

        from fleetbus.observability.tracing import get_tracer, record_delivery, send_span

        topic = self.settings.topics.full(topic_name)
        headers: list[tuple[str, bytes]] = []
        try:
            # The PRODUCER span is where the command's trace starts (or joins the caller's);
            # its W3C context goes into the record's headers for every later hop.
            with send_span(
                get_tracer(),
                topic,
                headers,
                key=key,
                bootstrap=self._bootstrap,
                client_id=self.client_id,
            ) as span:
                future = self.transport.send(topic, key.encode(), value, headers)
                metadata = future.get(timeout=self.timeout_s)
                record_delivery(span, partition=metadata.partition, offset=metadata.offset)
                return metadata
        except (KafkaError, OSError) as exc:
            raise kafka_error(f"publishing to {topic}", self._bootstrap, exc) from exc

    def sign(
        self,
        target: Target,
        action: str,
        params: Mapping[str, ParamValue] | None = None,
        *,
        ttl_s: float = 60.0,
        priority: int = 0,
        correlation_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> SignedCommand:
        """Build and sign a command without publishing it."""
        command = Command.create(
            issuer=self.principal_id,
            target=target,
            action=action,
            params=params,
            ttl_s=ttl_s,
            priority=priority,
            correlation_id=correlation_id,
            idempotency_key=idempotency_key,
        )
        return SignedCommand.sign(command, self.signer)

    def send(
        self,
        target: Target,
        action: str,
        params: Mapping[str, ParamValue] | None = None,
        *,
        ttl_s: float = 60.0,
        priority: int = 0,
        correlation_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> CommandHandle:
        """Sign and publish a command to ``commands.requested`` (key: command id).

        Returns once the broker has the record on all in-sync replicas. Raises
        ``KafkaUnavailableError`` when Kafka does not answer within ``timeout_s``.
        """
        signed = self.sign(
            target,
            action,
            params,
            ttl_s=ttl_s,
            priority=priority,
            correlation_id=correlation_id,
            idempotency_key=idempotency_key,
        )
        return self.publish(signed)

    def publish(self, signed: SignedCommand) -> CommandHandle:
        """Publish an already signed command (for example one signed elsewhere)."""
        metadata = self._publish(
            self.settings.topics.commands_requested, signed.command.id, signed.encode()
        )
        timestamp = metadata.timestamp if metadata.timestamp and metadata.timestamp > 0 else None
        return CommandHandle(
            signed=signed,
            settings=self.settings,
            published_at_ms=timestamp or round(time.time() * 1000),
            partition=metadata.partition,
            offset=metadata.offset,
        )

    def approve(
        self, command: SignedCommand, decision: Decision | str = Decision.APPROVE
    ) -> SignedApproval:
        """Sign and publish this principal's decision about exactly ``command`` (its id and
        digest: no other command under that id can use it) to ``commands.approvals`` (key:
        command id). ``handle.signed`` is the command of a ``CommandHandle``."""
        approval = Approval.for_command(
            command, approver=self.principal_id, decision=decision, issued_at=time.time()
        )
        signed = SignedApproval.sign(approval, self.signer)
        self._publish(self.settings.topics.commands_approvals, approval.command_id, signed.encode())
        return signed


#: Overall state of a command from its vehicles' states: the first of these any vehicle is in
#: (so ``succeeded`` only when every target succeeded).
_OVERALL_ORDER: Final = (
    CommandState.REJECTED,
    CommandState.FAILED,
    CommandState.EXPIRED,
    CommandState.REQUESTED,
    CommandState.PENDING,
    CommandState.AUTHORIZED,
    CommandState.SEALED,
    CommandState.DELIVERED,
    CommandState.SUCCEEDED,
)


@dataclass(frozen=True)
class CommandOutcome:
    """What ``CommandHandle.wait`` saw: each target vehicle's status event, and an overall view.

    ``vehicles``: vehicle id → the first event of that vehicle whose state was wanted. Empty
    when the command was settled before the bus named any vehicle (for example a group command
    rejected by policy): then ``event`` is that command-level event. ``state``, ``reason``,
    ``detail`` and ``vehicle_id`` are those of ``event``, the deciding event: the vehicle in the
    first of rejected, failed, expired, ..., succeeded — so a group command ``succeeded`` only
    when every vehicle did.
    """

    command_id: str
    vehicles: Mapping[str, StatusEvent]
    event: StatusEvent

    @property
    def state(self) -> CommandState:
        return self.event.state

    @property
    def reason(self) -> ReasonCode | None:
        return self.event.reason

    @property
    def detail(self) -> str:
        return self.event.detail

    @property
    def vehicle_id(self) -> str | None:
        return self.event.vehicle_id

    @property
    def final(self) -> bool:
        return all(e.final for e in self.vehicles.values()) and self.event.final

    @classmethod
    def of(
        cls, command_id: str, vehicles: Mapping[str, StatusEvent], command_event: StatusEvent | None
    ) -> CommandOutcome:
        events = list(vehicles.values()) or ([command_event] if command_event else [])
        if not events:
            raise ValueError("an outcome needs at least one event")
        deciding = min(events, key=lambda e: _OVERALL_ORDER.index(e.state))
        return cls(command_id, dict(sorted(vehicles.items())), deciding)


@dataclass
class CommandHandle:
    """A published command: its id, and a way to wait for its status events."""

    signed: SignedCommand
    settings: FleetbusSettings
    published_at_ms: int
    partition: int
    offset: int
    events: list[StatusEvent] = field(default_factory=list)

    @property
    def command(self) -> Command:
        return self.signed.command

    @property
    def command_id(self) -> str:
        return self.signed.command.id

    def wait(
        self,
        timeout_s: float,
        *,
        until: Iterable[CommandState | str] = DEFAULT_UNTIL,
        ignore_replays: bool = True,
        on_event: Callable[[StatusEvent], None] | None = None,
    ) -> CommandOutcome:
        """Wait until every target vehicle of this command has a status event whose state is in
        ``until``; return each vehicle's event and the overall state (``CommandOutcome``).

        The targets are the command's vehicle, or for a group command the vehicles the bus's
        seal-stage partitions name (a ``sealed`` or ``rejected`` event each, in separate
        transactions); the group's ``authorized`` event announces how many
        (``group_targets``), so the wait settles only once that many are named (a group
        authorized by a bus of an earlier release: one ``authorized`` event per vehicle, all in
        one transaction, known once the reader has caught up). An event without a vehicle id
        (rejected before the bus named any vehicle, pending approval) settles every target, or
        the command itself when no target is known yet.

        A re-submission of the same signed command is rejected as ``replayed`` under the same
        command id; that says nothing about the original's fate, so such events are skipped
        unless ``ignore_replays`` is False (to watch the re-submission itself).

        Reads only the command's partition of ``commands.status`` (the topic is keyed by command
        id), committed records only, without a consumer group, from shortly before the publish
        time. Every event seen is appended to ``events`` and passed to ``on_event`` (progress
        for a waiting user: ``pending`` means the command waits for an approval). Raises
        ``StatusTimeoutError`` after ``timeout_s`` (naming the last state seen) and
        ``KafkaUnavailableError`` when Kafka does not answer.
        """
        wanted = {str(CommandState(s)) for s in until}
        single = self.command.target.vehicle
        targets: set[str] = {single} if single is not None else set()
        reached: dict[str, StatusEvent] = {}
        command_event: StatusEvent | None = None
        announced: int | None = None  # how many vehicles a group's authorized event names
        with StatusReader(
            self.settings,
            self.command_id,
            since_ms=self.published_at_ms - STATUS_LOOKBACK_MS,
            timeout_s=timeout_s,
        ) as reader:
            while reader.time_left():
                for event in reader.poll():
                    self.events.append(event)
                    if on_event is not None:
                        on_event(event)
                    if ignore_replays and event.reason == ReasonCode.REPLAYED:
                        continue
                    vid = event.vehicle_id
                    if vid is None and event.state is CommandState.AUTHORIZED and single is None:
                        announced = group_targets(event.detail)
                    if vid is None:
                        if str(event.state) in wanted:
                            command_event = command_event or event
                            for target in targets:
                                reached.setdefault(target, event)
                        continue
                    if single is not None and vid != single:
                        continue  # the bus names only the target; anything else is not ours
                    targets.add(vid)
                    if str(event.state) in wanted:
                        reached.setdefault(vid, event)
                settled = targets <= set(reached) and (bool(targets) or command_event is not None)
                if announced is not None and command_event is None:
                    settled = settled and len(targets) >= announced
                # A group's authorized events are one transaction: once the reader has caught
                # up, every target of the command is known.
                if settled and (single is not None or reader.caught_up()):
                    return CommandOutcome.of(self.command_id, reached, command_event)
        last = f"last state seen: {self.events[-1].state}" if self.events else "no status seen"
        raise StatusTimeoutError(
            f"no status in {sorted(wanted)} for every vehicle of command {self.command_id} "
            f"within {timeout_s} s (reached: {sorted(reached) or 'none'}; {last})"
        )

"""The dispatch SDK: sign commands and approvals, publish them, and wait for their outcome.

``CommandPublisher`` is a dispatch system's first touch::

    publisher = CommandPublisher(settings, principal_id="dispatch-1",
                                 private_key_file="keys/dispatch-1.key")
    handle = publisher.send(Target(vehicle="V-0017"), "unlock_doors", {"door": "driver"})
    event = handle.wait(30)

Commands go to ``commands.requested`` keyed by command id; approvals to ``commands.approvals``;
outcomes are read from ``commands.status``. See ``docs/sdk.md``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
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
)
from fleetbus.bus.directory import load_key_file
from fleetbus.bus.errors import ConfigError, FleetbusError, KafkaUnavailableError, ReasonCode
from fleetbus.bus.keys import Signer
from fleetbus.bus.settings import FleetbusSettings

__all__ = ["CommandHandle", "CommandPublisher", "StatusTimeoutError", "read_status_events"]

_log = logging.getLogger(__name__)

#: Status events may be stamped by another host whose clock runs a little behind ours.
STATUS_LOOKBACK_MS: Final = 30_000
DEFAULT_UNTIL: Final = frozenset(str(s) for s in FINAL_STATES)


class StatusTimeoutError(FleetbusError, TimeoutError):
    """No status event in the wanted states arrived before the wait timed out.

    The command may still complete later; its status stays readable on ``commands.status``.
    """

    reason = ReasonCode.EXPIRED


def _kafka_error(action: str, bootstrap: str, exc: BaseException) -> KafkaUnavailableError:
    return KafkaUnavailableError(
        f"{action}: Kafka at {bootstrap} did not answer ({type(exc).__name__}: {exc})"
    )


class CommandPublisher:
    """Signs commands (and approvals) as ``principal_id`` and publishes them.

    Give either ``private_key_file`` (a ``fleetbus keys`` ``<principal>.key`` file, mode 0600)
    or an already loaded ``signer``. The Kafka producer is idempotent with ``acks=all``: a
    retried send never duplicates a record and a confirmed send is on every in-sync replica.
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
        from kafka import KafkaProducer
        from kafka.errors import KafkaError

        try:
            self._producer = KafkaProducer(
                bootstrap_servers=self._bootstrap,
                client_id=self.client_id,
                acks="all",
                enable_idempotence=True,
                # kafka-python waits bootstrap_timeout_ms (30 s) for the first metadata answer
                # unless told otherwise: the constructor too must give up within timeout_s.
                bootstrap_timeout_ms=int(timeout_s * 1000),
                max_block_ms=int(timeout_s * 1000),
                request_timeout_ms=int(timeout_s * 1000),
                linger_ms=5,
                **settings.kafka_client_config(),
            )
        except (KafkaError, OSError) as exc:
            raise _kafka_error("connecting the command producer", self._bootstrap, exc) from exc

    # -- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        self._producer.close(timeout=self.timeout_s)

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
                future = self._producer.send(topic, key=key.encode(), value=value, headers=headers)
                metadata = future.get(timeout=self.timeout_s)
                record_delivery(span, partition=metadata.partition, offset=metadata.offset)
                return metadata
        except (KafkaError, OSError) as exc:
            raise _kafka_error(f"publishing to {topic}", self._bootstrap, exc) from exc

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
        self, command_id: str, decision: Decision | str = Decision.APPROVE
    ) -> SignedApproval:
        """Sign and publish this principal's decision about ``command_id`` to
        ``commands.approvals`` (key: command id). The approval is valid for that id only."""
        approval = Approval(
            command_id=command_id,
            approver=self.principal_id,
            decision=Decision(decision),
            issued_at=time.time(),
        )
        signed = SignedApproval.sign(approval, self.signer)
        self._publish(self.settings.topics.commands_approvals, command_id, signed.encode())
        return signed


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
    ) -> StatusEvent:
        """The first status event of this command whose state is in ``until``.

        A re-submission of the same signed command is rejected as ``replayed`` under the same
        command id; that says nothing about the original's fate, so such events are skipped
        unless ``ignore_replays`` is False (to watch the re-submission itself).

        Reads ``commands.status`` without a consumer group, from shortly before the publish
        time. Every event seen is appended to ``events`` and passed to ``on_event`` (progress
        for a waiting user: ``pending`` means the command waits for an approval). Raises
        ``StatusTimeoutError`` after ``timeout_s`` (naming the last state seen) and
        ``KafkaUnavailableError`` when Kafka does not answer.
        """
        wanted = {str(CommandState(s)) for s in until}
        for event in read_status_events(
            self.settings,
            self.command_id,
            since_ms=self.published_at_ms - STATUS_LOOKBACK_MS,
            timeout_s=timeout_s,
        ):
            self.events.append(event)
            if on_event is not None:
                on_event(event)
            if ignore_replays and event.reason == ReasonCode.REPLAYED:
                continue
            if str(event.state) in wanted:
                return event
        last = f"; last state seen: {self.events[-1].state}" if self.events else "; no status seen"
        raise StatusTimeoutError(
            f"no status in {sorted(wanted)} for command {self.command_id} within {timeout_s} s"
            + last
        )


def read_status_events(
    settings: FleetbusSettings,
    command_id: str,
    *,
    since_ms: int,
    timeout_s: float,
) -> Iterator[StatusEvent]:
    """Yield the status events of ``command_id`` stamped at or after ``since_ms``, until
    ``timeout_s`` has passed (a generator; closing it closes the consumer)."""
    from kafka import KafkaConsumer, TopicPartition
    from kafka.errors import KafkaError

    topic = settings.topics.full(settings.topics.commands_status)
    bootstrap = settings.kafka_bootstrap
    deadline = time.monotonic() + timeout_s
    try:
        consumer = KafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=None,
            enable_auto_commit=False,
            client_id="fleetbus-dispatch-status",
            bootstrap_timeout_ms=max(int(timeout_s * 1000), 1),
            request_timeout_ms=max(int(timeout_s * 1000), 5000) + 1000,
            **settings.kafka_client_config(),
        )
    except (KafkaError, OSError) as exc:
        raise _kafka_error("reading command status", bootstrap, exc) from exc
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            # The broker answers the same for a topic that is missing and for one this
            # principal may not describe (ACLs): say both.
            raise ConfigError(
                f"topic {topic} does not exist or this principal is not authorized to read it "
                "(create the pipeline topics; a dispatcher that waits needs READ and DESCRIBE "
                "on it, see docs/reliability.md)"
            )
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        # End offsets first: a record appended after this call is at or beyond them, so a
        # partition without records since ``since_ms`` can safely start there.
        ends = consumer.end_offsets(tps)
        starts = consumer.offsets_for_times({tp: max(since_ms, 0) for tp in tps})
        for tp in tps:
            found = starts.get(tp)
            consumer.seek(tp, found.offset if found is not None else ends[tp])
        key = command_id.encode()
        while (left := deadline - time.monotonic()) > 0:
            batches = consumer.poll(timeout_ms=max(1, min(int(left * 1000), 500)))
            for records in batches.values():
                for record in records:
                    if record.key != key or record.value is None:
                        continue
                    try:
                        event = StatusEvent.decode(record.value)
                    except FleetbusError as exc:
                        _log.warning("skipping unreadable status record: %s", exc.reason.value)
                        continue
                    if event.command_id == command_id:
                        yield event
    except KafkaError as exc:
        raise _kafka_error("reading command status", bootstrap, exc) from exc
    finally:
        consumer.close()

"""The execute-once part of the vehicle agent: the commands of a poll batch are claimed in one
durable write, their handlers run, their responses are recorded in one durable write, then
answered (``ExecutionPart._run_executions``)."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from fleetbus.bus.commands import Command, Response
from fleetbus.observability.tracing import get_tracer, stage_span
from fleetbus.sdk.agentcore import (
    RETRY_BACKOFF_S,
    STORE_GRACE_S,
    AgentCore,
    Execution,
    RetryLater,
    ServedVehicle,
    attached,
)
from fleetbus.sdk.handlers import HandlerResult, call_handler

__all__ = ["ExecutionPart"]

_log = logging.getLogger("fleetbus.sdk.vehicle")


class ExecutionPart(AgentCore):
    """Executing each command at most once (a part of ``VehicleAgent``)."""

    def _pending(
        self, vehicle: ServedVehicle, command_id: str, command: Command | None, expires_at: float
    ) -> Execution:
        from opentelemetry import context

        return Execution(
            vehicle, command_id, command, expires_at, self._position, context.get_current()
        )

    def _execute(self, vehicle: ServedVehicle, command: Command, expires_at: float) -> list[Any]:
        """Execute an authentic, checked command at most once and answer it. Inside a poll the
        command joins the batch's executions (``_run_executions``), run after the batch is read."""
        item = self._pending(vehicle, command.id, command, expires_at)
        if self._batch is not None:
            self._batch.append(item)
            return []
        return self._run_executions([item], {})

    def _run_executions(self, items: Sequence[Execution], done: dict[Any, int]) -> list[Any]:
        """Execute the commands of one poll batch and answer them; the futures of the answers.

        At most once, with two durable writes per batch instead of two per command:

        1. claim: every new command of the batch is recorded ``started`` in one transaction,
           fsync'ed before any of their handlers runs. After a crash from here on, none of them
           runs again (a redelivery is answered 500 "interrupted"), including those whose
           handler had not started yet: the price of one fsync per batch.
        2. the handlers run, in record order.
        3. finish: every response is recorded in one transaction, fsync'ed before any answer is
           produced and so before any offset is committed: a redelivery after a crash, or a
           copy in the same batch, is answered with the same response.

        An answer that cannot be produced (``RetryLater``) or a store that fails moves the
        partition back to that record (``done`` and a seek): it comes again and is answered
        from the store, never executed again.
        """
        if not items:
            return []
        try:
            self._claim_and_execute(items)
        except sqlite3.Error as exc:
            _log.error("executed-command store failed (%s); redelivering", type(exc).__name__)
            self.stats.errors += 1
            self._redeliver(items, done)
            if items[0].position is None:
                raise RetryLater(f"executed-command store: {type(exc).__name__}") from exc
            return []
        futures: list[Any] = []
        failed: list[Execution] = []
        failed_partitions: set[Any] = set()
        for item in items:
            tp, offset = item.position if item.position is not None else (None, -1)
            if tp is not None and tp in failed_partitions:
                continue  # comes again after the seek and is answered from the store then
            with attached(item.context):
                try:
                    if item.command is None:
                        futures += self._republish(item.vehicle, item.command_id)
                    else:
                        assert item.response is not None
                        futures += self._publish_response(item.vehicle, item.response)
                except RetryLater as exc:
                    if tp is None:
                        raise
                    _log.warning("will retry %s[%d]@%d: %s", tp.topic, tp.partition, offset, exc)
                    self.stats.errors += 1
                    failed.append(item)
                    failed_partitions.add(tp)
        self._redeliver(failed, done)
        return futures

    def _claim_and_execute(self, items: Sequence[Execution]) -> None:
        """Steps 1-3 of ``_run_executions``: set ``response`` of every item with a command,
        or turn it into a repeat (``command`` None) when it was executed before."""
        claims: list[Execution] = []
        finished: list[tuple[str, str, bytes]] = []
        seen: set[tuple[str, str]] = set()
        for item in items:
            command = item.command
            if command is None:
                continue
            vid = item.vehicle.identity.vehicle_id
            if (vid, command.id) in seen:
                # A second copy in the same batch: answered from the store like any redelivery.
                self.stats.duplicates += 1
                item.command = None
                continue
            seen.add((vid, command.id))
            found = self.store.lookup(vid, command.id)
            if found is None:
                claims.append(item)
                continue
            self.stats.duplicates += 1
            _state, stored = found
            if stored is not None:
                item.response = Response.decode(stored)
                continue
            # Started but never finished: the process died after the claim. Never run it twice.
            item.response = self._response(
                vid, command, 500, "execution was interrupted; not repeated"
            )
            finished.append((vid, command.id, item.response.encode()))
        started = self.store.begin_many(
            [
                (
                    item.vehicle.identity.vehicle_id,
                    item.command_id,
                    max(item.expires_at, item.command.expires_at) + self._skew_s + STORE_GRACE_S,
                )
                for item in claims
                if item.command is not None
            ]
        )
        for item in claims:
            command = item.command
            assert command is not None
            vid = item.vehicle.identity.vehicle_id
            if (vid, command.id) not in started:
                # Started meanwhile by another agent on the same store: answer what it answers.
                self.stats.duplicates += 1
                item.command = None
                continue
            with attached(item.context):
                item.response = self._run_handler(vid, command)
            finished.append((vid, command.id, item.response.encode()))
        self.store.finish_many(finished)

    def _redeliver(self, items: Sequence[Execution], done: dict[Any, int]) -> None:
        """Seek each partition of ``items`` back to its first record among them."""
        first: dict[Any, int] = {}
        for item in items:
            if item.position is not None:
                tp, offset = item.position
                first[tp] = min(first.get(tp, offset), offset)
        for tp, offset in first.items():
            self.transport.seek(tp, offset)
            done[tp] = min(done.get(tp, offset), offset)
            self._retry_at = time.monotonic() + RETRY_BACKOFF_S

    def _run_handler(self, vid: str, command: Command) -> Response:
        handler = self.handlers.get(command.action)
        if handler is None:
            response = self._response(vid, command, 404, f"no handler for {command.action!r}")
        else:
            with stage_span(get_tracer(), "execute", **{"fleetbus.action": command.action}) as span:
                try:
                    result = call_handler(handler, vid, command) or HandlerResult()
                    response = self._response(vid, command, result.status, result.detail)
                except Exception as exc:
                    _log.exception("handler for %s failed on %s", command.action, vid)
                    response = self._response(
                        vid, command, 500, f"handler raised {type(exc).__name__}"
                    )
                span.set_attribute("fleetbus.response.status", response.status)
            self.stats.executed += 1
        return response

    def _response(self, vid: str, command: Command, status: int, detail: str) -> Response:
        if not 100 <= status <= 599:
            status, detail = 500, f"handler returned an invalid status {status}"
        return Response(
            command_id=command.id,
            correlation_id=command.correlation_id,
            vehicle_id=vid,
            status=status,
            detail=detail[:1024],
            executed_at=self._clock(),
        )

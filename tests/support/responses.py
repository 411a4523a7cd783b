"""The response stage feeding the track stage, as the worker runs them, for unit tests that
follow a vehicle's answer from ``commands.responses`` to its command's status."""

from __future__ import annotations

from typing import Any

from fleetbus.processors.engine import InputRecord, PartitionState, StageResult
from fleetbus.processors.stages import PipelineTopics, ResponseStage, TrackStage
from fleetbus.processors.uplink import UplinkLimits


class ResponsePath:
    """A record on ``commands.responses`` goes through ``ResponseStage`` (on its own state of the
    record's partition, committed after each record), each verified response it forwards through
    ``TrackStage`` on the caller's state; records of the track's other topics go to the track
    stage alone. The result is both stages' outputs and audit, the outcome the last stage's."""

    name = "track"

    def __init__(
        self,
        *,
        topics: PipelineTopics,
        opener: Any,
        clock_skew_s: float,
        max_message_bytes: int,
        limits: UplinkLimits | None = None,
        sealer_principal: str | None = None,
        v2_openers: tuple[Any, Any] | None = None,
        retention_s: float = 300.0,
    ) -> None:
        self.topics = topics
        self.responses = ResponseStage(
            topics=topics,
            opener=opener,
            clock_skew_s=clock_skew_s,
            max_message_bytes=max_message_bytes,
            limits=limits,
            sealer_principal=sealer_principal,
            v2_openers=v2_openers,
        )
        self.track = TrackStage(
            topics=topics,
            clock_skew_s=clock_skew_s,
            max_message_bytes=max_message_bytes,
            retention_s=retention_s,
            limits=limits,
        )
        self.response_states: dict[int, PartitionState] = {}

    def response_state(self, partition: int = 0) -> PartitionState:
        """The response stage's state of ``partition``."""
        return self.response_states.setdefault(partition, PartitionState())

    def process(self, record: InputRecord, state: PartitionState, now: float) -> StageResult:
        if record.topic != self.topics.responses:
            return self.track.process(record, state, now)
        response_state = self.response_state(record.partition)
        first = self.responses.process(record, response_state, now)
        response_state.commit()
        verified = [o for o in first.outputs if o.topic == self.topics.responses_verified]
        result = StageResult(
            outputs=[o for o in first.outputs if o.topic != self.topics.responses_verified],
            audit=list(first.audit),
            outcome=first.outcome,
        )
        for out in verified:
            forwarded = InputRecord(out.topic, record.partition, record.offset, out.key, out.value)
            then = self.track.process(forwarded, state, now)
            result.extend(then)
            result.outcome = then.outcome
        return result

    def tick(self, partition: int, state: PartitionState, now: float) -> StageResult:
        response_state = self.response_state(partition)
        result = self.responses.tick(partition, response_state, now)
        response_state.commit()
        result.extend(self.track.tick(partition, state, now))
        return result

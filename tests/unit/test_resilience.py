"""The resilience layers around one key provider, each on its own (ProfileSealer composes them)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from fleetbus.bus.errors import ReasonCode
from fleetbus.bus.keys import (
    Encapsulation,
    KeyProvider,
    KeyProviderError,
    PrivateKeySet,
    RecipientKeys,
)
from fleetbus.providers.resilience import (
    BreakerState,
    CircuitBreaker,
    InstrumentedProvider,
    ProviderUnavailable,
    ResilientProvider,
)

RECIPIENT = RecipientKeys("v", {}, {}, qkd_sae_id="SAE_V")


class Flaky(KeyProvider):
    name = "flaky"

    def __init__(self, *, fail: BaseException | None = None, gate: threading.Event | None = None):
        self.fail = fail
        self.gate = gate
        self.calls = 0
        self.threads: list[str] = []

    def establish(self, recipient: RecipientKeys, *, context: bytes) -> Encapsulation:
        self.calls += 1
        self.threads.append(threading.current_thread().name)
        if self.gate is not None:
            self.gate.wait(timeout=5)
        if self.fail is not None:
            raise self.fail
        return Encapsulation(self.name, "kid", b"ref", b"s" * 32)

    def recover(self, key_ref: bytes, key_id: str, own: PrivateKeySet, *, context: bytes) -> bytes:
        return b"s" * 32


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    event = threading.Event()
    yield event
    event.set()


def _layers(
    inner: KeyProvider, breaker: CircuitBreaker, timeout_s: float | None = 1.0
) -> InstrumentedProvider:
    return InstrumentedProvider(ResilientProvider(inner, breaker, timeout_s=timeout_s))


def test_wrappers_keep_name_algorithm_and_blocking() -> None:
    inner = Flaky()
    inner.algorithm = "x25519"
    inner.may_block = False
    layered = _layers(inner, CircuitBreaker())
    assert (layered.name, layered.algorithm, layered.may_block) == ("flaky", "x25519", False)
    assert layered.recover(b"", "", PrivateKeySet("v", {}), context=b"") == b"s" * 32


def test_resilient_layer_opens_the_breaker_and_stops_calling() -> None:
    inner = Flaky(fail=KeyProviderError("down", reason=ReasonCode.QKD_UNAVAILABLE))
    breaker = CircuitBreaker(failure_threshold=2, clock=lambda: 0.0)
    layered = _layers(inner, breaker)
    for _ in range(2):
        with pytest.raises(ProviderUnavailable) as info:
            layered.establish(RECIPIENT, context=b"c")
        assert info.value.failover_reason == "qkd_unavailable"
    assert breaker.state is BreakerState.OPEN
    with pytest.raises(ProviderUnavailable) as info:
        layered.establish(RECIPIENT, context=b"c")
    assert info.value.failover_reason == "circuit_open"
    assert inner.calls == 2


def test_resilient_layer_times_out_a_blocking_provider(gate: threading.Event) -> None:
    breaker = CircuitBreaker(failure_threshold=1)
    layered = _layers(Flaky(gate=gate), breaker, timeout_s=0.05)
    with pytest.raises(ProviderUnavailable) as info:
        layered.establish(RECIPIENT, context=b"c")
    assert info.value.failover_reason == "timeout"
    assert breaker.state is BreakerState.OPEN


def test_a_pure_computation_runs_inline_and_a_blocking_one_in_a_thread() -> None:
    inline, threaded = Flaky(), Flaky()
    inline.may_block = False
    for provider in (inline, threaded):
        _layers(provider, CircuitBreaker()).establish(RECIPIENT, context=b"c")
    assert inline.threads == [threading.current_thread().name]
    assert threaded.threads == ["fleetbus-key-provider"]


def test_instrumented_layer_turns_a_provider_bug_into_a_bounded_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    breaker = CircuitBreaker()
    with pytest.raises(ProviderUnavailable) as info:
        _layers(Flaky(fail=RuntimeError("secret detail")), breaker).establish(
            RECIPIENT, context=b"c"
        )
    assert info.value.failover_reason == "key_provider_failed"
    assert "RuntimeError" in caplog.text
    assert "secret detail" not in caplog.text
    assert breaker._failures == 1  # counted by the resilient layer underneath

"""Key-path execution: failover order and events, circuit breakers, retries, timeouts, downgrade."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator

import pytest

from fleetbus.bus.errors import ConfigError, ReasonCode
from fleetbus.bus.keys import (
    Encapsulation,
    KeyPath,
    KeyProvider,
    KeyProviderError,
    PrivateKeySet,
    RecipientKeys,
    SecurityProfile,
)
from fleetbus.bus.settings import FleetbusSettings, ProfileRule, ProfileSettings
from fleetbus.processors.stages.common import PipelineTopics
from fleetbus.processors.stages.seal import ProfileChoice, SealStage, profile_from_settings
from fleetbus.providers.hpke import X25519Provider, XWingProvider
from fleetbus.providers.keypath import (
    BreakerState,
    CircuitBreaker,
    FailoverEvent,
    KeyPathRunner,
    ProfileSealer,
    is_at_least,
    path_strength,
    profiles_unable_to_seal,
)

QKD_XWING = KeyPath.parse("qkd-etsi014+xwing")
XWING = KeyPath.parse("xwing")
X25519 = KeyPath.parse("x25519")


class FakeProvider(KeyProvider):
    """Deterministic provider: secret = SHA-256(name || context); can fail, hang or raise."""

    def __init__(
        self,
        name: str,
        algorithm: str | None,
        *,
        fail: ReasonCode | None = None,
        gate: threading.Event | None = None,
        crash: bool = False,
    ) -> None:
        self.name = name
        self.algorithm = algorithm
        self.fail = fail
        self.gate = gate
        self.crash = crash
        self.calls = 0

    def _secret(self, context: bytes) -> bytes:
        return hashlib.sha256(self.name.encode() + context).digest()

    def establish(self, recipient: RecipientKeys, *, context: bytes) -> Encapsulation:
        self.calls += 1
        if self.gate is not None:
            self.gate.wait(timeout=5)
        if self.crash:
            raise RuntimeError("provider bug")
        if self.fail is not None:
            raise KeyProviderError(f"{self.name} down", reason=self.fail)
        return Encapsulation(
            self.name, "kid-" + self.name, b"ref-" + self.name.encode(), self._secret(context)
        )

    def recover(self, key_ref: bytes, key_id: str, own: PrivateKeySet, *, context: bytes) -> bytes:
        return self._secret(context)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    def __init__(self) -> None:
        self.events: list[FailoverEvent] = []
        self.sleeps: list[float] = []

    def __call__(self, event: FailoverEvent) -> None:
        self.events.append(event)

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)


RECIPIENT = RecipientKeys(
    principal_id="vehicle-1",
    public_keys={"xwing": b"pk", "x25519": b"pk"},
    key_ids={"xwing": "kid-x", "x25519": "kid-c"},
    qkd_sae_id="SAE_VEHICLE_1",
)


def providers(**overrides: FakeProvider) -> dict[str, FakeProvider]:
    base = {
        "qkd-etsi014": FakeProvider("qkd-etsi014", None),
        "xwing": FakeProvider("xwing", "xwing"),
        "x25519": FakeProvider("x25519", "x25519"),
    }
    base.update({name.replace("_", "-"): p for name, p in overrides.items()})
    return base


def profile(*paths: KeyPath, fallback: bool = True, name: str = "standard") -> SecurityProfile:
    return SecurityProfile(
        name=name,
        key_paths=list(paths),
        signature_suite="composite-mldsa65-ed25519",
        allow_fallback=fallback,
        minimum_path=paths[-1],
    )


def sealer(
    provs: dict[str, FakeProvider], recorder: Recorder, clock: FakeClock | None = None, **kw: object
) -> ProfileSealer:
    return ProfileSealer(
        KeyPathRunner(provs),
        listeners=[recorder],
        sleep=recorder.sleep,
        clock=clock or FakeClock(),
        wall_clock=lambda: 42.0,
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    event = threading.Event()
    yield event
    event.set()  # release any hung fake provider thread


# -- runner -----------------------------------------------------------------------------------


def test_runner_round_trip_and_ref_checks() -> None:
    runner = KeyPathRunner(providers())
    encs, key = runner.establish(QKD_XWING, RECIPIENT, b"ctx")
    assert [e.provider for e in encs] == ["qkd-etsi014", "xwing"]
    refs = [(e.provider, e.key_id, e.key_ref) for e in encs]
    own = PrivateKeySet("vehicle-1", {})
    assert runner.recover(QKD_XWING, refs, own, b"ctx") == key
    assert runner.recover(QKD_XWING, refs, own, b"other") != key
    with pytest.raises(KeyProviderError) as info:
        runner.recover(QKD_XWING, list(reversed(refs)), own, b"ctx")
    assert info.value.reason is ReasonCode.MALFORMED
    with pytest.raises(KeyProviderError):
        runner.recover(XWING, refs, own, b"ctx")  # stripped a source: refused, not ignored
    with pytest.raises(ConfigError):
        runner.establish(KeyPath.parse("nope"), RECIPIENT, b"ctx")


def test_runner_with_real_hpke_providers() -> None:
    xwing, classic = XWingProvider(), X25519Provider()
    (xs, xp), (cs, cp) = xwing.generate_keypair(), classic.generate_keypair()
    recipient = RecipientKeys("v", {"xwing": xp, "x25519": cp}, {"xwing": "a", "x25519": "b"})
    own = PrivateKeySet("v", {"xwing": xs, "x25519": cs}, {"xwing": "a", "x25519": "b"})
    runner = KeyPathRunner({"xwing": xwing, "x25519": classic})
    path = KeyPath.parse("xwing+x25519")
    encs, key = runner.establish(path, recipient, b"hdr")
    refs = [(e.provider, e.key_id, e.key_ref) for e in encs]
    assert runner.recover(path, refs, own, b"hdr") == key


# -- failover ---------------------------------------------------------------------------------


def test_failover_in_order_with_events() -> None:
    provs = providers(
        qkd_etsi014=FakeProvider("qkd-etsi014", None, fail=ReasonCode.QKD_UNAVAILABLE)
    )
    rec = Recorder()
    result = sealer(provs, rec).establish(profile(QKD_XWING, XWING, X25519), RECIPIENT, b"c")
    assert result.path == XWING
    assert [e.provider for e in result.encapsulations] == ["xwing"]
    assert rec.events == [FailoverEvent("standard", QKD_XWING, XWING, "qkd_unavailable", 42.0)]
    assert provs["x25519"].calls == 0
    assert result.key.hex() not in repr(result)


def test_all_paths_fail_is_exhausted() -> None:
    down = ReasonCode.KEY_PROVIDER_FAILED
    provs = providers(
        qkd_etsi014=FakeProvider("qkd-etsi014", None, fail=ReasonCode.QKD_UNAVAILABLE),
        xwing=FakeProvider("xwing", "xwing", fail=down),
    )
    rec = Recorder()
    with pytest.raises(KeyProviderError) as info:
        sealer(provs, rec).establish(profile(QKD_XWING, XWING), RECIPIENT, b"c")
    assert info.value.reason is ReasonCode.KEY_PATH_EXHAUSTED
    assert "'standard'" in str(info.value)
    assert "key_provider_failed" in str(info.value)
    assert [(e.from_path, e.to_path, e.reason) for e in rec.events] == [
        (QKD_XWING, XWING, "qkd_unavailable"),
        (XWING, None, "key_provider_failed"),
    ]


def test_provider_crash_counts_as_failure() -> None:
    provs = providers(xwing=FakeProvider("xwing", "xwing", crash=True))
    rec = Recorder()
    result = sealer(provs, rec).establish(profile(XWING, X25519), RECIPIENT, b"c")
    assert result.path == X25519
    assert rec.events[0].reason == "key_provider_failed"


def test_listener_errors_do_not_break_sealing() -> None:
    provs = providers(
        qkd_etsi014=FakeProvider("qkd-etsi014", None, fail=ReasonCode.QKD_UNAVAILABLE)
    )

    def broken(event: FailoverEvent) -> None:
        raise RuntimeError("metrics backend down")

    rec = Recorder()
    s = sealer(provs, rec)
    s.add_listener(broken)
    assert s.establish(profile(QKD_XWING, XWING), RECIPIENT, b"c").path == XWING


# -- recipient capability ---------------------------------------------------------------------


def test_recipient_incapable_paths_are_skipped() -> None:
    provs = providers()
    rec = Recorder()
    no_qkd = RecipientKeys("legacy-1", {"x25519": b"pk"}, {"x25519": "k"})
    result = sealer(provs, rec).establish(profile(QKD_XWING, XWING, X25519), no_qkd, b"c")
    assert result.path == X25519
    assert [(e.from_path, e.reason) for e in rec.events] == [
        (QKD_XWING, "recipient_incapable"),
        (XWING, "recipient_incapable"),
    ]
    assert provs["qkd-etsi014"].calls == 0
    assert provs["xwing"].calls == 0


def test_no_fallback_does_not_retry_an_incapable_recipient() -> None:
    rec = Recorder()
    no_qkd = RecipientKeys("v", {"xwing": b"pk"}, {"xwing": "k"})
    with pytest.raises(KeyProviderError) as info:
        sealer(providers(), rec, retries=3).establish(
            profile(QKD_XWING, fallback=False, name="enclave"), no_qkd, b"c"
        )
    assert info.value.reason is ReasonCode.KEY_PATH_EXHAUSTED
    assert "recipient_incapable" in str(info.value)
    assert rec.sleeps == []


# -- circuit breaker --------------------------------------------------------------------------


def _state(breaker: CircuitBreaker) -> BreakerState:
    return breaker.state  # a call, so mypy does not keep the narrowing across clock changes


def test_circuit_breaker_states() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=2, reset_timeout_s=10, clock=clock)
    assert _state(breaker) is BreakerState.CLOSED
    breaker.record_failure()
    assert _state(breaker) is BreakerState.CLOSED
    assert breaker.allow()
    breaker.record_failure()
    assert _state(breaker) is BreakerState.OPEN
    assert not breaker.allow()
    clock.now += 9.9
    assert _state(breaker) is BreakerState.OPEN
    clock.now += 0.1
    assert _state(breaker) is BreakerState.HALF_OPEN
    assert breaker.allow()
    breaker.record_failure()  # failed trial: open again, for a full timeout
    assert _state(breaker) is BreakerState.OPEN
    clock.now += 10
    assert _state(breaker) is BreakerState.HALF_OPEN
    breaker.record_success()
    assert _state(breaker) is BreakerState.CLOSED
    breaker.record_failure()
    assert _state(breaker) is BreakerState.CLOSED  # the failure count was reset


def test_sealer_skips_open_circuit_then_half_opens() -> None:
    qkd = FakeProvider("qkd-etsi014", None, fail=ReasonCode.QKD_UNAVAILABLE)
    provs = providers(qkd_etsi014=qkd)
    rec, clock = Recorder(), FakeClock()
    s = sealer(provs, rec, clock, failure_threshold=2, reset_timeout_s=30)
    prof = profile(QKD_XWING, XWING)
    for _ in range(2):
        assert s.establish(prof, RECIPIENT, b"c").path == XWING
    assert qkd.calls == 2
    assert s.breaker("qkd-etsi014").state is BreakerState.OPEN

    assert s.establish(prof, RECIPIENT, b"c").path == XWING
    assert qkd.calls == 2  # not called while open
    assert rec.events[-1] == FailoverEvent("standard", QKD_XWING, XWING, "circuit_open", 42.0)

    clock.now += 30
    qkd.fail = None  # the KME came back
    result = s.establish(prof, RECIPIENT, b"c")
    assert result.path == QKD_XWING
    assert qkd.calls == 3
    assert s.breaker("qkd-etsi014").state is BreakerState.CLOSED


# -- no fallback: retry with backoff ----------------------------------------------------------


def test_no_fallback_retries_with_exponential_backoff_then_exhausts() -> None:
    qkd = FakeProvider("qkd-etsi014", None, fail=ReasonCode.QKD_UNAVAILABLE)
    provs = providers(qkd_etsi014=qkd)
    rec = Recorder()
    s = sealer(provs, rec, retries=3, backoff_s=0.1, failure_threshold=100)
    with pytest.raises(KeyProviderError) as info:
        s.establish(profile(QKD_XWING, XWING, fallback=False, name="enclave"), RECIPIENT, b"c")
    assert info.value.reason is ReasonCode.KEY_PATH_EXHAUSTED
    assert "'enclave'" in str(info.value)
    assert "qkd_unavailable" in str(info.value)
    assert rec.sleeps == pytest.approx([0.1, 0.2, 0.4])
    assert qkd.calls == 4
    assert provs["xwing"].calls == 0  # the fallback path of a no-fallback profile is never used
    assert [e.to_path for e in rec.events] == [QKD_XWING, QKD_XWING, QKD_XWING, None]


def test_no_fallback_recovers_on_retry() -> None:
    qkd = FakeProvider("qkd-etsi014", None, fail=ReasonCode.QKD_UNAVAILABLE)
    provs = providers(qkd_etsi014=qkd)
    rec = Recorder()

    def sleep_and_heal(seconds: float) -> None:
        rec.sleeps.append(seconds)
        qkd.fail = None

    s = ProfileSealer(KeyPathRunner(provs), listeners=[rec], sleep=sleep_and_heal, backoff_s=0.5)
    result = s.establish(profile(QKD_XWING, fallback=False), RECIPIENT, b"c")
    assert result.path == QKD_XWING
    assert rec.sleeps == [0.5]


def test_no_fallback_sees_open_circuit_as_failure() -> None:
    qkd = FakeProvider("qkd-etsi014", None, fail=ReasonCode.QKD_UNAVAILABLE)
    rec = Recorder()
    s = sealer(providers(qkd_etsi014=qkd), rec, retries=2, failure_threshold=1)
    with pytest.raises(KeyProviderError):
        s.establish(profile(QKD_XWING, fallback=False), RECIPIENT, b"c")
    assert qkd.calls == 1
    assert [e.reason for e in rec.events] == ["qkd_unavailable", "circuit_open", "circuit_open"]


# -- timeouts ---------------------------------------------------------------------------------


def test_slow_provider_times_out_and_counts_as_failure(gate: threading.Event) -> None:
    slow = FakeProvider("qkd-etsi014", None, gate=gate)
    rec = Recorder()
    s = sealer(providers(qkd_etsi014=slow), rec, provider_timeout_s=0.05, failure_threshold=1)
    result = s.establish(profile(QKD_XWING, XWING), RECIPIENT, b"c")
    assert result.path == XWING
    assert rec.events[0].reason == "timeout"
    assert s.breaker("qkd-etsi014").state is BreakerState.OPEN


class _NoThreads:
    """Fails the test if a thread is started (replaces ``threading.Thread`` in keypath)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise AssertionError("a thread was started for an in-process provider")


def test_in_process_hpke_providers_run_inline_and_network_providers_keep_the_timeout(
    monkeypatch: pytest.MonkeyPatch, gate: threading.Event
) -> None:
    import fleetbus.providers.keypath as keypath

    xwing = XWingProvider()
    _private, public = xwing.generate_keypair()
    recipient = RecipientKeys("vehicle-1", {"xwing": public}, {"xwing": "kid-x"})
    rec = Recorder()
    real = sealer({"xwing": xwing}, rec, provider_timeout_s=0.05)  # type: ignore[dict-item]
    monkeypatch.setattr(keypath.threading, "Thread", _NoThreads)
    result = real.establish(profile(XWING), recipient, b"c")
    assert result.path == XWING
    assert rec.events == []
    monkeypatch.undo()
    # A provider that does not declare may_block=False, even under the name "xwing", still
    # runs under the timeout.
    slow = FakeProvider("xwing", "xwing", gate=gate)
    rec = Recorder()
    s = sealer(providers(xwing=slow), rec, provider_timeout_s=0.05, failure_threshold=1)
    with pytest.raises(KeyProviderError):
        s.establish(profile(XWING, fallback=False), RECIPIENT, b"c")
    assert rec.events[0].reason == "timeout"


def test_inline_calls_without_timeout() -> None:
    rec = Recorder()
    s = sealer(providers(), rec, provider_timeout_s=None)
    assert s.establish(profile(QKD_XWING), RECIPIENT, b"c").path == QKD_XWING
    assert rec.events == []


# -- downgrade ordering -----------------------------------------------------------------------


def test_is_at_least_is_containment_of_components() -> None:
    assert is_at_least(QKD_XWING, XWING)
    assert is_at_least(XWING, XWING)
    assert not is_at_least(XWING, QKD_XWING)
    assert not is_at_least(X25519, XWING)
    assert not is_at_least(KeyPath.parse("mlkem768"), XWING)
    assert is_at_least(KeyPath.parse("x25519+xwing"), XWING)
    # X-Wing is the ML-KEM-768 + X25519 hybrid: it meets either component's minimum...
    assert is_at_least(XWING, X25519)
    assert is_at_least(XWING, KeyPath.parse("mlkem768"))
    assert is_at_least(QKD_XWING, X25519)
    # ...and two separate components meet each other's combination.
    assert is_at_least(KeyPath.parse("mlkem768+x25519"), XWING)
    assert not is_at_least(KeyPath.parse("qkd-etsi014"), X25519)


def test_path_strength_ranks() -> None:
    ranks = [
        path_strength(KeyPath.parse(p))
        for p in ("x25519", "mlkem768", "xwing", "qkd-etsi014+xwing")
    ]
    assert ranks == [1, 2, 3, 7]
    assert path_strength(KeyPath.parse("unknown")) == 0


def test_empty_profile_is_config_error() -> None:
    empty = SecurityProfile("p", [], "ed25519", True, XWING)
    with pytest.raises(ConfigError):
        ProfileSealer(KeyPathRunner({})).establish(empty, RECIPIENT, b"c")


# -- which profiles can seal to a key set (keys issue refuses the rest) -----------------------

KEY_SETS = [
    ("xwing",),
    ("xwing", "x25519"),
    ("x25519",),
    ("mlkem768",),
    ("mlkem768", "x25519"),
]


def _caps(keys: tuple[str, ...], sae: bool, pq_signature: bool) -> frozenset[str]:
    """The capabilities ``issue_key`` gives (pqc from a PQ key or an ML-DSA signature key)."""
    pqc = pq_signature or any(k in ("xwing", "mlkem768") for k in keys)
    return frozenset({"pqc"} if pqc else set()) | frozenset({"qkd"} if sae else set())


def test_default_profiles_cannot_seal_to_mlkem768_keys() -> None:
    """Issue 13: a vehicle with mlkem768 + x25519 gets pqc, and the pqc profile seals only on
    xwing; with a QKD SAE id, enclave and standard need xwing too."""
    settings = FleetbusSettings()
    hybrid = ("mlkem768", "x25519")
    assert set(profiles_unable_to_seal(settings, hybrid, _caps(hybrid, False, True), False)) == {
        "pqc"
    }
    with_qkd = profiles_unable_to_seal(settings, hybrid, _caps(hybrid, True, True), True)
    assert set(with_qkd) == {"enclave", "standard"}
    assert "seals only on qkd-etsi014+xwing" in with_qkd["enclave"]
    # An x25519-only key under a composite (ML-DSA) signature key earns pqc as well.
    assert set(profiles_unable_to_seal(settings, ("x25519",), {"pqc"}, False)) == {"pqc"}
    assert profiles_unable_to_seal(settings, ("x25519",), frozenset(), False) == {}
    assert profiles_unable_to_seal(settings, ("xwing",), {"pqc", "qkd"}, True) == {}


def test_a_rule_naming_an_undefined_profile_is_unable_to_seal() -> None:
    """The seal stage refuses every command such a rule chooses (key_path_exhausted): the
    check must say so rather than pass the keys (it used to skip the rule)."""
    settings = FleetbusSettings(
        profile_rules=[
            ProfileRule(profile="typo", criticality="critical"),
            ProfileRule(profile="standard"),
        ]
    )
    unable = profiles_unable_to_seal(settings, ("xwing",), {"pqc"}, False)
    assert set(unable) == {"typo"}
    assert "not defined" in unable["typo"]


def test_a_profile_without_fallback_is_judged_by_its_first_path_only() -> None:
    settings = FleetbusSettings(
        profiles={"strict": ProfileSettings(key_paths=["xwing", "x25519"], allow_fallback=False,
                                            minimum_path="x25519")},
        profile_rules=[ProfileRule(profile="strict")],
    )  # fmt: skip
    assert set(profiles_unable_to_seal(settings, ("x25519",), frozenset(), False)) == {"strict"}
    settings.profiles["strict"].allow_fallback = True
    assert profiles_unable_to_seal(settings, ("x25519",), frozenset(), False) == {}


def test_no_matching_rule_is_reported() -> None:
    settings = FleetbusSettings(profile_rules=[ProfileRule(profile="pqc", capability="pqc")])
    assert "(no rule)" in profiles_unable_to_seal(settings, ("x25519",), frozenset(), False)


@pytest.mark.parametrize("keys", KEY_SETS)
@pytest.mark.parametrize("sae", [False, True])
def test_the_check_agrees_with_the_profile_sealer(keys: tuple[str, ...], sae: bool) -> None:
    """What ``profiles_unable_to_seal`` predicts from the traits is what ``ProfileSealer`` does
    with the default profiles: it exhausts exactly the profiles named."""
    settings = FleetbusSettings()
    caps = _caps(keys, sae, True)
    unable = profiles_unable_to_seal(settings, keys, caps, sae)
    recipient = RecipientKeys(
        "vehicle-1",
        {k: b"pk" for k in keys},
        {k: "kid-" + k for k in keys},
        capabilities=caps,
        qkd_sae_id="SAE_1" if sae else None,
    )
    provs = providers(mlkem768=FakeProvider("mlkem768", "mlkem768"))
    stage = SealStage(
        topics=PipelineTopics.from_settings(settings.topics),
        directory=None,
        sealer=None,
        profiles={
            name: profile_from_settings(name, spec.key_paths, spec.allow_fallback,
                                        spec.minimum_path, "ed25519")
            for name, spec in settings.profiles.items()
        },
        rules=[ProfileChoice(r.profile, r.criticality, r.capability)
               for r in settings.profile_rules],
        clock_skew_s=0.0,
    )  # fmt: skip
    for criticality in ("high", "normal"):
        chosen = stage.choose_profile(criticality, recipient, 0.0)
        runner = sealer(provs, Recorder(), retries=0)
        if chosen.name in unable:
            with pytest.raises(KeyProviderError) as info:
                runner.establish(chosen, recipient, b"ctx")
            assert info.value.reason is ReasonCode.KEY_PATH_EXHAUSTED
        else:
            assert runner.establish(chosen, recipient, b"ctx").key

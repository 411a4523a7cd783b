"""The simulated QKD link's key pool, without network: once-only handout, bounds, rate."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from fleetbus.providers.kme import (
    KeyPool,
    KMEBadRequest,
    KMEPairConfig,
    KMEUnavailable,
    caller_sae_id,
)

A, B = "KME-A", "KME-B"
HUB, EDGE, EDGE2 = "sae-hub", "sae-edge-1", "sae-edge-2"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def counting_bytes() -> Any:
    """Distinct, recognisable 'random' bytes so tests can tell keys apart."""
    counter = itertools.count(1)

    def draw(n: int) -> bytes:
        return bytes(next(counter) % 256 for _ in range(n))

    return draw


def make_pool(clock: FakeClock, **kw: Any) -> KeyPool:
    kw.setdefault("key_size", 256)
    kw.setdefault("max_key_count", 10)
    kw.setdefault("key_rate_bps", 0.0)
    return KeyPool(clock=clock, random_bytes=counting_bytes(), **kw)


def reserve(pool: KeyPool, number: int = 1, size: int = 256, slave: str = EDGE) -> list[Any]:
    return pool.reserve(
        source_kme=A, target_kme=B, master=HUB, slave=slave, number=number, size_bits=size
    )


def deliver(pool: KeyPool, ids: list[str], slave: str = EDGE, target: str = B) -> list[Any]:
    return pool.deliver(target_kme=target, master=HUB, slave=slave, key_ids=ids)


def test_starts_full_by_default_and_with_prefill_when_asked() -> None:
    clock = FakeClock()
    assert make_pool(clock).stored_key_count() == 10
    assert make_pool(clock, prefill_keys=3).stored_key_count() == 3
    assert make_pool(clock, prefill_keys=99).stored_key_count() == 10


def test_reserve_takes_keys_out_of_the_pool() -> None:
    pool = make_pool(FakeClock())
    keys = reserve(pool, number=3)
    assert len(keys) == 3
    assert len({k for k, _ in keys}) == 3
    assert all(len(m) == 32 for _, m in keys)
    assert len({m for _, m in keys}) == 3
    assert pool.stored_key_count() == 7
    assert pool.reserved_key_count() == 3


def test_a_larger_key_consumes_proportionally_more_material() -> None:
    pool = make_pool(FakeClock())
    ((_, material),) = reserve(pool, size=1024)
    assert len(material) == 128
    assert pool.stored_key_count() == 6


def test_deliver_returns_the_same_bytes_once_only() -> None:
    pool = make_pool(FakeClock())
    keys = reserve(pool, number=2)
    ids = [k for k, _ in keys]
    assert deliver(pool, ids) == keys
    assert pool.reserved_key_count() == 0
    with pytest.raises(KMEBadRequest) as err:
        deliver(pool, ids[:1])
    assert err.value.status == 400
    assert err.value.details == [{"key_ID": ids[0], "reason": "unknown or not available"}]


def test_reservation_is_for_one_slave_at_the_other_kme_only() -> None:
    pool = make_pool(FakeClock())
    ((key_id, material),) = reserve(pool)
    with pytest.raises(KMEBadRequest):
        deliver(pool, [key_id], slave=EDGE2)
    with pytest.raises(KMEBadRequest):
        deliver(pool, [key_id], target=A)  # the master's own KME is not the slave's
    with pytest.raises(KMEBadRequest):
        pool.deliver(target_kme=B, master="sae-other-hub", slave=EDGE, key_ids=[key_id])
    assert deliver(pool, [key_id]) == [(key_id, material)]


def test_a_batch_is_delivered_all_or_nothing() -> None:
    pool = make_pool(FakeClock())
    ((key_id, _),) = reserve(pool)
    with pytest.raises(KMEBadRequest):
        deliver(pool, [key_id, "not-a-key"])
    with pytest.raises(KMEBadRequest):
        deliver(pool, [key_id, key_id])
    assert pool.reserved_key_count() == 1
    assert len(deliver(pool, [key_id])) == 1


def test_empty_pool_is_503_with_a_reason() -> None:
    pool = make_pool(FakeClock(), prefill_keys=1)
    reserve(pool)
    with pytest.raises(KMEUnavailable) as err:
        reserve(pool)
    assert err.value.status == 503
    assert err.value.details[0]["reason"] == "key_pool_empty"


def test_not_enough_material_for_the_request_takes_nothing() -> None:
    pool = make_pool(FakeClock(), prefill_keys=2)
    with pytest.raises(KMEUnavailable):
        reserve(pool, number=3)
    assert pool.stored_key_count() == 2


def test_rate_accounting_with_an_injected_clock() -> None:
    clock = FakeClock()
    pool = make_pool(clock, prefill_keys=0, key_rate_bps=256.0)  # one key per second
    assert pool.stored_key_count() == 0
    clock.advance(1.0)
    assert pool.stored_key_count() == 1
    clock.advance(0.5)
    assert pool.stored_key_count() == 1
    clock.advance(0.5)  # the half key from before is carried, not lost
    assert pool.stored_key_count() == 2
    clock.advance(0.75)
    clock.advance(0.25)
    assert pool.stored_key_count() == 3


def test_pool_is_bounded() -> None:
    clock = FakeClock()
    pool = make_pool(clock, prefill_keys=0, key_rate_bps=256.0)
    clock.advance(1e6)
    assert pool.stored_key_count() == 10
    reserve(pool)
    assert pool.stored_key_count() == 9
    clock.advance(1.0)
    assert pool.stored_key_count() == 10
    clock.advance(1.0)
    assert pool.stored_key_count() == 10


def test_rate_zero_never_refills_and_rate_changes_apply_from_then_on() -> None:
    clock = FakeClock()
    pool = make_pool(clock, prefill_keys=0)
    clock.advance(1e6)
    assert pool.stored_key_count() == 0
    pool.set_key_rate(512.0)
    clock.advance(1.0)
    assert pool.stored_key_count() == 2
    with pytest.raises(ValueError, match="rate"):
        pool.set_key_rate(-1.0)


def test_link_down_stops_generation_and_key_handout() -> None:
    clock = FakeClock()
    pool = make_pool(clock, prefill_keys=1, key_rate_bps=256.0)
    ((key_id, _),) = reserve(pool)
    pool.set_link(False)
    assert pool.generating is False
    clock.advance(5.0)
    assert pool.stored_key_count() == 0
    with pytest.raises(KMEUnavailable) as err:
        reserve(pool)
    assert err.value.details[0]["reason"] == "link_down"
    with pytest.raises(KMEUnavailable):
        deliver(pool, [key_id])
    pool.set_link(True)
    assert pool.stored_key_count() == 0  # down time produced nothing
    clock.advance(1.0)
    assert pool.stored_key_count() == 1
    assert len(deliver(pool, [key_id])) == 1


def test_eavesdropper_raises_qber_and_stops_generation() -> None:
    clock = FakeClock()
    pool = make_pool(clock, prefill_keys=2, key_rate_bps=256.0)
    pool.set_eavesdropper(True)
    assert pool.qber > pool.qber_threshold
    assert pool.generating is False
    clock.advance(100.0)
    assert pool.stored_key_count() == 2
    reserve(pool, number=2)
    with pytest.raises(KMEUnavailable) as err:
        reserve(pool)
    assert err.value.details[0]["reason"] == "eavesdropper_detected"
    pool.set_eavesdropper(False)
    assert pool.qber <= pool.qber_threshold
    clock.advance(1.0)
    assert pool.stored_key_count() == 1


def test_eavesdropper_flushes_the_pool_when_configured() -> None:
    pool = make_pool(FakeClock(), flush_on_eavesdropper=True)
    ((key_id, _),) = reserve(pool)
    pool.set_eavesdropper(True)
    assert pool.stored_key_count() == 0
    assert len(deliver(pool, [key_id])) == 1  # handed-out keys are the SAEs' business


def test_unfetched_reservations_expire() -> None:
    clock = FakeClock()
    pool = make_pool(clock, reservation_ttl_s=60.0)
    ((key_id, _),) = reserve(pool)
    clock.advance(61.0)
    with pytest.raises(KMEBadRequest):
        deliver(pool, [key_id])
    assert pool.reserved_key_count() == 0


def test_reservations_are_bounded() -> None:
    clock = FakeClock()
    pool = make_pool(clock, max_key_count=2, key_rate_bps=1e6)
    first = reserve(pool)[0][0]
    for _ in range(pool.max_reserved):
        clock.advance(0.01)
        reserve(pool)
    assert pool.reserved_key_count() == pool.max_reserved
    with pytest.raises(KMEBadRequest):
        deliver(pool, [first])  # the oldest made room


def test_delivered_counts_by_kme() -> None:
    pool = make_pool(FakeClock())
    keys = reserve(pool, number=3)
    deliver(pool, [keys[0][0]])
    assert pool.delivered == {A: 3, B: 1}


def test_snapshot_and_errors_carry_no_key_material() -> None:
    pool = make_pool(FakeClock())
    ((key_id, material),) = reserve(pool)
    text = json.dumps(pool.snapshot())
    assert material.hex() not in text
    assert key_id not in text
    with pytest.raises(KMEBadRequest) as err:
        deliver(pool, [key_id], slave=EDGE2)
    assert material.hex() not in json.dumps(err.value.body())


def test_reset_restores_the_start_state() -> None:
    clock = FakeClock()
    pool = make_pool(clock, key_rate_bps=256.0)
    reserve(pool, number=4)
    pool.set_link(False)
    pool.set_eavesdropper(True)
    pool.set_key_rate(0.0)
    pool.reset()
    assert pool.link_up is True
    assert pool.eavesdropper is False
    assert pool.key_rate_bps == 256.0
    assert pool.stored_key_count() == 10
    assert pool.reserved_key_count() == 0


def test_caller_identity_is_the_subject_common_name() -> None:
    peercert = {
        "subject": ((("organizationName", "fleetbus test PKI"),), (("commonName", "sae-hub"),)),
        "subjectAltName": (("DNS", "sae-other"),),
    }
    assert caller_sae_id(peercert) == "sae-hub"
    assert caller_sae_id({"subject": ((("organizationName", "x"),),)}) is None
    assert caller_sae_id(None) is None
    assert caller_sae_id({}) is None


def _config(**kw: Any) -> KMEPairConfig:
    return KMEPairConfig.from_cert_dir(Path("/nonexistent"), **kw)


def test_pair_config_defaults_and_validation() -> None:
    cfg = _config()
    assert cfg.key_size == 256
    assert cfg.ca_file == Path("/nonexistent/ca.pem")
    for bad in (
        {"key_size": 100},
        {"key_size": 2048},
        {"sae_a": ("x",), "sae_b": ("x",)},
        {"sae_b": ()},
        {"kme_b_id": "KME-A"},
        {"key_rate_bps": -1},
        {"qber_baseline": 0.2},
        {"surprise": 1},
    ):
        with pytest.raises(ValidationError):
            _config(**bad)

"""The simulated QKD link's key pool, without network: once-only handout, bounds, rate, and
its state file (a restart keeps unfetched keys; a corrupt file stops the start).

Over 500 lines because it covers the pool and its state file together: the state cases drive the
same pool API.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from fleetbus.kmesim.api import KMEService, caller_sae_id
from fleetbus.kmesim.config import KMEPairConfig
from fleetbus.kmesim.errors import KMEBadRequest, KMEUnauthorized, KMEUnavailable
from fleetbus.kmesim.pool import KeyPool
from fleetbus.kmesim.state import KMEStateError, PoolStateFile

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
    # 014 Table 7: an SAE that is not the key's slave is unauthorized (401), not a bad request.
    with pytest.raises(KMEUnauthorized) as err:
        deliver(pool, [key_id], slave=EDGE2)
    assert err.value.status == 401
    assert err.value.details == [{"key_ID": key_id, "reason": "not the slave SAE of this key"}]
    ((own_id, _),) = reserve(pool, slave=EDGE2)
    with pytest.raises(KMEUnauthorized):  # also in a batch with a key of its own: nothing out
        deliver(pool, [own_id, key_id], slave=EDGE2)
    assert pool.reserved_key_count() == 2
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
    with pytest.raises(KMEUnauthorized) as err:
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


# -- the state file: a restart keeps what was not yet handed to both sides -------------------


def durable_pool(state_dir: Path, clock: FakeClock, **kw: Any) -> KeyPool:
    return make_pool(clock, state_file=PoolStateFile(state_dir), wall_clock=clock, **kw)


def restart(pool: KeyPool, state_dir: Path, clock: FakeClock, **kw: Any) -> KeyPool:
    """What a KME restart does to the pool: the old process lets go, a new one loads the file."""
    pool.close()
    return durable_pool(state_dir, clock, **kw)


def test_a_reserved_key_survives_a_restart_and_is_delivered_exactly_once(tmp_path: Path) -> None:
    clock = FakeClock()
    pool = durable_pool(tmp_path, clock)
    keys = reserve(pool, number=3)
    pool = restart(pool, tmp_path, clock)
    assert pool.reserved_key_count() == 3
    assert pool.stored_key_count() == 7  # not refilled to the prefill: the pool is the saved one
    assert deliver(pool, [keys[1][0]]) == [keys[1]]
    pool = restart(pool, tmp_path, clock)
    with pytest.raises(KMEBadRequest):
        deliver(pool, [keys[1][0]])  # once-only holds across restarts
    assert deliver(pool, [keys[0][0], keys[2][0]]) == [keys[0], keys[2]]
    pool = restart(pool, tmp_path, clock)
    assert pool.reserved_key_count() == 0
    with pytest.raises(KMEBadRequest):
        deliver(pool, [keys[0][0]])


def test_unreserved_material_is_the_same_after_a_restart(tmp_path: Path) -> None:
    clock = FakeClock()
    pool = durable_pool(tmp_path, clock, max_key_count=4)
    reserve(pool)  # persists the pool as it is
    pool = restart(pool, tmp_path, clock, max_key_count=4)
    reserved_after = reserve(pool, number=3)
    fresh = make_pool(FakeClock(), max_key_count=4)  # same "random" stream, no state file
    reserve(fresh)
    assert [m for _, m in reserve(fresh, number=3)] == [m for _, m in reserved_after]


def test_state_file_is_private_and_replaced_atomically(tmp_path: Path) -> None:
    state_dir = tmp_path / "kme-state"
    pool = durable_pool(state_dir, FakeClock())
    ((key_id, _),) = reserve(pool)
    files = sorted(p.name for p in state_dir.iterdir())
    assert files == ["kme-pool.json", "kme-pool.lock"]  # no temporary file left behind
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((state_dir / "kme-pool.json").stat().st_mode) == 0o600
    doc = json.loads((state_dir / "kme-pool.json").read_text())
    assert doc["format"] == "fleetbus-kme-pool"
    assert doc["version"] == 1
    assert [r["key_ID"] for r in doc["state"]["reservations"]] == [key_id]
    assert pool.state_file is not None
    assert pool.state_file.writes == 2  # the start state, then the reservation


def test_a_second_kme_on_the_same_state_dir_is_refused(tmp_path: Path) -> None:
    pool = durable_pool(tmp_path, FakeClock())
    with pytest.raises(KMEStateError, match="in use by another KME"):
        PoolStateFile(tmp_path)
    pool.close()
    PoolStateFile(tmp_path).close()


def _valid_checksum_but_no_reservations_field(raw: bytes) -> bytes:
    doc = json.loads(raw)
    state = {"material": doc["state"]["material"]}
    canonical = json.dumps(state, sort_keys=True, separators=(",", ":"))
    doc["state"], doc["sha256"] = state, hashlib.sha256(canonical.encode()).hexdigest()
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda raw: raw[: len(raw) // 2], "corrupt or truncated"),
        (lambda raw: b"", "corrupt or truncated"),
        (lambda raw: raw.replace(b'"material":"', b'"material":"AAAA', 1), "checksum"),
        (lambda raw: raw.replace(b'"version":1', b'"version":2', 1), "version 2"),
        (lambda raw: b'{"format": "something else"}', "corrupt or truncated"),
        (_valid_checksum_but_no_reservations_field, "unexpected shape"),
    ],
    ids=["truncated", "empty", "edited", "future-version", "other-format", "wrong-shape"],
)
def test_a_damaged_state_file_stops_the_start_with_a_clear_error(
    tmp_path: Path, damage: Any, message: str
) -> None:
    pool = durable_pool(tmp_path, FakeClock())
    reserve(pool)
    pool.close()
    path = tmp_path / "kme-pool.json"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(KMEStateError, match=message) as err:
        durable_pool(tmp_path, FakeClock())
    assert str(path) in str(err.value)
    assert "fresh pool" in str(err.value)


def test_reservations_age_while_the_kme_is_down(tmp_path: Path) -> None:
    clock = FakeClock()
    pool = durable_pool(tmp_path, clock, reservation_ttl_s=60.0)
    ((old, _),) = reserve(pool)
    clock.advance(30.0)
    ((young, _),) = reserve(pool)
    pool.close()
    clock.advance(40.0)  # down for 40 s: the first key is 70 s old, the second 40 s
    pool = durable_pool(tmp_path, clock, reservation_ttl_s=60.0)
    with pytest.raises(KMEBadRequest):
        deliver(pool, [old])
    assert len(deliver(pool, [young])) == 1


def test_a_failed_write_hands_out_nothing_and_forgets_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = durable_pool(tmp_path, FakeClock())
    ((key_id, material),) = reserve(pool)
    assert pool.state_file is not None

    def disk_full(state: Any) -> None:
        raise OSError(28, os.strerror(28))

    monkeypatch.setattr(pool.state_file, "save", disk_full)
    with pytest.raises(KMEUnavailable) as err:
        reserve(pool)
    assert err.value.details[0]["reason"] == "state_write_failed"
    assert pool.stored_key_count() == 9
    with pytest.raises(KMEUnavailable):
        deliver(pool, [key_id])
    assert pool.reserved_key_count() == 1
    monkeypatch.undo()
    assert deliver(pool, [key_id]) == [(key_id, material)]


def test_reset_and_flush_are_persisted_too(tmp_path: Path) -> None:
    clock = FakeClock()
    pool = durable_pool(tmp_path, clock)
    ((key_id, _),) = reserve(pool)
    pool.flush()
    pool = restart(pool, tmp_path, clock)
    assert pool.stored_key_count() == 0
    assert pool.reserved_key_count() == 1
    pool.reset()
    pool = restart(pool, tmp_path, clock)
    assert pool.stored_key_count() == 10
    with pytest.raises(KMEBadRequest):
        deliver(pool, [key_id])


def test_pair_config_takes_a_state_dir_and_a_metrics_listener() -> None:
    cfg = _config(state_dir=Path("/var/lib/kme"), metrics_port=9465, metrics_host="0.0.0.0")
    assert cfg.state_dir == Path("/var/lib/kme")
    assert _config().metrics_port is None  # off unless asked for
    with pytest.raises(ValidationError):
        _config(metrics_port=70000)


def test_a_durable_pool_writes_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a key hand-out waits for its state write, the KME's event loop keeps running (other
    requests, /metrics); the hand-out still returns only after the write."""
    pool = durable_pool(tmp_path, FakeClock())
    save = PoolStateFile.save

    def slow_save(self: PoolStateFile, canonical_state: str) -> None:
        time.sleep(0.3)
        save(self, canonical_state)

    monkeypatch.setattr(PoolStateFile, "save", slow_save)
    service = KMEService(
        kme_id=A,
        peer_kme_id=B,
        local_saes=[HUB],
        remote_saes=[EDGE],
        pool=pool,
        config=_config(),
    )

    async def scenario() -> tuple[int, list[Any]]:
        ticks = 0
        done = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        task = asyncio.create_task(ticker())
        keys = await service._in_pool(
            pool.reserve, source_kme=A, target_kme=B, master=HUB, slave=EDGE, number=2,
            size_bits=256,
        )  # fmt: skip
        done.set()
        await task
        return ticks, keys

    ticks, keys = asyncio.run(scenario())
    assert len(keys) == 2
    assert ticks >= 10  # the loop ran through the 0.3 s write (blocked, it would tick once)
    pool = restart(pool, tmp_path, FakeClock())
    assert pool.reserved_key_count() == 2  # and the write happened before the keys came back

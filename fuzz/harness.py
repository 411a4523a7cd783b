"""Shared driver of the fleetbus fuzz harnesses: atheris (libFuzzer, coverage-guided) when it is
installed, else a structure-aware random mutator that keeps inputs with new outcomes.

A harness defines ``test_one_input(data: bytes) -> None`` that raises ``Crash`` (or any
exception other than the parser's documented error) for a bug. Run one with::

    .venv/bin/python fuzz/fuzz_envelope.py -max_total_time=3600 fuzz/corpus/envelope
    FLEETBUS_FUZZ_ENGINE=python .venv/bin/python fuzz/fuzz_envelope.py -max_total_time=60

See ``fuzz/README.md``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2

HERE = Path(__file__).resolve().parent
CRASHES = HERE / "crashes"

Target = Callable[[bytes], None]


#: What the current input did (reason codes), noted by the harness for the python engine's
#: "new outcome" corpus feedback.
NOTES: list[str] = []


def note(outcome: object) -> None:
    NOTES.append(str(outcome))


class Crash(AssertionError):
    """The code under test misbehaved on this input (not merely rejected it)."""


def seeds(name: str) -> list[bytes]:
    folder = HERE / "corpus" / name
    return [p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()]


# --- the pure-Python engine ----------------------------------------------------------------

_INTERESTING_INTS = [0, 1, -1, 23, 24, 255, 256, 65535, 65536, 2**31, 2**32, 2**63 - 1, 2**64 - 1,
                     -(2**63), -(2**64)]  # fmt: skip


def _mutate_value(value: Any, rng: random.Random, depth: int = 0) -> Any:
    """One random change somewhere inside a decoded CBOR value."""
    choice = rng.random()
    if isinstance(value, cbor2.CBORTag):
        if choice < 0.2:
            return cbor2.CBORTag(rng.choice([16, 0x66627573, 24, 1, rng.randrange(2**32)]),
                                 value.value)  # fmt: skip
        return cbor2.CBORTag(value.tag, _mutate_value(value.value, rng, depth + 1))
    if isinstance(value, list | tuple) and value and choice < 0.8:
        items = list(value)
        i = rng.randrange(len(items))
        op = rng.random()
        if op < 0.6:
            items[i] = _mutate_value(items[i], rng, depth + 1)
        elif op < 0.75:
            del items[i]
        elif op < 0.9:
            items.insert(i, items[i])
        else:
            items[i] = [items[i]]
        return items
    if isinstance(value, dict) and value and choice < 0.8:
        items_d = dict(value)
        k = rng.choice(list(items_d))
        op = rng.random()
        if op < 0.6:
            items_d[k] = _mutate_value(items_d[k], rng, depth + 1)
        elif op < 0.8:
            del items_d[k]
        else:
            items_d[rng.choice([-65552, 4, "x", k])] = items_d[k]
        return items_d
    if isinstance(value, bytes) and choice < 0.7:
        if not value or rng.random() < 0.3:
            return rng.randbytes(rng.choice([0, 1, 12, 15, 16, 17, 32, 64]))
        b = bytearray(value)
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return bytes(b)
    if isinstance(value, str) and choice < 0.7:
        return rng.choice(["", value * 2, value[:-1], "x" * 300, value.upper(), "\u0000"])
    # Replace with something of another (or the same) type.
    return rng.choice([rng.choice(_INTERESTING_INTS), "", b"", [], {}, None, True, 1.5,
                       float("nan"), "cmd", cbor2.CBORTag(16, [])])  # fmt: skip


def mutate(data: bytes, pool: list[bytes], rng: random.Random) -> bytes:
    op = rng.random()
    if op < 0.45:
        with contextlib.suppress(Exception):  # not CBOR (any more): mutate the bytes instead
            value = cbor2.loads(data)
            out: bytes = cbor2.dumps(_mutate_value(value, rng), canonical=rng.random() < 0.8)
            return out
    b = bytearray(data or b"\x00")
    for _ in range(rng.choice([1, 1, 1, 2, 4, 8])):
        kind = rng.random()
        i = rng.randrange(len(b) + 1)
        if kind < 0.35 and b:
            b[min(i, len(b) - 1)] ^= 1 << rng.randrange(8)
        elif kind < 0.5:
            b[i:i] = bytes([rng.choice([0x00, 0x18, 0x19, 0x1A, 0x1B, 0x5F, 0x7F, 0x9F, 0xBF,
                                        0xFF, 0xF7, 0xFB, 0xC0, 0xD8])])  # fmt: skip
        elif kind < 0.65 and b:
            del b[i : i + rng.randrange(1, 16)]
        elif kind < 0.8 and b:
            j = rng.randrange(len(b))
            b[i:i] = b[j : j + rng.randrange(1, 64)]
        elif kind < 0.9 and pool:
            other = rng.choice(pool)
            b = b[:i] + bytearray(other[rng.randrange(len(other) + 1) :])
        else:
            b = b[:i]
    return bytes(b)


def outcome_signature(target: Target, data: bytes) -> str:
    NOTES.clear()
    target(data)  # raises on a crash
    return "|".join(NOTES)


def python_engine(target: Target, name: str, max_total_time: float, seed: int,
                  corpus_dir: Path | None) -> dict[str, int]:  # fmt: skip
    """Mutate for ``max_total_time`` seconds; keep inputs with a new outcome in ``corpus_dir``."""
    rng = random.Random(seed)  # noqa: S311 - fuzzing, not cryptography
    pool = seeds(name) or [b"\xa0"]
    seen: set[str] = set()
    for data in pool:
        seen.add(outcome_signature(target, data))
    runs, kept = 0, 0
    deadline = time.monotonic() + max_total_time
    while time.monotonic() < deadline:
        data = mutate(rng.choice(pool), pool, rng)
        runs += 1
        try:
            signature = outcome_signature(target, data)
        except Exception:
            save_crash(name, data)
            raise
        if signature not in seen:
            seen.add(signature)
            pool.append(data)
            kept += 1
            if corpus_dir is not None:
                corpus_dir.mkdir(parents=True, exist_ok=True)
                (corpus_dir / hashlib.sha256(data).hexdigest()[:40]).write_bytes(data)
    return {"runs": runs, "kept": kept, "outcomes": len(seen)}


def save_crash(name: str, data: bytes) -> Path:
    CRASHES.mkdir(exist_ok=True)
    path = CRASHES / f"{name}-{hashlib.sha256(data).hexdigest()[:16]}.bin"
    path.write_bytes(data)
    print(f"crash input saved to {path}", file=sys.stderr)
    return path


def _atheris() -> Any:
    if os.environ.get("FLEETBUS_FUZZ_ENGINE", "auto") not in ("auto", "atheris"):
        return None
    try:
        import atheris  # type: ignore[import-not-found]
    except ImportError:
        return None
    return atheris


def instrumented() -> Any:
    """Context for the harness's fleetbus imports: atheris instruments only ``fleetbus``
    modules for coverage (instrumenting everything takes minutes)."""
    atheris = _atheris()
    if atheris is None:
        return contextlib.nullcontext()
    return atheris.instrument_imports(include=["fleetbus"])


def main(target: Target, name: str) -> None:
    """libFuzzer-style command line: ``[-max_total_time=N] [-seed=N] [corpus_dir ...]``."""
    args = sys.argv[1:]
    atheris = _atheris()
    if atheris is not None:
        atheris.Setup([sys.argv[0], *args], target)
        atheris.Fuzz()
        return
    options = dict(a[1:].split("=", 1) for a in args if a.startswith("-") and "=" in a)
    dirs = [Path(a) for a in args if not a.startswith("-")]
    started = time.monotonic()
    stats = python_engine(
        target,
        name,
        float(options.get("max_total_time", 60)),
        int(options.get("seed", 1)),
        dirs[0] if dirs else None,
    )
    print(
        f"python engine: {stats['runs']} runs in {time.monotonic() - started:.1f} s, "
        f"{stats['outcomes']} distinct outcomes, {stats['kept']} inputs kept"
    )

"""Fuzzing in CI: every kept corpus input and saved crash through each harness, in process.
The bounded run of each harness (a subprocess) is ``tests/integration/test_fuzz_runs.py``.
Long campaigns: see fuzz/README.md.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FUZZ = ROOT / "fuzz"
HARNESSES = {"envelope": "fuzz_envelope", "commands": "fuzz_commands"}


def harness(name: str) -> Callable[[bytes], None]:
    if str(FUZZ) not in sys.path:
        sys.path.insert(0, str(FUZZ))
    module = importlib.import_module(HARNESSES[name])
    target: Callable[[bytes], None] = module.test_one_input
    return target


def inputs(name: str) -> list[Path]:
    kept = sorted((FUZZ / "corpus" / name).iterdir())
    crashes = sorted((FUZZ / "crashes").glob(f"{name}-*")) if (FUZZ / "crashes").exists() else []
    return [p for p in [*kept, *crashes] if p.is_file()]


@pytest.mark.parametrize("name", list(HARNESSES))
def test_kept_corpus_and_saved_crashes_pass(name: str) -> None:
    target = harness(name)
    files = inputs(name)
    assert len(files) >= 20
    for path in files:
        target(path.read_bytes())  # raises Crash (or anything unexpected) on a regression


# --- regressions found by fuzzing and by the hostile corpus --------------------------------


def test_envelope_harness_flags_an_accepted_non_canonical_envelope() -> None:
    """The harness itself: a re-encoding mismatch is a crash, a plain reject is not."""
    target = harness("envelope")
    target(b"")
    target(b"\xda\x66\x62\x75\x73\x83\x02")  # unsupported version: rejected, fine

"""Fuzzing in CI: every kept corpus input and saved crash through each harness, then a bounded
run (30 s) of each harness — atheris (coverage-guided) when installed, else the harness's own
structure-aware mutator. Long campaigns: see fuzz/README.md. Typical runtime: 70 s.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FUZZ = ROOT / "fuzz"
HARNESSES = {"envelope": "fuzz_envelope", "commands": "fuzz_commands"}
CI_SECONDS = int(os.environ.get("FLEETBUS_FUZZ_CI_SECONDS", "30"))


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


@pytest.mark.parametrize("name", list(HARNESSES))
def test_bounded_fuzz_run(name: str, tmp_path: Path) -> None:
    script = FUZZ / f"{HARNESSES[name]}.py"
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    args = [
        sys.executable,
        str(script),
        f"-max_total_time={CI_SECONDS}",
        "-seed=1",
        "-max_len=70000",
        "-rss_limit_mb=2048",
        f"-artifact_prefix={tmp_path}/",
        str(tmp_path / "new"),
        str(FUZZ / "corpus" / name),
    ]
    (tmp_path / "new").mkdir()
    proc = subprocess.run(
        args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=CI_SECONDS + 240
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "Done" in output or "python engine:" in output, output[-2000:]

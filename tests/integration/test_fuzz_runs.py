"""Fuzzing in CI: a bounded run (30 s) of each harness in its own interpreter — atheris
(coverage-guided) when installed, else the harness's own structure-aware mutator. The kept
corpus and saved crashes are replayed in process by ``tests/unit/test_fuzz_regressions.py``.
Long campaigns: see fuzz/README.md. Typical runtime: 70 s.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FUZZ = ROOT / "fuzz"
HARNESSES = {"envelope": "fuzz_envelope", "commands": "fuzz_commands"}
CI_SECONDS = int(os.environ.get("FLEETBUS_FUZZ_CI_SECONDS", "30"))


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

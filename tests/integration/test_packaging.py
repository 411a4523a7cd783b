"""The wheel and the sdist carry what the README says they do: the LICENSE, the Grafana
dashboard with its provisioning, the alert rules and the collector config.

Builds both with setuptools' PEP 517 backend (the version pyproject.toml asks for, installed
into a scratch folder from pip's cache) from a copy of the tracked files.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: Files the package must carry, relative to the fleetbus.observability package / the sdist root.
OBSERVABILITY = [
    "grafana/fleetbus.json",
    "grafana/provisioning/dashboards/fleetbus.yml",
    "grafana/provisioning/datasources/prometheus.yml",
    "prometheus/rules.yml",
    "prometheus/rules_test.yml",
    "prometheus/prometheus.yml",
    "otel/collector.yaml",
]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("build")
    tools, src = work / "tools", work / "src"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--target", str(tools), "setuptools>=69"],
        check=True,
    )
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True
    ).stdout.split(b"\0")
    for name in filter(None, tracked):
        source = ROOT / name.decode()
        if source.is_file():
            target = src / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
    built: list[Path] = []
    for hook in ("build_sdist", "build_wheel"):  # one process each, as a build frontend does
        name = subprocess.run(
            [
                sys.executable,
                "-c",
                f"from setuptools import build_meta as b; print(b.{hook}('dist'))",
            ],
            cwd=src,
            env={"PYTHONPATH": str(tools), "PATH": "/usr/bin:/bin"},
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()[-1]
        built.append(src / "dist" / name)
    return built[0], built[1]


def test_wheel_carries_license_dashboards_rules_and_collector(built: tuple[Path, Path]) -> None:
    names = set(zipfile.ZipFile(built[1]).namelist())
    missing = [f for f in OBSERVABILITY if f"fleetbus/observability/{f}" not in names]
    assert not missing, f"not in the wheel: {missing}"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def test_sdist_carries_license_dashboards_rules_and_collector(built: tuple[Path, Path]) -> None:
    with tarfile.open(built[0]) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    missing = [
        f for f in ["LICENSE"] + [f"observability/{f}" for f in OBSERVABILITY] if f not in names
    ]
    assert not missing, f"not in the sdist: {missing}"


def test_license_is_the_apache_2_0_text() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License\n                           Version 2.0")
    assert "END OF TERMS AND CONDITIONS" in text

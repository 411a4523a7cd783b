"""The broker's jars: Maven artifacts (``org.apache.kafka:kafka_2.13`` and its runtime
dependencies) that ``mvn`` resolves once into a cache outside git."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from fleetbus.bus.errors import ConfigError

#: Tried in order until one resolves from Maven Central. 4.1.1 is the one we run and test on.
KAFKA_VERSIONS: tuple[str, ...] = ("4.1.1", "4.1.0", "4.0.1")
SCALA_VERSION = "2.13"
#: slf4j 1.x binding so the broker's own log lines reach our log file.
LOG4J_SLF4J_BINDING = ("org.apache.logging.log4j", "log4j-slf4j-impl", "2.24.3")

_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dev.fleetbus</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_{scala}</artifactId>
      <version>{version}</version>
    </dependency>
    <dependency>
      <groupId>{log_group}</groupId>
      <artifactId>{log_artifact}</artifactId>
      <version>{log_version}</version>
    </dependency>
  </dependencies>
</project>
"""


def cache_root() -> Path:
    """Where jars and default cluster state live: ``$FLEETBUS_CACHE`` or ``~/.cache/fleetbus``."""
    env = os.environ.get("FLEETBUS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fleetbus"


def require_tool(name: str, hint: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ConfigError(f"'{name}' is not on PATH; {hint}")
    return path


def resolve_jars(
    versions: Sequence[str] = KAFKA_VERSIONS, *, quiet: bool = True
) -> tuple[str, Path]:
    """Return ``(version, libs_dir)`` for the first Kafka version whose jars resolve.

    A version already in the cache is used without touching the network.
    """
    root = cache_root() / "kafka"
    for version in versions:
        libs = root / version / "libs"
        if (libs / ".complete").exists():
            return version, libs
    mvn = require_tool("mvn", "install Maven (Debian: apt-get install maven)")
    failures: list[str] = []
    for version in versions:
        vdir = root / version
        vdir.mkdir(parents=True, exist_ok=True)
        (vdir / "pom.xml").write_text(
            _POM.format(
                scala=SCALA_VERSION,
                version=version,
                log_group=LOG4J_SLF4J_BINDING[0],
                log_artifact=LOG4J_SLF4J_BINDING[1],
                log_version=LOG4J_SLF4J_BINDING[2],
            )
        )
        staging = Path(tempfile.mkdtemp(prefix="libs-", dir=vdir))
        cmd = [
            mvn,
            "-B",
            *(["-q"] if quiet else []),
            "-f",
            str(vdir / "pom.xml"),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={staging}",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)  # noqa: S603
        if proc.returncode != 0 or not any(staging.glob(f"kafka_{SCALA_VERSION}-*.jar")):
            shutil.rmtree(staging, ignore_errors=True)
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
            failures.append(f"{version}: {' | '.join(tail)}")
            continue
        libs = vdir / "libs"
        shutil.rmtree(libs, ignore_errors=True)
        staging.rename(libs)
        (libs / ".complete").write_text(version + "\n")
        return version, libs
    raise ConfigError("no Kafka version resolved from Maven: " + "; ".join(failures))

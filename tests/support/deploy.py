"""Reading the deployment files as the tests check them: docker-compose.yml services and their
environment, every ``fleetbus ...`` command line in it resolved against the real CLI, the
settings' environment names, and the apache/kafka image's rendering of ``KAFKA_*`` variables.
Used by ``unit/test_deploy_files.py``, ``integration/test_compose_kafka.py`` and
``integration/test_helm.py``."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import typer
import yaml
from pydantic import BaseModel

from fleetbus.bus.settings import FleetbusSettings
from fleetbus.cli.main import app as cli_app

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"


def settings_env_names(
    model: type[BaseModel] = FleetbusSettings, prefix: str = "FLEETBUS_"
) -> tuple[set[str], set[str]]:
    """(exact env names, prefixes of free-form dict fields) derived from the pydantic model."""
    exact: set[str] = set()
    open_prefixes: set[str] = set()
    for name, field in model.model_fields.items():
        env = prefix + name.upper()
        exact.add(env)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            sub_exact, sub_open = settings_env_names(annotation, env + "__")
            exact |= sub_exact
            open_prefixes |= sub_open
        elif getattr(annotation, "__origin__", None) in (dict, list):
            open_prefixes.add(env + "__")
    return exact, open_prefixes


def is_settings_env(name: str) -> bool:
    exact, open_prefixes = settings_env_names()
    return name in exact or any(name.startswith(p) for p in open_prefixes)


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return doc


def services() -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = compose()["services"]
    return result


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def resolve_cli(args: list[str]) -> tuple[Any, list[str]]:
    """Walk `fleetbus <group> <command> ...` down the Typer app; return the command and the rest.

    Duck-typed: Typer ships its own copy of click, so isinstance checks against click fail.
    """
    command: Any = typer.main.get_command(cli_app)
    rest = list(args)
    while hasattr(command, "commands") and rest and not rest[0].startswith("-"):
        sub = command.commands.get(rest[0])
        assert sub is not None, f"`fleetbus {' '.join(args)}`: no command {rest[0]!r}"
        command, rest = sub, rest[1:]
    assert not hasattr(command, "commands"), f"`fleetbus {' '.join(args)}` names a group"
    return command, rest


def check_cli(args: list[str]) -> None:
    command, rest = resolve_cli(args)
    known = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}
    given = {token.split("=", 1)[0] for token in rest if token.startswith("--")}
    for option in given:
        assert option in known, f"`fleetbus {' '.join(args)}`: unknown option {option}"
    # The CLI refuses a command line without its required options (an environment variable
    # does not stand in for one unless the option names it).
    for param in command.params:
        if param.required and not param.envvar and param.opts[0].startswith("--"):
            assert given & set(param.opts), (
                f"`fleetbus {' '.join(args)}`: missing required option {param.opts[0]}"
            )


def fleetbus_command_lines() -> list[tuple[str, list[str]]]:
    """(service, argv after `fleetbus`) for every fleetbus invocation in the compose file."""
    out: list[tuple[str, list[str]]] = []
    for name, service in services().items():
        if not str(service.get("image", "")).startswith("fleetbus:"):
            continue
        entrypoint = service.get("entrypoint")
        command = service.get("command")
        if entrypoint is None:
            argv = command if isinstance(command, list) else shlex.split(command or "worker")
            out.append((name, argv))
            continue
        script = "\n".join(command) if isinstance(command, list) else str(command)
        for line in script.splitlines():
            match = re.search(r"(?:^|\s)fleetbus\s+(.*)$", line)
            if match:
                out.append((name, shlex.split(match.group(1))))
    return out


def kafka_properties(env: dict[str, str]) -> dict[str, str]:
    """The apache/kafka image's rendering of KAFKA_* variables into server.properties:
    drop the prefix, lower-case, ``___`` → ``-``, ``__`` → ``_``, ``_`` → ``.``."""
    skip = {"KAFKA_HEAP_OPTS", "KAFKA_OPTS", "KAFKA_JMX_OPTS", "KAFKA_LOG4J_OPTS"}
    props: dict[str, str] = {}
    for key, value in env.items():
        if not key.startswith("KAFKA_") or key in skip:
            continue
        name = key[len("KAFKA_") :].lower()
        name = name.replace("___", "-").replace("__", "\0").replace("_", ".").replace("\0", "_")
        props[name] = value.replace("$$", "$")
    return props

"""The environment side of ``FleetbusSettings``: the reference of every ``FLEETBUS_*`` variable
(docs/settings.md, helm's values schema), unknown-variable detection, and ``load_settings``,
whose errors name the variable, the value and what is allowed.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import SettingsError

from fleetbus.bus.errors import ConfigError
from fleetbus.bus.settings import FleetbusSettings

__all__ = [
    "ENV_PREFIX",
    "OTHER_PREFIXES",
    "OTHER_VARIABLES",
    "describe_settings_error",
    "load_settings",
    "settings_reference",
    "settings_rows",
    "unknown_variables",
]

# --- the settings reference (docs/settings.md) ---------------------------------------------

ENV_PREFIX: typing.Final = "FLEETBUS_"


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return " \\| ".join(f"`{value}`" for value in typing.get_args(annotation))
    if typing.get_origin(annotation) in (types.UnionType, typing.Union):
        names = [_type_name(a) for a in typing.get_args(annotation) if a is not type(None)]
        return " \\| ".join(names) + " (optional)"
    if typing.get_origin(annotation) in (dict, list):
        return "JSON"
    return str(getattr(annotation, "__name__", annotation))


def _limits(info: FieldInfo) -> str:
    words = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    found = []
    for item in info.metadata:
        for attribute, word in words.items():
            if getattr(item, attribute, None) is not None:
                found.append(f"{word} {getattr(item, attribute)}")
    return ", ".join(found)


def _default(info: FieldInfo) -> str:
    value = info.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        value = value.model_dump()
    elif isinstance(value, list | dict):
        value = json.loads(
            json.dumps(value, default=lambda v: v.model_dump(exclude_defaults=False))
        )
    if value is None:
        return "unset"
    if isinstance(value, list | dict):
        return f"`{json.dumps(value, separators=(',', ':'))}`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def settings_rows(
    model: type[BaseModel] | None = None, prefix: str = ENV_PREFIX
) -> list[tuple[str, str, str, str, str]]:
    """(variable, setting, type, default, meaning) of every setting, nested ones expanded."""
    model = model or FleetbusSettings
    rows: list[tuple[str, str, str, str, str]] = []
    for name, info in model.model_fields.items():
        variable = f"{prefix}{name.upper()}"
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            rows.extend(settings_rows(info.annotation, f"{variable}__"))
            continue
        kind = _type_name(info.annotation)
        limits = _limits(info)
        rows.append(
            (
                variable,
                name,
                f"{kind} ({limits})" if limits else kind,
                _default(info),
                info.description or "",
            )
        )
    return rows


def settings_reference() -> str:
    """The settings reference as Markdown: docs/settings.md is this text, checked by a test."""
    lines = [
        "# Settings reference",
        "",
        "<!-- Generated from fleetbus.bus.settings.FleetbusSettings by `fleetbus settings > "
        "docs/settings.md`; tests/unit/test_settings_reference.py checks that it is current. -->",
        "",
        "Every fleetbus process (worker, dispatch and vehicle SDKs, CLI) reads these from the",
        "environment. Nested settings use `__` (`FLEETBUS_TOPICS__PREFIX=acme.`); `JSON` values",
        "are given as JSON text (`FLEETBUS_PROFILES='{\"pqc\": {...}}'`). A value that does not",
        "parse or is out of range stops the process with one line naming the variable, the value",
        "and what is allowed.",
        "",
        "| variable | type | default | meaning |",
        "|---|---|---|---|",
    ]
    for variable, _name, kind, default, meaning in settings_rows():
        meaning = meaning.replace("|", "\\|")
        lines.append(f"| `{variable}` | {kind} | {default} | {meaning} |")
    return "\n".join(lines) + "\n"


# --- loading with errors a person can act on ---------------------------------------------

#: ``FLEETBUS_*`` variables that are not settings but are read elsewhere: log set-up, the dev
#: tooling's cache, the KME simulator's options, the benchmarks, helm and fuzzing in CI.
OTHER_VARIABLES: typing.Final = frozenset(
    {"FLEETBUS_LOG_FORMAT", "FLEETBUS_LOG_LEVEL", "FLEETBUS_CACHE", "FLEETBUS_HELM_VERSION"}
)
OTHER_PREFIXES: typing.Final = ("FLEETBUS_KME_", "FLEETBUS_BENCH_", "FLEETBUS_FUZZ_")


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """``FLEETBUS_*`` names in ``environ`` that no setting and no other part of fleetbus reads
    (``extra="ignore"`` would otherwise drop a misspelt setting without a word)."""
    known = {row[0] for row in settings_rows()} | OTHER_VARIABLES
    return sorted(
        name
        for name in environ
        if name.upper().startswith(ENV_PREFIX)
        and name.upper() not in known
        and not name.upper().startswith(OTHER_PREFIXES)
    )


def _variable(loc: tuple[int | str, ...]) -> tuple[str, FieldInfo | None]:
    """The environment variable of a validation error's location, and its field if known."""
    if not loc:
        return "FLEETBUS_*", None
    name = str(loc[0])
    info = FleetbusSettings.model_fields.get(name)
    variable = f"{ENV_PREFIX}{name.upper()}"
    if info is not None and isinstance(info.annotation, type) and len(loc) > 1:
        nested = getattr(info.annotation, "model_fields", {}).get(str(loc[1]))
        if nested is not None:
            return f"{variable}__{str(loc[1]).upper()}", nested
    if len(loc) > 1:
        variable += " (at " + ".".join(str(part) for part in loc[1:]) + ")"
    return variable, info


def _allowed(info: FieldInfo | None) -> str:
    if info is None:
        return ""
    kind = _type_name(info.annotation).replace("\\|", "|").replace("`", "")
    limits = _limits(info)
    if kind == "str" and not limits:
        return ""  # the message itself says what the text must look like
    return f" (allowed: {kind}{', ' + limits if limits else ''})"


def describe_settings_error(exc: ValidationError | SettingsError) -> str:
    """One line per problem: the variable, the value given and what is allowed."""
    if isinstance(exc, SettingsError):
        # pydantic-settings says only 'error parsing value for field "x"': a JSON setting
        # whose text is not JSON.
        match = re.search(r'field "(?P<name>[a-z_]+)"', str(exc))
        name = match.group("name") if match else "?"
        value = os.environ.get(f"{ENV_PREFIX}{name.upper()}", "")
        allowed = _allowed(FleetbusSettings.model_fields.get(name))
        return f"{ENV_PREFIX}{name.upper()}={value!r}: not valid JSON{allowed}"
    lines = []
    for error in exc.errors(include_url=False):
        variable, info = _variable(tuple(error["loc"]))
        given = error.get("input")
        value = f"={given!r}" if isinstance(given, str | int | float) else ""
        message = str(error["msg"]).removeprefix("Value error, ")
        lines.append(f"{variable}{value}: {message}{_allowed(info)}")
    return "\n".join(lines)


def load_settings(*, strict: bool = False, **overrides: Any) -> FleetbusSettings:
    """``FleetbusSettings()`` whose errors are one ``ConfigError`` line per bad variable, naming
    the variable, the value and what is allowed. ``strict`` also refuses ``FLEETBUS_*``
    variables that nothing reads (a typo), with the closest known name."""
    if strict and (unknown := unknown_variables(os.environ)):
        known = [row[0] for row in settings_rows()]
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name.upper(), known, n=1)
            hints.append(f"{name}" + (f" (did you mean {close[0]}?)" if close else ""))
        raise ConfigError(
            "unknown FLEETBUS_* variable(s): " + ", ".join(hints) + "; `fleetbus settings` "
            "lists the settings"
        )
    try:
        return FleetbusSettings(**overrides)
    except (ValidationError, SettingsError) as exc:
        raise ConfigError(describe_settings_error(exc)) from None

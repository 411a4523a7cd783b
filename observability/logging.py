"""Structured JSON logs with trace correlation and a redaction filter for secrets.

One JSON object per line: time, level, logger, message, the current span's ``trace_id`` and
``span_id``, and the record's ``extra`` fields. Values of keys that look like secrets, and any
``bytes`` value, are masked before anything is formatted, so a mistaken
``log.info("...", extra={"private_key": ...})`` never reaches a log file.

``configure_logging`` is what the long-running commands (``fleetbus worker``, ``fleetbus fleet
simulate``) call: JSON lines by default, plain text (``FLEETBUS_LOG_FORMAT=text``) for a human at
a terminal; both redacted.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final, TextIO

from fleetbus.bus.errors import ConfigError
from fleetbus.observability.tracing import current_ids

#: What a masked value is replaced with.
REDACTED: Final = "[redacted]"

#: Environment variables of the process-wide log set-up (also read by the CLI options).
LOG_FORMAT_ENV: Final = "FLEETBUS_LOG_FORMAT"
LOG_LEVEL_ENV: Final = "FLEETBUS_LOG_LEVEL"
#: The layout of ``--log-format text``: one line per record, trace id when there is one.
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class LogFormat(StrEnum):
    """How a fleetbus process writes its log records to stderr."""

    JSON = "json"
    TEXT = "text"


#: Key names whose values are never logged (matched case-insensitively, anywhere in the name):
#: ``private_key``, ``api_token``, ``db_password``, ``client_secret``, ``key_material`` ...
SECRET_KEY_PATTERN: Final = re.compile(
    r"(key|secret|private|token|passw(or)?d|credential|material|seed)", re.IGNORECASE
)
#: Key names matching SECRET_KEY_PATTERN that are known to hold identifiers, not secrets.
NOT_SECRET_KEYS: Final = frozenset(
    {"key_id", "key_ids", "kid", "message_key", "record_key", "keypath", "key_path", "key_paths"}
)

# Attributes every LogRecord has; anything else came from ``extra=``.
_STANDARD_ATTRS: Final = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
    | {"message", "asctime", "taskName"}
)
_MAX_DEPTH: Final = 6


def is_secret_key(name: str) -> bool:
    """Whether values under this key name are masked."""
    return name.lower() not in NOT_SECRET_KEYS and SECRET_KEY_PATTERN.search(name) is not None


def redact(value: Any, *, _depth: int = 0) -> Any:
    """A copy of ``value`` with secret-looking keys and all bytes masked (recursively)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return f"[{len(value)} bytes]"
    if _depth >= _MAX_DEPTH:
        return "[...]"
    if isinstance(value, Mapping):
        return {
            str(k): REDACTED if is_secret_key(str(k)) else redact(v, _depth=_depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [redact(v, _depth=_depth + 1) for v in value]
    return value


class RedactingFilter(logging.Filter):
    """Masks secret-looking ``extra`` fields and bytes in a record, in place, before formatting.

    Attach it to handlers (not loggers) so it also covers records propagated from children.
    Message arguments are masked too when they are bytes.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        for name in list(vars(record)):
            if name in _STANDARD_ATTRS:
                continue
            value = getattr(record, name)
            if is_secret_key(name):
                setattr(record, name, REDACTED)
            else:
                setattr(record, name, redact(value))
        if isinstance(record.args, Mapping):
            record.args = redact(record.args)
        elif isinstance(record.args, tuple):
            record.args = tuple(redact(a) for a in record.args)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record, with trace_id/span_id of the span current at emit time."""

    def __init__(self, *, service: str | None = None) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.service:
            out["service"] = self.service
        ids = current_ids()
        if ids is not None:
            out["trace_id"], out["span_id"] = ids
        for name, value in vars(record).items():
            if name not in _STANDARD_ATTRS and name not in out:
                out[name] = value
        if record.exc_info and record.exc_info[0] is not None:
            # Type and message only: tracebacks can hold local variables' reprs in some
            # handlers, and our exception messages are written to be secret-free.
            exc = record.exc_info[1]
            out["error"] = {"type": record.exc_info[0].__name__, "message": str(exc)}
            reason = getattr(exc, "reason", None)
            if reason is not None:
                out["error"]["reason"] = str(reason)
        return json.dumps(redact(out), default=str, ensure_ascii=False, sort_keys=False)


class TextFormatter(logging.Formatter):
    """``TEXT_FORMAT`` plus `` trace_id=...`` inside a span, and ``type: message`` (no
    traceback, as in JSON) for exceptions."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text
        record.exc_info, record.exc_text = None, None
        try:
            line = super().format(record)
        finally:
            record.exc_info, record.exc_text = saved
        ids = current_ids()
        if ids is not None:
            line += f" trace_id={ids[0]}"
        if record.exc_info and record.exc_info[0] is not None:
            line += f" [{record.exc_info[0].__name__}: {record.exc_info[1]}]"
        return line


def setup_logging(
    service: str,
    *,
    level: int | str = logging.INFO,
    stream: TextIO | None = None,
    log_format: LogFormat | str = LogFormat.JSON,
) -> logging.Handler:
    """Route the root logger to one handler (JSON lines, or text) with the redaction filter;
    returns it.

    Replaces handlers this function installed before (idempotent), leaves others alone.
    """
    fmt = LogFormat(log_format)
    root = logging.getLogger()
    for existing in list(root.handlers):
        if getattr(existing, "_fleetbus_json", False):
            root.removeHandler(existing)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        JsonFormatter(service=service) if fmt is LogFormat.JSON else TextFormatter()
    )
    handler.addFilter(RedactingFilter())
    handler._fleetbus_json = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    return handler


def resolve_log_format(
    log_format: LogFormat | str | None = None, *, environ: Mapping[str, str] | None = None
) -> LogFormat:
    """``log_format`` if given, else ``FLEETBUS_LOG_FORMAT``, else json."""
    env = os.environ if environ is None else environ
    raw = str(log_format if log_format is not None else env.get(LOG_FORMAT_ENV) or LogFormat.JSON)
    try:
        return LogFormat(raw.strip().lower())
    except ValueError:
        raise ConfigError(
            f"log format {raw!r} ({LOG_FORMAT_ENV}) is not one of json, text"
        ) from None


def configure_logging(
    service: str,
    *,
    log_format: LogFormat | str | None = None,
    level: int | str | None = None,
    default_level: int | str = logging.INFO,
    environ: Mapping[str, str] | None = None,
    stream: TextIO | None = None,
) -> logging.Handler:
    """The log set-up of a long-running fleetbus process: ``setup_logging`` with the format
    and level given, else ``FLEETBUS_LOG_FORMAT`` (default json) and ``FLEETBUS_LOG_LEVEL``
    (default ``default_level``). Python warnings become log records too, so that every line
    the process writes to stderr is in the chosen format.
    """
    env = os.environ if environ is None else environ
    fmt = resolve_log_format(log_format, environ=env)
    lvl: int | str = level if level is not None else env.get(LOG_LEVEL_ENV) or default_level
    if isinstance(lvl, str):
        lvl = lvl.strip().upper()
        if lvl not in logging.getLevelNamesMapping():
            raise ConfigError(f"log level {lvl!r} ({LOG_LEVEL_ENV}) is not a logging level")
    handler = setup_logging(service, level=lvl, stream=stream, log_format=fmt)
    logging.captureWarnings(True)
    return handler

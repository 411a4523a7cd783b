"""Structured JSON logs with trace correlation and a redaction filter for secrets.

One JSON object per line: time, level, logger, message, the current span's ``trace_id`` and
``span_id``, and the record's ``extra`` fields. Values of keys that look like secrets, and any
``bytes`` value, are masked before anything is formatted, so a mistaken
``log.info("...", extra={"private_key": ...})`` never reaches a log file.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final, TextIO

from fleetbus.observability.tracing import current_ids

#: What a masked value is replaced with.
REDACTED: Final = "[redacted]"

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


def setup_logging(
    service: str, *, level: int | str = logging.INFO, stream: TextIO | None = None
) -> logging.Handler:
    """Route the root logger to one JSON handler with the redaction filter; returns it.

    Replaces handlers this function installed before (idempotent), leaves others alone.
    """
    root = logging.getLogger()
    for existing in list(root.handlers):
        if getattr(existing, "_fleetbus_json", False):
            root.removeHandler(existing)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(service=service))
    handler.addFilter(RedactingFilter())
    handler._fleetbus_json = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    return handler

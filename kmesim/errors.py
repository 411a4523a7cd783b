"""ETSI 014 error responses, as the 014 error body ``{"message": ..., "details": [...]}``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


class KMEError(Exception):
    """An ETSI 014 error response. ``message`` and ``details`` never carry key material."""

    status = 503

    def __init__(self, message: str, details: Sequence[Mapping[str, Any]] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.details = [dict(d) for d in details]

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"message": self.message}
        if self.details:
            out["details"] = self.details
        return out


class KMEBadRequest(KMEError):
    status = 400


class KMEUnauthorized(KMEError):
    status = 401


class KMEUnavailable(KMEError):
    status = 503

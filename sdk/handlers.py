"""What a vehicle agent runs for a command: handlers and their result."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fleetbus.bus.commands import Command

__all__ = ["Handler", "HandlerResult", "VehicleHandler", "call_handler"]


@dataclass(frozen=True)
class HandlerResult:
    """What a handler reports: an HTTP-like status (2xx done, 4xx refused, 5xx failed)."""

    status: int = 200
    detail: str = ""


#: A command handler. Returning None means 200; raising means 500 (the message is not sent).
Handler = Callable[[Command], HandlerResult | None]


@dataclass(frozen=True)
class VehicleHandler:
    """A handler told which vehicle it runs for, ``fn(vehicle_id, command)``: an agent serves
    many vehicles, so wrap a function in it where that matters (a per-vehicle simulator, a
    journal)::

        handlers={"unlock_doors": VehicleHandler(lambda vid, command: unlock(vid, command))}
    """

    fn: Callable[[str, Command], HandlerResult | None]

    def __call__(self, vehicle_id: str, command: Command) -> HandlerResult | None:
        return self.fn(vehicle_id, command)


def call_handler(
    handler: Handler | VehicleHandler, vehicle_id: str, command: Command
) -> HandlerResult | None:
    """Run ``handler`` for ``vehicle_id``'s ``command`` (a plain ``Handler`` gets the command)."""
    if isinstance(handler, VehicleHandler):
        return handler(vehicle_id, command)
    return handler(command)

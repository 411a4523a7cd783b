"""The simulated fleet's command handlers (``fleetbus fleet simulate``, the demo). Kept apart from
``devtools.fleet`` so that the CLI imports no provider to build them."""

from __future__ import annotations

from fleetbus.bus.commands import Command
from fleetbus.sdk.vehicle import Handler, HandlerResult


def default_handlers(fail_action: str = "fail") -> dict[str, Handler]:
    """The simulated fleet's handlers (``fleetbus fleet simulate``, the demo): the usual actions
    answer 200, ``fail_action`` raises."""

    def ok(command: Command) -> HandlerResult:
        return HandlerResult(200, f"{command.action} done")

    def fail(command: Command) -> HandlerResult:
        raise RuntimeError(f"simulated failure of {command.action}")

    handlers: dict[str, Handler] = {
        action: ok
        for action in (
            # The bus's built-in action catalogue (docs/policy.md) first, then extras that a
            # registry file may list.
            "ping",
            "unlock_doors",
            "lock_doors",
            "set_battery_profile",
            "push_route",
            "disable_vehicle",
            "push_firmware",
            "honk",
            "flash_lights",
            "set_climate",
            "start_charging",
            "stop_charging",
            "immobilize",
            "release_immobilizer",
        )
    }
    handlers[fail_action] = fail
    return handlers

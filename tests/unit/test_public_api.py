"""The public surface of fleetbus.bus is small, sorted and pinned."""

from __future__ import annotations

import fleetbus.bus


def test_all_is_sorted_and_importable() -> None:
    names = fleetbus.bus.__all__
    assert list(names) == sorted(names)
    for name in names:
        assert getattr(fleetbus.bus, name) is not None

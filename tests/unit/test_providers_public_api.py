"""The public surface of fleetbus.providers is stated in its ``__all__``, sorted and pinned."""

from __future__ import annotations

import types

import fleetbus.providers


def test_all_is_sorted_and_importable() -> None:
    names = fleetbus.providers.__all__

    # isort style, as ruff's RUF022 keeps it: constants, then classes, then functions.
    def kind(name: str) -> tuple[int, str]:
        return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)

    assert list(names) == sorted(names, key=kind)
    assert len(set(names)) == len(names)
    for name in names:
        assert getattr(fleetbus.providers, name) is not None


def test_all_equals_what_the_package_exports() -> None:
    exported = {
        name
        for name, value in vars(fleetbus.providers).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert exported == set(fleetbus.providers.__all__)


def test_every_key_provider_entry_point_is_exported() -> None:
    from fleetbus.bus.registry import KEY_PROVIDER_GROUP, available, key_provider_class

    for name in available(KEY_PROVIDER_GROUP):
        cls = key_provider_class(name)
        assert getattr(fleetbus.providers, cls.__name__) is cls

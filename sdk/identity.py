"""A vehicle's own keys and the verified key directory an agent needs, from a ``fleetbus keys``
folder."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fleetbus.bus.directory import (
    WHOLE_DIRECTORY,
    KeyDirectory,
    PrincipalKeyFile,
    RootPublicKey,
    head_store_for,
    load_directory,
    load_key_file,
    vehicle_agent_scope,
)
from fleetbus.bus.errors import ConfigError
from fleetbus.bus.keyfolder import KeyFolder
from fleetbus.bus.keys import PrivateKeySet, Signer

__all__ = ["VehicleIdentity", "load_key_directory"]


@dataclass(frozen=True)
class VehicleIdentity:
    """One vehicle's (or edge unit's) own keys: KEM private keys to open, a signer to answer."""

    vehicle_id: str
    keys: PrivateKeySet
    signer: Signer

    @classmethod
    def from_key_file(cls, key_file: PrincipalKeyFile) -> VehicleIdentity:
        return cls(key_file.principal_id, key_file.key_set(), key_file.signer())

    @classmethod
    def load(cls, keys_dir: str | Path, vehicle_id: str) -> VehicleIdentity:
        """Load ``<keys_dir>/<vehicle_id>.key`` (a ``fleetbus keys`` private key file)."""
        key_file = load_key_file(KeyFolder(Path(keys_dir).expanduser()).private_key(vehicle_id))
        if key_file.principal_id != vehicle_id:
            raise ConfigError(f"{vehicle_id}.key holds the keys of {key_file.principal_id!r}")
        return cls.from_key_file(key_file)


def load_key_directory(
    keys_dir: str | Path,
    *,
    state_dir: str | Path | None = None,
    vehicles: Iterable[str] | None = None,
) -> KeyDirectory:
    """The verified key directory of a ``fleetbus keys`` folder (root.pub, directory.cbor).

    The highest directory head accepted is kept in ``state_dir`` (default: the keys folder), so
    a restart with an older directory file is refused. With ``vehicles`` (the ids an agent
    serves) only what an agent needs is held: the common set (root, sealers, dispatchers,
    approvers, edge units) and those vehicles' own records, never the rest of the fleet.
    """
    folder = Path(keys_dir).expanduser()
    try:
        root = RootPublicKey.from_bytes(KeyFolder(folder).root_pub.read_bytes())
    except FileNotFoundError:
        raise ConfigError(
            f"{KeyFolder(folder).root_pub} not found; run `fleetbus keys init`"
        ) from None
    state = Path(state_dir).expanduser() if state_dir else folder
    scope = WHOLE_DIRECTORY if vehicles is None else vehicle_agent_scope(vehicles)
    return load_directory(
        KeyFolder(folder).directory, root, head_store=head_store_for(state, root), scope=scope
    )

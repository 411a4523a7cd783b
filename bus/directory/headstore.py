"""The highest directory head a loader has accepted, kept across restarts."""

from __future__ import annotations

from pathlib import Path

from fleetbus.bus.directory.heads import SignedDirectoryHead, verify_signed_head
from fleetbus.bus.directory.trust import RootPublicKey
from fleetbus.bus.errors import ConfigError, FleetbusError
from fleetbus.bus.files import write_atomic
from fleetbus.bus.keyfolder import KeyFolder

# --- the highest accepted head, kept across restarts ----------------------------------------


class HeadStore:
    """The highest directory head a loader has accepted, in one file, kept across restarts.

    The file holds the signed head, so it is re-verified against the pinned root at each start.
    It protects against older material handed to the loader (a stale ``directory.cbor``, a
    replayed topic), not against someone who can rewrite the loader's own state folder.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def load(self, root: RootPublicKey) -> SignedDirectoryHead | None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            signed = SignedDirectoryHead.from_cbor(data)
            verify_signed_head(signed, root)
        except FleetbusError as exc:
            raise ConfigError(
                f"{self.path} does not hold a directory head signed by the pinned root "
                f"({exc.reason}); delete it only if the fleet root was deliberately replaced"
            ) from None
        return signed

    def save(self, signed: SignedDirectoryHead) -> None:
        """Keep ``signed`` unless the file already holds a higher head (another process of the
        same folder got further)."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            if SignedDirectoryHead.from_cbor(self.path.read_bytes()).head.seq > signed.head.seq:
                return
        except (FileNotFoundError, FleetbusError):
            pass  # nothing (valid) to keep; load() verifies whatever is there at the next start
        # The folder is synced too: a rename lost to a power cut would bring back the older
        # head, and with it the rollback window this file exists to close.
        write_atomic(self.path, signed.to_cbor(), 0o644, sync_folder=True)


def head_store_for(folder: Path, root: RootPublicKey) -> HeadStore:
    """The head store of loaders of ``root``'s directory in ``folder`` (one file per root, so
    a state folder that outlives a fleet root never mixes two fleets' sequences)."""
    return HeadStore(KeyFolder(folder).head_store(root.key_id))

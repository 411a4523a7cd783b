"""The two ends of one key provider, as the contract suite and provider fixtures hand them over."""

from __future__ import annotations

from dataclasses import dataclass

from fleetbus.bus.keys import KeyProvider, PrivateKeySet, RecipientKeys


@dataclass(frozen=True)
class ProviderSides:
    """``sender`` establishes to ``recipient``; ``receiver`` recovers with ``own``.

    For KEM providers both sides may be the same instance; for QKD they talk to different KMEs.
    """

    sender: KeyProvider
    receiver: KeyProvider
    recipient: RecipientKeys
    own: PrivateKeySet

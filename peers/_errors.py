"""The errors the peer network raises to its callers (re-exported from `peers`).

Kept apart from the code that raises them so every private module of `peers` (dialling,
the capacity protocol, the composition) can raise the same types without importing each
other.
"""

from __future__ import annotations


class NetworkError(Exception):
    """Bad network configuration (e.g. a malformed bootstrap address)."""


class PeerUnavailable(Exception):
    """A peer could not be reached, or did not answer in time."""


class ProtocolRefused(PeerUnavailable):
    """The peer answered "na": it does not serve that protocol (a clean refusal, not
    misbehaviour; an older or different peer)."""


class CapacityError(Exception):
    """A capacity fetch failed: the peer refused, timed out or spoke nonsense."""

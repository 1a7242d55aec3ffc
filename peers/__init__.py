"""The network and who is on it: libp2p host, identity, mDNS, DHT records, trust, peer table.

Public names are loaded on first use, so `import peers.identity` (the CLI, tests) does
not pay for the libp2p host and DHT imports.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "PeerNetwork": "peers.network",
    "NetworkLimits": "peers.network",
    "NetworkError": "peers.network",
    "PeerUnavailable": "peers.network",
    "CapacityError": "peers.network",
    "PeerTable": "peers.table",
    "PeerEntry": "peers.table",
    "Host": "peers.host",
    "HostError": "peers.host",
    "make_host": "peers.host",
}

__all__ = [
    "CapacityError",
    "Host",
    "HostError",
    "NetworkError",
    "NetworkLimits",
    "PeerEntry",
    "PeerNetwork",
    "PeerTable",
    "PeerUnavailable",
    "make_host",
]

if TYPE_CHECKING:
    from peers.host import Host, HostError, make_host
    from peers.network import (
        CapacityError,
        NetworkError,
        NetworkLimits,
        PeerNetwork,
        PeerUnavailable,
    )
    from peers.table import PeerEntry, PeerTable


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'peers' has no attribute {name!r}")
    return getattr(import_module(module), name)

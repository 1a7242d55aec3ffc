"""The network and who is on it: libp2p host, identity, mDNS, DHT records, trust, peer table.

The names below are the package's public surface (as trio and httpx do it: private
modules behind one `__init__`). `PeerNetwork` is the composition; its parts live in
`peers/_*.py` and are not imported from outside `peers`. The other public modules
(`peers.identity`, `peers.trust`, `peers.mesh`, `peers.records`, `peers.device`,
`peers.relay`, `peers.dht`, ...) are imported by name as before.

Imported eagerly: `import peers.identity` already loads py-libp2p (its package import
pulls in the DHT and zeroconf), and the rest of the network adds little on top
(measured here: 0.91 s -> 0.99 s), too little to justify lazy attributes. No module in
`peers/` imports this package (`from peers import ...`), so there is no import circle.
"""

from __future__ import annotations

from peers._errors import CapacityError, NetworkError, PeerUnavailable, ProtocolRefused
from peers._limits import NetworkLimits
from peers._network import PeerNetwork
from peers._streams import peer_ended_stream
from peers.host import Host, HostError, make_host
from peers.identity import short_peer_id
from peers.table import PeerEntry, PeerTable

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
    "ProtocolRefused",
    "make_host",
    "peer_ended_stream",
    "short_peer_id",
]

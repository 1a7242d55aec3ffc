"""py-libp2p 0.8.1 log lines that report expected events at WARNING or ERROR, demoted to
DEBUG (so they show only with `--log-level debug`).

The library logs many ordinary mesh events as errors, and most of them right before it
raises the same failure to its caller, where qvacd reports it in its own words and acts
on it: a dial to an address nobody answers at ("dial failed ..." at INFO, and the peer
table's back-off), a stream that could not be opened (PeerUnavailable / CapacityError),
a DHT query or store to a peer that just went away (the put counts its replicas and is
retried; the routing table is refilled by our refresh loop), a connection that died
under the muxer (the table marks the peer disconnected, the router fails over). One
mesh-lab run printed hundreds of "MultiselectClient handshake: read failed" lines; a
60 s run of 4 peers restarted by kill -9 around one node printed 112 "Failed to open
TCP stream" and 18 DHT "Failed to ..." lines, none of them news to qvacd.

Only the lines listed here are demoted, matched by logger and message start; every other
WARNING and ERROR from the library (a listener that cannot bind, a maintenance loop or
a notifee that raised, an unexpected muxer error) still comes through as it is.
"""

from __future__ import annotations

import logging
import re

# logger name -> message patterns (re.match) of expected events, each with why
_EXPECTED: dict[str, tuple[str, ...]] = {
    # dial to an address nobody listens at any more: raised as OpenConnectionError;
    # qvacd logs "dial failed" and backs off
    "libp2p.transport.tcp.tcp": (r"Failed to open TCP stream",),
    # another peer (or no libp2p) answered at that address: raised to the dialler
    "libp2p.network.swarm": (r"failed to upgrade security for peer",),
    # new_stream failed (peer gone, protocol not served): raised to the opener
    "libp2p.host.basic_host": (r"Failed to open stream to peer",),
    # the stream was reset or its connection closed while negotiating: raised
    "libp2p.protocol_muxer.multiselect_client": (
        r"MultiselectClient handshake: (read|write) failed",
    ),
    # DHT queries and stores to peers that went away; our put counts replicas and
    # retries, our refresh loop re-adds connected peers to the routing table
    "libp2p.kad_dht.peer_routing": (r"Failed to open stream to",),
    "libp2p.kad_dht.value_store": (
        r"Failed to store value at peer",
        r"Failed to get value from peer",
    ),
    "libp2p.kad_dht.provider_store": (
        r"(Error|Failed to) send(ing)? ADD_PROVIDER to",
        r"(Error|Failed to) get(ting)? providers from",
    ),
    # every DHT stream its peer closed normally, several per lookup, with an empty error;
    # real read errors carry a message and still get through
    "libp2p.kad_dht.kad_dht": (r"Failed to read DHT message from stream: $",),
    # a hop stream its peer closed normally (empty error), after a reservation
    "libp2p.relay.circuit_v2.protocol": (r"Error reading from hop stream from \S+: $",),
    # the peer's connection died under the muxer (killed, network gone); qvacd sees the
    # disconnect
    "libp2p.stream_muxer.yamux.yamux": (
        r"Yamux connection closed unexpectedly for peer",
        r"RawConnError during connection handling for peer",
        r"Incomplete read in handle_incoming for peer",
    ),
}


class _DemoteExpected(logging.Filter):
    """Turn a matching WARNING/ERROR record into a DEBUG one; drop it unless its logger
    is enabled for DEBUG (the logger's level check has already passed at the old level)."""

    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self._patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        msg = record.getMessage()
        if not any(p.match(msg) for p in self._patterns):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


_installed = False


def demote_expected_libp2p_errors() -> None:
    """Install the filters on py-libp2p's loggers; idempotent (make_host calls it)."""
    global _installed
    if _installed:
        return
    _installed = True
    for name, patterns in _EXPECTED.items():
        logging.getLogger(name).addFilter(_DemoteExpected(patterns))

"""The libp2p host: TCP + Noise + yamux, nothing else.

Why only these: Noise is the one secure channel every libp2p speaks, and the library's
default list also offers *plaintext* and secio, which would let a peer claim any peer id
without proving it holds the key. yamux is 4-5x faster than mplex here; QUIC is slower
still (see /shared/py-libp2p-0.8.1.md).

`make_host` builds a host that is not yet running; `Host.run()` binds the listen
addresses (failing loudly if none could be bound) and keeps the host up for the
duration of the `async with`.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager

import ifaddr
import multiaddr
from libp2p import create_yamux_muxer_option, new_host
from libp2p.abc import IHost
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport

from peers._libp2p_logs import demote_expected_libp2p_errors
from peers._swarm_fix import apply_inbound_slot_fix

log = logging.getLogger("qvacd.peers.host")

# why: py-libp2p's yamux sends a WINDOW_UPDATE frame after every read by default (one
# Noise-encrypted write per message received); go-yamux batches them until half the
# window is consumed. Batching is what the protocol intends and took ~10% off an idle
# mesh node's CPU and a puller's. The library reads it at call time; a user's own
# setting wins.
os.environ.setdefault("PY_YAMUX_RELEASE_ON_READ", "0")

DEFAULT_LISTEN = ("/ip4/0.0.0.0/tcp/4001",)


class HostError(Exception):
    """The host could not be built or could not listen."""


def _parse_addrs(addrs: Sequence[str | multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
    out = []
    for a in addrs:
        try:
            m = a if isinstance(a, multiaddr.Multiaddr) else multiaddr.Multiaddr(a)
        except Exception as exc:
            raise HostError(
                f"bad listen address {a!r} ({exc}); use e.g. /ip4/0.0.0.0/tcp/4001"
            ) from None
        protos = [p.name for p in m.protocols()]
        if len(protos) != 2 or protos[0] not in ("ip4", "ip6") or protos[1] != "tcp":
            raise HostError(
                f"listen address {a} is not /ip4|ip6/<addr>/tcp/<port>; only TCP is supported"
            )
        out.append(m)
    return out


def interface_ips(version: int) -> list[str]:
    """This machine's IP addresses of one version, non-loopback first, link-local excluded."""
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            raw = ip.ip[0] if isinstance(ip.ip, tuple) else ip.ip
            try:
                addr = ipaddress.ip_address(raw)
            except ValueError:
                continue
            if addr.version != version or addr.is_link_local or addr in ips:
                continue
            ips.append(addr)
    ips.sort(key=lambda a: (a.is_loopback, str(a)))
    return [str(a) for a in ips]


def expand_wildcards(addrs: Sequence[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
    """Replace 0.0.0.0 / :: with each interface address: peers cannot dial a wildcard."""
    out: list[multiaddr.Multiaddr] = []
    seen: set[str] = set()
    for m in addrs:
        protos = [p.name for p in m.protocols()]
        expanded = [m]
        if protos and protos[0] in ("ip4", "ip6"):
            ip = m.value_for_protocol(protos[0])
            if ip in ("0.0.0.0", "::"):
                version = 4 if protos[0] == "ip4" else 6
                rest = str(m).split("/", 3)[3]  # "tcp/<port>[/...]"
                expanded = [
                    multiaddr.Multiaddr(f"/{protos[0]}/{i}/{rest}") for i in interface_ips(version)
                ]
        for e in expanded:
            if str(e) not in seen:
                seen.add(str(e))
                out.append(e)
    return out


class Host:
    """A libp2p host (`.libp2p`) plus the addresses it was asked to listen on."""

    def __init__(self, libp2p_host: IHost, listen_addrs: list[multiaddr.Multiaddr]) -> None:
        self.libp2p = libp2p_host
        self.requested_addrs = listen_addrs
        self.peer_id: ID = libp2p_host.get_id()

    @property
    def peer_id_str(self) -> str:
        return self.peer_id.to_base58()

    def bound_addrs(self) -> list[multiaddr.Multiaddr]:
        """Actual bound TCP addresses (port 0 resolved, wildcards expanded), no /p2p."""
        return expand_wildcards(self.libp2p.get_transport_addrs())

    def listen_addrs(self) -> list[str]:
        """Dialable addresses with our /p2p/<id> suffix, as strings."""
        return [f"{a}/p2p/{self.peer_id_str}" for a in self.bound_addrs()]

    @asynccontextmanager
    async def run(self) -> AsyncIterator[Host]:
        """Listen and serve until the block exits; HostError if nothing could be bound."""
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(self.libp2p.run(listen_addrs=self.requested_addrs))
            if not self.libp2p.get_transport_addrs():
                # why close first: raised inside the library's nursery, the error would
                # reach the caller wrapped in an ExceptionGroup
                await stack.aclose()
                raise HostError(
                    "could not listen on "
                    + ", ".join(str(a) for a in self.requested_addrs)
                    + " (port in use or address not on this machine); pick another --listen"
                )
            log.info(
                "host up peer_id=%s listen=%s",
                self.peer_id_str,
                ",".join(self.listen_addrs()),
            )
            yield self


def make_host(
    keypair: KeyPair,
    listen_addrs: Sequence[str | multiaddr.Multiaddr] = DEFAULT_LISTEN,
    *,
    connection_config: ConnectionConfig | None = None,
) -> Host:
    """A not-yet-running host for `keypair`: TCP + Noise + yamux, inbound-slot fix applied
    (and the library's expected-event errors demoted to DEBUG: peers/_libp2p_logs.py)."""
    demote_expected_libp2p_errors()
    maddrs = _parse_addrs(listen_addrs or DEFAULT_LISTEN)
    # why max_connections_per_peer=1: the library otherwise dials extra connections and
    # waits for them; connect drops from ~250 ms to ~7 ms.
    config = connection_config or ConnectionConfig(max_connections_per_peer=1)
    noise = NoiseTransport(keypair, noise_privkey=create_x25519_key_pair().private_key)
    h = new_host(
        key_pair=keypair,
        sec_opt={NOISE_PROTOCOL_ID: noise},
        muxer_opt=create_yamux_muxer_option(),
        listen_addrs=maddrs,
        connection_config=config,
        # Advertise real interface addresses (identify, DHT), never 0.0.0.0.
        addrs_factory=expand_wildcards,
    )
    apply_inbound_slot_fix(h.get_network())
    return Host(h, maddrs)


def parse_peer_addrs(
    addrs: Iterable[str], what: str, error: type[Exception]
) -> dict[str, list[multiaddr.Multiaddr]]:
    """MULTIADDR/p2p/PEERID strings -> {peer id: [addresses without /p2p]}; a bad one
    raises `error` with a one-line message naming `what` it was (bootstrap, relay)."""
    from libp2p.peer.peerinfo import info_from_p2p_addr

    out: dict[str, list[multiaddr.Multiaddr]] = {}
    for a in addrs:
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(a))
        except Exception:
            raise error(
                f"bad {what} address {a!r}; expected /ip4/<ip>/tcp/<port>/p2p/<peer id>"
            ) from None
        out.setdefault(info.peer_id.to_base58(), []).extend(info.addrs)
    return out

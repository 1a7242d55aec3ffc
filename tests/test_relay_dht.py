"""Relays found in the DHT (issue 8), on real PeerNetworks over 127.0.0.1 in one trio
process: two relays announce themselves; the first one a private node tries refuses it,
and it reserves on the next. The NAT lab version is in test_relay.py."""

from __future__ import annotations

import logging

import pytest
import trio
from test_network_support import LOOPBACK, FakeCapacity, wait_until

from peers.dht import RELAY_KEY_SHA256
from peers.identity import Identity
from peers import PeerNetwork
from peers.relay import RelayOptions


def net(relay: RelayOptions, bootstrap: list[str] = ()) -> PeerNetwork:
    return PeerNetwork(Identity.generate(), capacity_source=FakeCapacity(),
                       listen_addrs=LOOPBACK, bootstrap=bootstrap, mdns=False, relay=relay)


@pytest.mark.timeout(60)
async def test_private_node_reserves_on_next_dht_relay_after_a_refusal(caplog) -> None:
    caplog.set_level(logging.INFO, logger="qvacd.peers.relay")
    refusing = net(RelayOptions(service=True, allow=("12D3KooWSomeoneElse",), hole_punch=False))
    willing = net(RelayOptions(service=True, hole_punch=False))
    async with refusing, willing:
        b = net(RelayOptions(hole_punch=False, dht_max=1, dht_backoff_s=0.5),
                bootstrap=[refusing.listen_addrs()[0], willing.listen_addrs()[0]])
        seen: list[list[str]] = []
        find = b.relay._find_relays
        assert find is not None

        async def refusing_first() -> list[tuple[str, list[str]]]:
            found = await find()
            seen.append([p for p, _ in found])
            return sorted(found, key=lambda f: f[0] != refusing.peer_id_str)

        b.relay._find_relays = refusing_first
        b.relay._needs_relay = lambda: True  # on loopback every node is public
        async with b:
            await wait_until(lambda: any(r["state"] == "reserved"
                                         for r in b.relay.status()["reservations"]), 30)
            [res] = b.relay.status()["reservations"]
            assert (res["relay"], res["source"]) == (willing.peer_id_str, "dht")
            assert any(c.endswith(f"/p2p/{willing.peer_id_str}/p2p-circuit/p2p/"
                                  f"{b.peer_id_str}") for c in b.relay.circuit_addrs())
            # both relays came from the DHT; the refusing one was tried and let go
            assert refusing.peer_id_str in {p for s in seen for p in s}
            assert willing.peer_id_str in {p for s in seen for p in s}
            assert refusing.relay.protocol.counters["reservations_refused"] >= 1
            assert f"{refusing.peer_id_str} refused the reservation: PERMISSION_DENIED" \
                in caplog.text
            assert f"using relay {willing.peer_id_str} found in the DHT" in caplog.text
            # within dht_max=1: no second search while this reservation works
            n = len(seen)
            await trio.sleep(3)
            assert len(seen) == n
            # the relays announced the well-known key; B is not a relay and did not
            assert willing.dht.kad.provider_store.get_providers(
                bytes.fromhex("1220" + RELAY_KEY_SHA256))
            provs = await b.dht.find_providers(RELAY_KEY_SHA256)
            assert b.peer_id not in {i.peer_id for i in provs}

"""Kademlia DHT (py-libp2p KadDHT, server mode) for capacity records and model providers.

Keys:
    /qvac-cap/<peer id>     value: that peer's signed capacity record (RecordValidator),
                            stored at the peers closest to sha256-multihash(key)
    1220<sha256 of file>    provider records (the file's sha2-256 multihash): "who can
                            serve these bytes"
    1220<sha256 of "/qvac/relay/1">  provider records of nodes that run a relay service

The DHT is a hint, and it is stale in known ways (see /shared/py-libp2p-0.8.1.md):
- KadDHT.get_value answers from the local store first if it has *any* copy, and values
  live 24 h, so `lookup_capacity` never uses it: it asks the closest peers itself and
  keeps the valid record with the highest seq (records also expire within minutes).
- Provider records live 48 h and provider sets can be partial or duplicated, so
  `find_providers` de-duplicates, and the caller drops providers whose fresh record says
  they no longer hold the model.
- Routing tables fill slowly; `discover_peers` does a self-lookup (FIND_NODE for our own
  id), which both fills the table and returns the peers near us. The library also drops
  a peer from its table after one failed query; the network re-adds connected peers.
- Every stream costs ~10 ms of CPU in py-libp2p and a network walk opens ~30 of them, so
  lookups ask the `REPLICAS` closest peers of our own routing table first (until
  `LOOKUP_QUORUM` of them had the record) and walk only if that finds nothing; puts (every 30 s, rare next to lookups) go to the closest
  of both our table and a walk, so either kind of lookup finds them.
- A FIND_NODE key must decode as a multihash or be at most 50 bytes, or the remote
  drops the query ("FIND_NODE key is not a valid PeerId"). KadDHT.put_value and
  provide() send the raw key, so "/qvac-cap/<id>" (62 bytes) would never get past the
  first hop. Hence: records are placed at the peers closest to sha256-multihash(key)
  (our own put and lookup agree on that), and models are provided under the sha256
  multihash of the file itself, which is also what content addressing means.

Strict validation is on: only namespaces with a validator (qvac-cap, pk, ipns) can be
stored here, so a peer cannot fill our value store with arbitrary keys.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable

import trio
from libp2p.abc import IHost
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.records.utils import InvalidRecordType

from peers.records import (
    CAPACITY_NAMESPACE,
    CapacityRecord,
    RecordError,
    RecordValidator,
    capacity_key,
    verify_record,
)

log = logging.getLogger("qvacd.peers.dht")

PUT_TIMEOUT_S = 5.0
LOOKUP_QUORUM = 3  # close peers that must have the record before a lookup ends
# why more for providers: each holder's announcement reaches the closest peers *it*
# knows, so one peer's set is partial; measured (--diag, 64 nodes) with 3: the missing
# providers were held at the 4th and 5th closest, whose answers the quorum cut off
PROVIDERS_QUORUM = 5
REPLICAS = 8  # close peers a record or provider announcement is stored at
WALK_TIMEOUT_S = 5.0
WALK_REUSE_S = 300.0  # a put reuses the last walk toward its key while the mesh is stable
QUERY_TIMEOUT_S = 3.0
# The library's ADD_PROVIDER rate limit is 10 per 10 s per sender; stay under it.
PROVIDE_BATCH = 8
PROVIDE_WINDOW_S = 10.5


# Relays announce themselves as providers of this well-known key (its sha256 stands in
# for a model's): nodes behind NAT look relays up with find_providers(RELAY_KEY_SHA256).
RELAY_KEY_SHA256 = hashlib.sha256(b"/qvac/relay/1").hexdigest()


def model_key(sha256: str) -> str:
    """Provider key of a model: hex of the sha2-256 multihash of its file."""
    return "1220" + sha256


def placement_target(key: bytes) -> bytes:
    """Where in the keyspace `key` lives: a sha2-256 multihash, valid as a FIND_NODE key."""
    return b"\x12\x20" + hashlib.sha256(key).digest()


class _CountingValidator(RecordValidator):
    """RecordValidator that also reports why a record was refused (for /metrics)."""

    def __init__(self, on_reject: Callable[[str], None]) -> None:
        super().__init__()
        self._on_reject = on_reject

    def validate(self, key: str, value: bytes) -> None:
        peer = self._peer_of(key)
        try:
            verify_record(value, now=self.clock(), expected_peer_id=peer)
        except RecordError as exc:
            self._on_reject(exc.reason)
            raise InvalidRecordType(str(exc)) from None


class CapacityDHT:
    """Our use of the DHT. The KadDHT service (`.kad`) must be running (the network runs
    it with `background_trio_service`) for anything here to work."""

    def __init__(self, host: IHost, on_reject: Callable[[str], None]) -> None:
        self.host = host
        self._on_reject = on_reject
        self.kad = KadDHT(host, DHTMode.SERVER, strict_validation=True)
        self.kad.register_validator(CAPACITY_NAMESPACE, _CountingValidator(on_reject))
        self.local_id: ID = host.get_id()
        # key -> (when, routing table size then, closest peers a walk found)
        self._walks: dict[bytes, tuple[float, int, list[ID]]] = {}

    async def add_peer(self, peer_id: ID) -> None:
        try:
            await self.kad.add_peer(peer_id)
        except Exception as exc:  # why: routing-table bookkeeping must never fail a dial
            log.debug("could not add %s to the routing table: %s", peer_id, exc)

    def routing_peers(self) -> list[ID]:
        return list(self.kad.routing_table.get_peer_ids())

    async def discover_peers(self, walk_timeout: float = 3.0) -> list[ID]:
        """Self-lookup: peers close to us, learnt from the peers we know.

        The walk is bounded: it dials every peer it hears of, and a peer behind NAT
        (reachable only through a relay) makes it wait out connect retries. Peers the
        walk heard of before its time ran out are still returned (they are in the
        peerstore with the addresses we were told), so the caller can reach them, by
        relay if need be, instead of losing the whole round."""
        peers: list[ID] = []
        with trio.move_on_after(walk_timeout):
            peers = list(
                await self.kad.peer_routing.find_closest_peers_network(self.local_id.to_bytes())
            )
        heard = list(self.host.get_peerstore().peers_with_addrs())
        seen = dict.fromkeys(peers + self.routing_peers() + heard)
        return [p for p in seen if p != self.local_id]

    async def _store_targets(self, target: bytes) -> list[ID]:
        """The peers that should hold a value or provider record for `target`: the
        `REPLICAS` closest in our routing table, and the `REPLICAS` closest a network
        walk finds.

        Lookups ask the routing table's closest first (fast, and right when tables are
        complete, as in a small mesh) and walk only when that finds nothing, so a put
        must land in both places: while tables are still filling (measured: 64 nodes,
        tables at ~48 of 63 peers) the two sets differ, and a put to only one of them
        left half the lookups empty-handed.
        """
        local = self.kad.routing_table.find_local_closest_peers(target, REPLICAS)
        # why the cache: a walk is ~20 FIND_NODE streams, and the record is republished
        # every 30 s; the walk's answer only changes when the mesh does, so it is reused
        # while our routing table keeps its size, for up to WALK_REUSE_S.
        now = time.monotonic()
        size = self.kad.routing_table.size()
        cached = self._walks.get(target)
        if cached is not None and cached[1] == size and now - cached[0] < WALK_REUSE_S:
            walked = cached[2]
        else:
            walked = []
            with trio.move_on_after(WALK_TIMEOUT_S):
                walked = list(await self.kad.peer_routing.find_closest_peers_network(target))
            if walked:
                if len(self._walks) >= 64:
                    self._walks.clear()
                self._walks[target] = (now, size, walked)
        targets = list(dict.fromkeys(list(local) + walked[:REPLICAS]))
        return [p for p in targets if p != self.local_id]

    async def publish_record(self, peer_id: str, data: bytes) -> int:
        """Store our record locally and at the closest peers; returns how many took it."""
        key = capacity_key(peer_id)
        kb = key.encode()
        assert self.kad.validator is not None
        self.kad.validator.validate(key, data)  # why: never publish what peers would refuse
        self.kad.value_store.put(kb, data)
        # why: the library would republish it every 10 min by its raw key, which remote
        # peers refuse (see above); we republish ourselves every 30 s instead.
        self.kad.value_store.local_keys.discard(kb)
        stored = 0

        async def store(peer: ID) -> None:
            nonlocal stored
            with trio.move_on_after(PUT_TIMEOUT_S):
                if await self.kad.value_store._store_at_peer(peer, kb, data):
                    stored += 1

        async with trio.open_nursery() as nursery:
            for peer in await self._store_targets(placement_target(kb)):
                nursery.start_soon(store, peer)
        return stored

    async def provide(self, sha256: str) -> set[ID]:
        """Announce that we serve model `sha256`; returns the close peers that took it."""
        key = bytes.fromhex(model_key(sha256))
        store = self.kad.provider_store
        store.add_provider(key, PeerInfo(self.local_id, list(self.host.get_addrs())))
        sent: set[ID] = set()

        async def send(peer: ID) -> None:
            with trio.move_on_after(PUT_TIMEOUT_S):
                if await store._send_add_provider(peer, key):
                    sent.add(peer)

        async with trio.open_nursery() as nursery:
            for peer in await self._store_targets(key):
                nursery.start_soon(send, peer)
        log.debug("provided model=%s to %d peers", sha256[:12], len(sent))
        return sent

    def closest_missed(self, sha256: str, reached: set[ID]) -> bool:
        """Whether our routing table now knows close peers of model `sha256` that our
        last announcement (to `reached`) missed: any of the `LOOKUP_QUORUM` closest (a
        lookup asks those first), or two of the `REPLICAS` closest.

        Why: a node announces its models when it joins, while its table holds only its
        bootstrap peers, and those are rarely the key's closest peers. Measured
        (bench/dht_lookup.py --diag, 16 nodes, full tables): entries held at ranks like
        3, 14 and 15 of 16, so lookups, which ask the closest few, missed 14 % of
        providers, until the 300 s re-announce."""
        key = bytes.fromhex(model_key(sha256))
        closest = self.kad.routing_table.find_local_closest_peers(key, REPLICAS)
        missed = [p for p in closest if p not in reached and p != self.local_id]
        return len(missed) >= 2 or any(p not in reached for p in closest[:LOOKUP_QUORUM])

    async def _ask_closest(
        self,
        target: bytes,
        ask: Callable[[ID], Awaitable[bool]],
        found_any: Callable[[], bool],
        *,
        quorum: int,
        query_timeout_s: float,
    ) -> None:
        """Ask the `REPLICAS` peers closest to `target` until `quorum` of them have
        answered with what we look for (`ask` returns True then); peers that answered
        without it, or could not be asked, do not count.

        Why not stop at `quorum` answers of any kind (as before): a put reaches the
        closest peers *the publisher* knows, and while routing tables are partial those
        differ from the asker's closest; three answers without the record sent the
        lookup on a network walk, which on a loaded machine ran out its time (measured,
        bench/dht_lookup.py --diag at 64 nodes: misses took 5-6 s and had asked 2-6
        peers). Asking the table's 8 closest first finds a record placed there
        without a walk.

        Our routing table first: in a mesh of a few hundred nodes it holds nearly
        everyone, so its closest peers are the ones a network walk would find, and
        skipping the walk saves the ~20-30 FIND_NODE streams (~10 ms CPU each in
        py-libp2p) that dominate lookup time. Only if that finds nothing do we walk the
        network and ask the closest peers it returns.
        """
        asked: set[ID] = {self.local_id}

        async def ask_in_order(peers: list[ID]) -> None:
            answered = 0
            async with trio.open_nursery() as nursery:
                window = trio.Semaphore(quorum)

                async def one(peer: ID) -> None:
                    nonlocal answered
                    try:
                        with trio.move_on_after(query_timeout_s):
                            if await ask(peer):
                                answered += 1
                    except Exception as exc:
                        log.debug("DHT query to %s failed: %s", peer, exc)
                    finally:
                        window.release()
                    if answered >= quorum:
                        nursery.cancel_scope.cancel()

                for peer in peers:
                    if peer in asked:
                        continue
                    await window.acquire()
                    if answered >= quorum:
                        break
                    asked.add(peer)
                    nursery.start_soon(one, peer)

        await ask_in_order(self.kad.routing_table.find_local_closest_peers(target, REPLICAS))
        if not found_any():
            walked = await self.kad.peer_routing.find_closest_peers_network(target)
            await ask_in_order(list(walked)[:REPLICAS])

    async def lookup_record(
        self,
        peer_id: str,
        *,
        quorum: int = LOOKUP_QUORUM,
        query_timeout_s: float = QUERY_TIMEOUT_S,
        timeout: float = math.inf,
    ) -> tuple[CapacityRecord, bytes] | None:
        """The newest valid record for `peer_id` among our copy and the closest peers'.

        Invalid copies are counted by reason (expired ones are normal: stale copies).
        """
        key = capacity_key(peer_id).encode()
        found: list[bytes] = []
        local = self.kad.value_store.get(key)
        if local is not None and local.value:
            found.append(local.value)

        async def ask(peer: ID) -> bool:
            # why the private call: KadDHT.get_value returns the local copy if any,
            # however old; we want the close peers' copies to pick the newest.
            got = await self.kad.value_store._get_from_peer(peer, key, return_closer_peers=True)
            value = got[0] if isinstance(got, tuple) else got
            if isinstance(value, bytes) and value:
                found.append(value)
                return True
            return False  # why not `closer`: an answer without the record is no vote

        # why the deadline here and not only the caller's: what was found by then counts
        # (measured: a lookup that had the record from its 8th closest peer was still
        # waiting on slow ones when the caller's 5 s ran out, and returned nothing)
        with trio.move_on_after(timeout):
            await self._ask_closest(
                placement_target(key),
                ask,
                lambda: bool(found),
                quorum=quorum,
                query_timeout_s=query_timeout_s,
            )
        best: tuple[CapacityRecord, bytes] | None = None
        now = time.time()
        for data in dict.fromkeys(found):  # de-duplicate identical copies
            try:
                rec = verify_record(data, now=now, expected_peer_id=peer_id)
            except RecordError as exc:
                self._on_reject(exc.reason)
                continue
            if best is None or rec.seq > best[0].seq:
                best = (rec, data)
        return best

    async def find_providers(
        self,
        sha256: str,
        *,
        quorum: int = PROVIDERS_QUORUM,
        query_timeout_s: float = QUERY_TIMEOUT_S,
        timeout: float = math.inf,
    ) -> list[PeerInfo]:
        """Providers of model `sha256` (not us), from our store and the closest peers.

        KadDHT.find_providers returns only the local store whenever it holds *any*
        provider for the key (ourselves included, once we provide it), so a node that
        holds a model would never learn of other holders; we ask the closest peers always,
        and merge their (possibly partial, possibly duplicated) sets.
        """
        key = bytes.fromhex(model_key(sha256))
        found: dict[ID, list] = {}

        def merge(infos: list[PeerInfo]) -> None:
            for info in infos:
                if info.peer_id == self.local_id:
                    continue
                addrs = found.setdefault(info.peer_id, [])
                addrs.extend(a for a in info.addrs if a not in addrs)  # why: duplicates

        merge(self.kad.provider_store.get_providers(key))

        async def ask(peer: ID) -> bool:
            store = self.kad.provider_store
            providers, _closer = await store._get_providers_from_peer_with_closers(peer, key)
            merge(providers)
            return bool(providers)  # an answer without providers is no vote

        with trio.move_on_after(timeout):  # why: see lookup_record
            await self._ask_closest(
                key, ask, lambda: bool(found), quorum=quorum, query_timeout_s=query_timeout_s
            )
        return [PeerInfo(pid, addrs) for pid, addrs in found.items()]

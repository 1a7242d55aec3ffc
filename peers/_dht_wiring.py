"""What the network does with the Kademlia DHT (peers/dht.py speaks it): put our record
and announce what we hold, look records and providers up, and find peers.

- Put: our signed record at the closest peers, and provider records for each held model
  (and the relay key when we relay). Whatever reached fewer than `_DHT_REPLICAS` close
  peers is retried soon, with exponential back-off, not at the next 30 s republish; the
  put is scheduled by the publisher in peers/_capacity_sync.py.
- Look up: a peer's record (a hint: confirm with a direct fetch before routing) and the
  providers of a model, filtered by what fresh verified records say.
- Discovery: DHT self-lookups (which find the peers our peers know) on a doubling
  interval, and soon after we dial a peer we were told about; found peers are dialled up
  to `max_auto_connect` connections.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable

import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from peers._capacity_sync import OurRecord
from peers._dial import Dialler, Spawn
from peers._limits import NetworkLimits
from peers.dht import PROVIDE_BATCH, PROVIDE_WINDOW_S, RELAY_KEY_SHA256, CapacityDHT
from peers.records import CapacityRecord, RecordError, SeqTracker
from peers.table import PeerTable

log = logging.getLogger("qvacd.peers.network")

_DHT_REPLICAS = 3  # a put or provide that reached fewer close peers is retried
_DHT_RETRY_S = 5.0


class DhtWiring:
    """Our use of the DHT; run `discovery_loop` in the network's nursery."""

    def __init__(
        self,
        dht: CapacityDHT,
        libp2p: IHost,
        dialler: Dialler,
        table: PeerTable,
        our: OurRecord,
        limits: NetworkLimits,
        counters: Counter[str],
        *,
        seq_tracker: SeqTracker,
        count_reject: Callable[[str], None],
        announce_relay: bool,
        publish_again_after: Callable[[float], None],
        spawn: Spawn,
    ) -> None:
        self.dht = dht
        self._libp2p = libp2p
        self.peer_id_str = our.peer_id_str
        self.dialler = dialler
        self.table = table
        self.our = our
        self.limits = limits
        self.counters = counters
        self.seq_tracker = seq_tracker
        self._count_reject = count_reject
        self._announce_relay = announce_relay
        self._publish_again_after = publish_again_after
        self._spawn = spawn
        # our last put had no peer to go to: the next connection should bring a put
        self.had_no_peers = True
        self._retry_s = _DHT_RETRY_S
        # model sha256 -> (when announced well, the peers that took it)
        self._provided: dict[str, tuple[float, set[ID]]] = {}
        self._wake_discovery = trio.Event()

    def connected_peers(self) -> list[str]:
        return [p.to_base58() for p in self._libp2p.get_connected_peers()]

    # -- put ------------------------------------------------------------------------------

    async def publish_round(self) -> None:
        """Put our record at the closest peers and announce held models; retry soon
        (not in 30 s) whatever reached fewer than `_DHT_REPLICAS` peers."""
        try:
            await self._publish_round()
        finally:
            self.counters["dht_publish_rounds"] += 1  # finished or failed (benches wait on it)

    async def _publish_round(self) -> None:
        retry = False
        want = min(_DHT_REPLICAS, self.dht.kad.get_routing_table_size())
        self.had_no_peers = want == 0
        current = self.our.current()
        if current is not None:
            try:
                with trio.fail_after(15):  # a walk (5 s) and the stores (5 s)
                    stored = await self.dht.publish_record(self.peer_id_str, current[1])
                self.counters["dht_published"] += 1
                retry |= stored < want
            except Exception as exc:
                log.warning(
                    "publishing our capacity record to the DHT failed: %s; %s", exc,
                    f"retrying in {self._retry_s:.0f} s" if want
                    else "putting it again when a peer connects",
                )
                retry = True
        if want == 0:
            return  # nobody to announce to yet; the first connection brings us back
        now = time.monotonic()
        rec = self.our.record
        held = [m.sha256 for m in rec.models] if rec else []
        if self._announce_relay:
            # why here: a relay is announced like a held model, on the same schedule
            held.insert(0, RELAY_KEY_SHA256)
        for sha in list(self._provided):
            if sha not in held:
                del self._provided[sha]  # its provider records expire on their own

        def due(sha: str) -> bool:
            last = self._provided.get(sha)
            if last is None or now - last[0] >= self.limits.reprovide_interval_s:
                return True
            # why: announced while our routing table was small (on joining), it went to
            # whoever we knew then; announce again once we know its closest peers
            return self.dht.closest_missed(sha, last[1])

        due_models = [sha for sha in held if due(sha)]
        # why the batch: the library refuses more than 10 ADD_PROVIDER per 10 s from one
        # peer; the rest waits for the next round.
        for sha in due_models[:PROVIDE_BATCH]:
            with trio.move_on_after(15):
                sent = await self.dht.provide(sha)
                self.counters["dht_provided"] += 1
                if len(sent) >= want:
                    self._provided[sha] = (now, sent)
                    continue
            retry = True
        if len(due_models) > PROVIDE_BATCH:
            self._publish_again_after(PROVIDE_WINDOW_S)
        if retry:
            # why exponential: a put fails most when the mesh is overloaded, and
            # retrying at a fixed pace would add to the load that made it fail
            self._publish_again_after(self._retry_s)
            self._retry_s = min(self._retry_s * 2, self.limits.republish_interval_s)
        else:
            self._retry_s = _DHT_RETRY_S

    # -- look up --------------------------------------------------------------------------

    async def lookup_capacity(self, peer: str, timeout: float | None = None
                              ) -> CapacityRecord | None:
        """`peer`'s newest valid record in the DHT (see PeerNetwork.lookup_capacity)."""
        found = None
        budget = timeout or self.limits.lookup_timeout_s
        with trio.move_on_after(budget + 1.0):  # why +1: the lookup ends itself at `budget`
            found = await self.dht.lookup_record(peer, timeout=budget)
        if found is None:
            return None
        rec, data = found
        highest = self.seq_tracker.highest(peer)
        if highest is not None and rec.seq < highest:
            entry = self.table.get(peer)
            return entry.record if entry is not None else None
        try:
            self.seq_tracker.check(rec, data)
        except RecordError as exc:
            self._count_reject(exc.reason)
            return None
        self.table.update_record(peer, rec, source="dht")
        self.dialler.learn_addrs(peer, rec.addrs)
        return rec

    async def find_model_providers(
        self, sha256: str, *, timeout: float | None = None, include_table: bool = True
    ) -> list[str]:
        """See PeerNetwork.find_model_providers."""
        infos: list[PeerInfo] = []
        budget = timeout or self.limits.lookup_timeout_s
        with trio.move_on_after(budget + 1.0):  # why +1: the lookup ends itself at `budget`
            infos = await self.dht.find_providers(sha256, timeout=budget)
        max_age = self.limits.fresh_max_age_s
        out: list[str] = []
        for info in infos:
            peer = info.peer_id.to_base58()
            self.dialler.learn_addrs(peer, [str(a) for a in info.addrs], ttl=600)
            entry = self.table.get(peer)
            if entry is not None and entry.is_fresh(max_age) and entry.record is not None:
                if not any(m.sha256 == sha256 for m in entry.record.models):
                    continue  # why: provider records outlive the model by up to 48 h
            out.append(peer)
        if include_table:
            out += [p for p in self.table.with_model(sha256, max_age) if p not in out]
        return out

    async def find_relays(self) -> list[tuple[str, list[str]]]:
        """Relay providers in the DHT: (peer id, addresses), not us. Bounded by the
        caller; the addresses are learnt for later dials."""
        infos = await self.dht.find_providers(RELAY_KEY_SHA256)
        out = []
        for info in infos:
            peer = info.peer_id.to_base58()
            addrs = [str(a) for a in info.addrs]
            self.dialler.learn_addrs(peer, addrs, ttl=600)
            if not addrs:  # why: a provider record may omit them; the peerstore may not
                try:
                    addrs = [str(a) for a in self._libp2p.get_peerstore().addrs(info.peer_id)]
                except Exception:
                    addrs = []
            out.append((peer, addrs))
        return out

    # -- discovery ------------------------------------------------------------------------

    def wake_discovery(self) -> None:
        self._wake_discovery.set()

    async def discovery_loop(self) -> None:
        """DHT self-lookups: after 0.5, 1, 2, 4 ... s up to every `discovery_max_interval_s`,
        and soon after we dial a peer we were told about (never closer together than
        `min_discovery_interval_s`). Inbound connections do not trigger one, or each new
        node would set off a lookup on every node it touches."""
        interval = 0.5
        last = -math.inf
        while True:
            with trio.move_on_after(interval):
                await self._wake_discovery.wait()
            woken = self._wake_discovery.is_set()
            self._wake_discovery = trio.Event()
            # why: let a burst of connections settle into one lookup, and never run
            # lookups back to back however often we are woken
            await trio.sleep(
                max(0.1, last + self.limits.min_discovery_interval_s - time.monotonic())
            )
            if not self.connected_peers():
                interval = 1.0
                continue
            last = time.monotonic()
            known = self.dht.kad.get_routing_table_size()
            try:
                with trio.move_on_after(self.limits.lookup_timeout_s):
                    self._connect_discovered(await self.dht.discover_peers())
            except Exception as exc:
                log.debug("DHT discovery round failed: %s", exc)
            # why not back off while the table grows: on a loaded machine the 3 s walk
            # ends long before it has heard of everyone (measured, 64 nodes on 2 busy
            # cores: a 30 s walk took a table from 8 to 40 peers, 3 s walks left the
            # median at 3), so the next round soon picks up where this one stopped
            grew = self.dht.kad.get_routing_table_size() > known
            if not woken and not grew:
                interval = min(interval * 2, self.limits.discovery_max_interval_s)

    def _connect_discovered(self, found: Iterable[ID]) -> None:
        """Dial found peers we are not connected to, up to `max_auto_connect`."""
        budget = self.limits.max_auto_connect - len(self.connected_peers())
        now = time.time()
        for pid in found:
            if budget <= 0:
                break
            peer = pid.to_base58()
            if (peer == self.peer_id_str or self.dialler.is_connected(pid)
                    or peer in self.dialler.inflight):
                continue
            entry = self.table.get(peer)
            if entry is not None and not entry.available(now):
                continue
            addrs = [str(a) for a in self._libp2p.get_peerstore().addrs(pid)]
            if not addrs:
                continue
            budget -= 1
            self._spawn(self.dialler.dial, peer, addrs, "dht")

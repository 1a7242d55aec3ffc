"""Capacity records in motion: ours re-signed and pushed when it changes, theirs fetched
when a peer connects and re-fetched while it stays connected.

- Ours (`OurRecord`): re-signed on every publisher wake with a new sequence number, an
  expiry `record_ttl_s` ahead and our dialable addresses.
- Push: `changed()` (PeerNetwork.capacity_changed) wakes the publisher, which pushes to
  every connected peer, so a change reaches peers in milliseconds instead of at their
  next poll. Bursts are coalesced: the first change goes out at once, later ones at most
  every `min_push_interval_s`, one push round at a time.
- The same wake schedules the DHT put (peers/_dht_wiring.py does the put itself), at
  most every `min_dht_publish_interval_s` and at least every `republish_interval_s`.
- Fetch: every new connection, inbound too, queues a direct capacity fetch; connected
  peers whose record is older than `refresh_interval_s` are re-fetched.

Every record that arrives (fetch, push) is verified against the peer it came from,
checked against replay (SeqTracker), and counted by reason when refused.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable

import trio
from libp2p.abc import IHost

from peers._capacity import CapacityProtocol
from peers._dial import Spawn
from peers._errors import CapacityError
from peers._limits import NetworkLimits
from peers.dht import CapacityDHT
from peers.identity import Identity, short_peer_id
from peers.records import (
    MAX_ADDRS,
    CapacityRecord,
    RecordError,
    SeqSource,
    SeqTracker,
    sign_record,
    verify_record,
)
from peers.table import PeerTable
from protocol import CapacityRequest, CapacityResponse, Error

log = logging.getLogger("qvacd.peers.network")

CapacitySource = Callable[[], CapacityRecord]
LearnAddrs = Callable[[str, tuple[str, ...]], None]


class OurRecord:
    """Our signed capacity record: what `source()` says, stamped and signed by us."""

    def __init__(
        self,
        identity: Identity,
        source: CapacitySource,
        limits: NetworkLimits,
        default_addrs: Callable[[], list[str]],
    ) -> None:
        self.identity = identity
        self.peer_id_str = identity.peer_id_str
        self._source = source
        self.limits = limits
        self._default_addrs = default_addrs  # listen + circuit addrs, when source gives none
        self._seq = SeqSource()
        self.record: CapacityRecord | None = None
        self._bytes: bytes | None = None

    def current(self) -> tuple[CapacityRecord, bytes] | None:
        """Our latest signed record and its wire bytes."""
        if self.record is None or self._bytes is None:
            return None
        return self.record, self._bytes

    def sign(self) -> bool:
        try:
            base = self._source()
        except Exception:
            log.exception("capacity source failed; keeping the previous record")
            return False
        now = time.time()
        addrs = tuple(base.addrs) or tuple(self._default_addrs()[:MAX_ADDRS])
        rec = dataclasses.replace(
            base,
            peer_id=self.peer_id_str,
            seq=self._seq.next(now),
            issued_at=now,
            expires_at=now + self.limits.record_ttl_s,
            addrs=addrs,
        )
        try:
            data = sign_record(rec, self.identity)
        except (RecordError, ValueError) as exc:
            log.error("cannot sign our capacity record: %s; keeping the previous record", exc)
            return False
        self.record, self._bytes = rec, data
        log.debug("capacity record signed seq=%d models=%d", rec.seq, len(rec.models))
        return True


class CapacitySync:
    """The publisher (re-sign, push, schedule the DHT put) and the fetcher (fetch on
    connect, re-fetch while connected); run `publisher`, `fetch_worker` and
    `refresh_loop` in the network's nursery."""

    def __init__(
        self,
        our: OurRecord,
        protocol: CapacityProtocol,
        libp2p: IHost,
        table: PeerTable,
        dht: CapacityDHT,
        limits: NetworkLimits,
        counters: Counter[str],
        *,
        seq_tracker: SeqTracker,
        count_reject: Callable[[str], None],
        learn_addrs: LearnAddrs,
        publish_dht: Callable[[], Awaitable[None]],
        spawn: Spawn,
    ) -> None:
        self.our = our
        self.protocol = protocol
        self._libp2p = libp2p
        self.peer_id_str = our.peer_id_str
        self.table = table
        self.dht = dht
        self.limits = limits
        self.counters = counters
        self.seq_tracker = seq_tracker
        self._count_reject = count_reject
        self._learn_addrs = learn_addrs
        self._publish_dht = publish_dht
        self._spawn = spawn
        self._inflight_fetch: set[str] = set()
        self._fetch_send, self._fetch_recv = trio.open_memory_channel[str](4096)
        self._wake_publisher = trio.Event()
        self._push_pending = False
        self._push_busy = False
        self._wake_scheduled = False
        self._dht_publish_pending = False
        self._dht_busy = False
        self._next_dht_publish = -math.inf  # trio.current_time() of the next allowed put

    def connected_peers(self) -> list[str]:
        return [p.to_base58() for p in self._libp2p.get_connected_peers()]

    # -- publishing ours -----------------------------------------------------------------

    def changed(self) -> None:
        """Our capacity changed: re-sign, push, republish (see PeerNetwork.capacity_changed)."""
        self._push_pending = True
        self._dht_publish_pending = True
        self._wake_publisher.set()

    def request_dht_publish(self) -> None:
        """Put our record in the DHT again soon (e.g. the last put had nobody to go to)."""
        self._dht_publish_pending = True
        self._wake_publisher.set()

    def publish_again_after(self, delay: float) -> None:
        """The DHT put round left work (a retry, more provider batches): come back in `delay`."""
        self._dht_publish_pending = True
        self._spawn(self._wake_later, delay)

    async def publisher(self) -> None:
        """Re-sign, push and publish: on capacity_changed() (coalesced), and periodically."""
        while True:
            with trio.move_on_after(self.limits.republish_interval_s) as idle:
                await self._wake_publisher.wait()
            self._wake_publisher = trio.Event()
            push, self._push_pending = self._push_pending, False
            publish = self._dht_publish_pending or idle.cancelled_caught
            # Re-sign on every wake: a new seq per put, else peers refuse the put as
            # "not better" than the identical record they hold.
            self.our.sign()
            if push and self._push_busy:
                self._push_pending = True  # why: one round at a time; it re-wakes us
            elif push:
                self._push_busy = True
                self._spawn(self._push_all)
            if publish and not self._dht_busy and trio.current_time() >= self._next_dht_publish:
                self._dht_publish_pending = False
                self._dht_busy = True
                self._next_dht_publish = (
                    trio.current_time() + self.limits.min_dht_publish_interval_s
                )
                self._spawn(self._publish_dht_round)
            elif publish:
                # Too soon after the last put, or one is running: come back for it.
                self._dht_publish_pending = True
                self._spawn(self._wake_after_interval)
            await trio.sleep(self.limits.min_push_interval_s)

    async def _publish_dht_round(self) -> None:
        try:
            await self._publish_dht()
        finally:
            self._dht_busy = False

    async def _wake_later(self, delay: float) -> None:
        await trio.sleep(delay)
        self._wake_publisher.set()

    async def _wake_after_interval(self) -> None:
        """One pending wake for 'publish, but not yet': bursts of changes share it."""
        if self._wake_scheduled:
            return
        self._wake_scheduled = True
        try:
            await trio.sleep_until(max(self._next_dht_publish, trio.current_time() + 0.05))
        finally:
            self._wake_scheduled = False
        self._wake_publisher.set()

    async def _push_all(self) -> None:
        peers = self.connected_peers()

        async def push(peer: str) -> None:
            try:
                await self._push_to(peer)
            except Exception as exc:
                log.debug("capacity push to %s failed: %s", peer, exc)

        try:
            async with trio.open_nursery() as nursery:
                for peer in peers:
                    nursery.start_soon(push, peer)
        finally:
            self._push_busy = False
            if self._push_pending:
                self._wake_publisher.set()

    async def _push_to(self, peer: str) -> None:
        current = self.our.current()
        if current is None:
            return
        reply, rtt_ms, path = await self.protocol.exchange(
            peer, CapacityResponse(record=current[1]), None
        )
        self.counters["capacity_pushed"] += 1
        if isinstance(reply, CapacityResponse):
            self.accept_record(peer, reply.record, source="outbound", rtt_ms=rtt_ms, path=path)

    # -- fetching theirs -----------------------------------------------------------------

    async def fetch(self, peer: str, timeout: float | None = None) -> CapacityRecord:
        """Ask `peer` directly for its current record; verified, replay-checked, stored.

        Raises CapacityError (refused, timed out, malformed) or RecordError (forged/stale).
        """
        reply, rtt_ms, path = await self.protocol.exchange(peer, CapacityRequest(), timeout)
        if isinstance(reply, Error):
            raise CapacityError(
                f"peer {peer} refused the capacity request: {reply.code}: {reply.message}"
            )
        if not isinstance(reply, CapacityResponse):
            raise CapacityError(
                f"peer {peer} answered a capacity request with {type(reply).__name__}"
            )
        rec = self.accept_record(peer, reply.record, source="outbound", rtt_ms=rtt_ms,
                                 path=path)
        self.counters["capacity_fetched"] += 1
        return rec

    def accept_record(
        self, peer: str, data: bytes, *, source: str, rtt_ms: float | None = None,
        path: str | None = None,
    ) -> CapacityRecord:
        """Verify a record received from `peer` and store it; count and re-raise if bad."""
        try:
            rec = verify_record(data, now=time.time(), expected_peer_id=peer)
            self.seq_tracker.check(rec, data)
        except RecordError as exc:
            self._count_reject(exc.reason)
            # why DEBUG for an older seq: a fetched answer that crosses the peer's newer
            # push arrives after it; routine, and the table already holds the newer one
            stale = exc.reason == "replayed" and "is older than" in str(exc)
            log.log(
                logging.DEBUG if stale else logging.WARNING,
                "capacity record from peer %s rejected: %s; not stored, the table keeps "
                "what it had", short_peer_id(peer), exc,
            )
            raise
        self.table.update_record(peer, rec, rtt_ms=rtt_ms, source=source)
        self.table.record_reachable(peer)
        if rtt_ms is not None:
            self.table.record_path(peer, path, rtt_ms=rtt_ms)
        self._learn_addrs(peer, rec.addrs)
        return rec

    def queue_fetch(self, peer: str) -> None:
        try:
            self._fetch_send.send_nowait(peer)
        except trio.WouldBlock:
            pass  # why: the refresh loop will catch up

    async def fetch_worker(self) -> None:
        limiter = trio.CapacityLimiter(self.limits.max_parallel_fetches)
        async with trio.open_nursery() as nursery:
            async for peer in self._fetch_recv:
                if peer in self._inflight_fetch or peer == self.peer_id_str:
                    continue
                self._inflight_fetch.add(peer)
                nursery.start_soon(self._fetch_task, peer, limiter)

    async def _fetch_task(self, peer: str, limiter: trio.CapacityLimiter) -> None:
        try:
            async with limiter:
                await self.fetch(peer)
        except (CapacityError, RecordError) as exc:
            self.counters["capacity_fetch_failed"] += 1
            self.table.record_failure(peer, str(exc), kind="network")
            log.debug("capacity fetch from %s failed: %s", peer, exc)
        finally:
            self._inflight_fetch.discard(peer)

    async def refresh_loop(self) -> None:
        interval = self.limits.refresh_interval_s
        while True:
            await trio.sleep(interval)
            now = time.time()
            routing = set(self.dht.routing_peers())
            for pid in self._libp2p.get_connected_peers():
                peer = pid.to_base58()
                entry = self.table.get(peer)
                if entry is None or (
                    entry.available(now) and not entry.is_fresh(interval * 0.9, now)
                ):
                    self.queue_fetch(peer)
                if pid not in routing:
                    # why: the library drops a peer from its routing table after one failed
                    # query (common under load) and never re-adds it while connected
                    self._spawn(self.dht.add_peer, pid)

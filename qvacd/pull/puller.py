"""The puller's orchestration: one `Puller` per node, one shared download per model.

`Puller.pull` finds providers (peer-table records and DHT provider records), keeps only
peers this node trusts (any role: chunk bytes are verified by hash, so trust on our side
only decides whom we talk to; whether *they* serve *us* is their `seeder` role), fetches
and cross-checks manifests, then fetches chunks from every provider at once over lanes
(kept streams) that each take the next chunk when they finish, so faster providers take
more; how many lanes each provider runs is steered by the pull's rate (lanes.py).
Each chunk's sha256 is checked before it is written to the partial file
(models/partial.py), so a killed pull resumes from what was verified. A provider that
sends a bad chunk, a wrong manifest, a short chunk, garbage, or stalls is dropped for the
pull and named; its chunk goes to another provider. Only a file whose whole sha256
matches is committed to the store, and the node then announces itself as a provider.

The wire side of one request is shard_client.py; what a relayed provider may carry is
relay_plan.py; a download's progress is download.py.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import trio
from prometheus_client import CollectorRegistry

from models.gguf import GGUFError, GGUFInfo, read_gguf
from models.manifest import Manifest, save_manifest
from models.partial import PartialFile
from models.store import ModelEntry, ModelStore, StoreError, normalize_name

from .download import Download
from .errors import TRANSIENT, AllFailed, Busy, ManifestFalse, PeerFault, PullError, one_error
from .lanes import LanePlan
from .metrics import pull_metrics
from .options import PullOptions
from .relay_plan import CircuitView, RelayPlan, RelayPlanner
from .shard_client import ChunkLane, ShardClient, StreamOpener

plog = logging.getLogger("qvacd.pull")

_SAME_EVENT_S = 1.0  # transient failures of one provider this close together count once
_SHA_RE = re.compile(r"^(?:sha256[:-])?([0-9a-f]{64})$")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._\-]{0,63}$")


# ---- what the puller needs of the other rooms -------------------------------------------


class _ListedModel(Protocol):
    """A model a capacity record lists (peers.records.ModelInfo)."""

    @property
    def name(self) -> str: ...
    @property
    def sha256(self) -> str: ...


class _Record(Protocol):
    """A peer's capacity record (peers.records.CapacityRecord)."""

    @property
    def models(self) -> Sequence[_ListedModel]: ...

    def is_expired(self, now: float) -> bool: ...


class _TableEntry(Protocol):
    """One known peer (peers.table.PeerEntry)."""

    @property
    def peer_id(self) -> str: ...
    @property
    def record(self) -> _Record | None: ...


class PullNetwork(StreamOpener, Protocol):
    """What the puller needs of peers.PeerNetwork."""

    @property
    def peer_id_str(self) -> str: ...
    @property
    def table(self) -> Iterable[_TableEntry]: ...
    @property
    def relay(self) -> CircuitView: ...

    def connected_peers(self) -> list[str]: ...
    async def find_model_providers(self, sha256: str, *, timeout: float | None = None
                                   ) -> list[str]: ...
    def capacity_changed(self) -> None: ...


class TrustView(Protocol):
    """What the puller needs of peers.trust.TrustStore: any role means trusted."""

    def roles_of(self, peer_id: str) -> frozenset[str]: ...


# ---- the puller ---------------------------------------------------------------------------


def _parse_sha(text: str) -> str | None:
    m = _SHA_RE.match(text.strip().lower())
    return m.group(1) if m else None


class Puller:
    """Pulls models from trusted peers. Start `run` in a nursery first (the node does),
    then call `pull` from anywhere; pulls of the same model share one download."""

    def __init__(
        self,
        store: ModelStore,
        network: PullNetwork | None,
        trust: TrustView,
        *,
        registry: CollectorRegistry | None = None,
        options: PullOptions | None = None,
    ) -> None:
        self.store = store
        self.network = network
        self.trust = trust
        self.options = options or PullOptions()
        self.metrics = pull_metrics(registry)
        self.shard = ShardClient(network, self.options)
        self.relays = RelayPlanner(network.relay if network is not None else None,
                                   self.options)
        self.partial_dir = store.root / "partial"
        self._active: dict[str, Download] = {}
        self._by_sha: dict[str, Download] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[Puller] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Owns the download tasks; returns (cancelling them) when cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                task_status.started(self)
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def active(self) -> list[dict[str, Any]]:
        return [{"target": d.target, **d.event()} for d in self._active.values()]

    # -- public entry point ------------------------------------------------------------

    async def pull(
        self,
        name_or_sha: str,
        *,
        from_peer: str | None = None,
        progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> ModelEntry:
        """Fetch a model (name, alias or sha256) from trusted peers into the store.

        `progress(event)` gets Ollama-style dicts (status, digest, total, completed, plus
        sources, rate, resumed, fetched, dropped). Cancelling the last waiter of a
        download cancels it; its partial file stays for the next pull.
        """
        target = name_or_sha.strip()
        if not target or len(target) > 256:
            raise PullError(400, "give a model name or a sha256 to pull")
        if from_peer is not None:
            from_peer = self._check_peer_id(from_peer)
        if self._nursery is None:
            raise PullError(503, "the puller is not running; the daemon is starting or"
                            " stopping, try again")
        sha = _parse_sha(target)
        key = f"{sha or normalize_name(target)}@{from_peer or '*'}"
        dl = self._active.get(key)
        if dl is None:
            dl = Download(key=key, target=sha or target, from_peer=from_peer)
            self._active[key] = dl
            self._nursery.start_soon(self._run_download, dl)
        dl.waiters += 1
        if progress is not None:
            dl.subscribers.append(progress)
            progress(dl.event())
        try:
            await dl.done.wait()  # bounded: every step of the download has a timeout
        finally:
            dl.waiters -= 1
            if progress is not None:
                with contextlib.suppress(ValueError):
                    dl.subscribers.remove(progress)
            if dl.waiters == 0 and not dl.done.is_set():
                plog.info("pull of %s cancelled: nobody is waiting for it", dl.target)
                dl.scope.cancel()
        if dl.error is not None:
            raise dl.error
        assert dl.result is not None
        return dl.result

    @staticmethod
    def _check_peer_id(peer: str) -> str:
        try:
            from libp2p.peer.id import ID

            return ID.from_base58(peer.strip()).to_base58()
        except Exception:  # noqa: BLE001 - ID.from_base58 raises several types
            raise PullError(400, f"{peer[:80]!r} is not a peer id (they look like"
                            " 12D3KooW...)") from None

    def _trusted(self, peer: str) -> bool:
        try:
            return bool(self.trust.roles_of(peer))
        except Exception:  # noqa: BLE001 - a broken trust file means: not trusted
            return False

    # -- one download ------------------------------------------------------------------

    async def _run_download(self, dl: Download) -> None:
        self.metrics.pull_active.inc()
        outcome = "error"
        try:
            with dl.scope:
                dl.result = await self._download(dl)
                outcome = "success"
            if dl.result is None and dl.error is None:
                dl.error = PullError(499, f"the pull of {dl.target} was cancelled; pull again"
                                     " to resume")
                outcome = "cancelled"
        except PullError as e:
            dl.error = e
        except Exception as e:  # noqa: BLE001 - reported with its traceback, then as a 500
            plog.exception("pull of %s failed on an unexpected error; ended it with a 500 for"
                           " every client waiting on it", dl.target)
            dl.error = PullError(500, f"pull of {dl.target} failed: {type(e).__name__}: {e}")
        finally:
            self.metrics.pull_active.dec()
            self.metrics.pulls.labels(outcome).inc()
            label = dl.name or dl.target
            for g in (self.metrics.pull_total, self.metrics.pull_completed,
                      self.metrics.pull_rate, self.metrics.pull_sources):
                with contextlib.suppress(KeyError):
                    g.remove(label)
            self._active.pop(dl.key, None)
            if dl.error is not None:
                # a cancelled pull (499: nobody waits for it any more, or the daemon
                # stops) is routine, not a warning
                plog.log(logging.INFO if dl.error.status == 499 else logging.WARNING,
                         "pull of %s failed: %s; ended the download, %d client(s) waiting on"
                         " it get this error", dl.target, dl.error.message, dl.waiters)
            dl.done.set()

    def _local(self, target: str) -> ModelEntry | None:
        entry = self.store.resolve(target)
        if entry is not None and self.store.check_blob(entry):
            return entry
        return None

    async def _download(self, dl: Download) -> ModelEntry:
        dl.emit()
        local = self._local(dl.target)
        if local is not None:
            return self._succeed(dl, local, None)
        groups, name, aliases = await self._resolve(dl)
        dl.name = name
        sha = groups[0][0].sha256
        while (other := self._by_sha.get(sha)) is not None:
            # The same file asked for by another name: one download, not two writers
            # of one partial file.
            entry = await self._follow(dl, other)
            if entry is not None:
                return self._succeed(dl, entry, None)
        self._by_sha[sha] = dl
        try:
            return await self._download_groups(dl, groups, name, aliases)
        finally:
            del self._by_sha[sha]

    async def _follow(self, dl: Download, other: Download) -> ModelEntry | None:
        """Wait for `other`, relaying its progress; None if it was cancelled."""
        def relay(ev: dict[str, Any]) -> None:
            for fn in list(dl.subscribers):
                fn(ev)

        other.subscribers.append(relay)
        other.waiters += 1
        try:
            await other.done.wait()  # bounded: the other download has its own timeouts
        finally:
            other.waiters -= 1
            other.subscribers.remove(relay)
            if other.waiters == 0 and not other.done.is_set():
                other.scope.cancel()
        if other.result is not None:
            # Report what the shared download did: sources, bytes, dropped peers.
            dl.used, dl.fetched, dl.resumed = set(other.used), other.fetched, other.resumed
            dl.dropped.update(other.dropped)
            return other.result
        assert other.error is not None
        if other.error.status == 499:
            return None
        raise PullError(other.error.status, other.error.message)

    async def _download_groups(self, dl: Download, groups: list[tuple[Manifest, list[str]]],
                               name: str, aliases: tuple[str, ...]) -> ModelEntry:
        last: PullError | None = None
        for i, (manifest, peers) in enumerate(groups):
            local = self._local(manifest.sha256)
            if local is not None:  # held under another name already
                return self._succeed(dl, local, None)
            try:
                entry = await self._download_layout(dl, manifest, peers, name, aliases)
            except ManifestFalse as e:
                for peer in peers:
                    self._drop(dl, peer, e.reason, "bad_manifest")
                last = PullError(502, f"the manifest from {', '.join(peers)} is false: {e.reason}")
                continue
            except AllFailed as e:
                last = e
                continue
            for _, others in groups[i + 1:] + groups[:i]:
                for peer in others:
                    self._drop(dl, peer, "its manifest disagrees with the verified file",
                               "bad_manifest")
            return self._succeed(dl, entry, manifest)
        assert last is not None
        raise last

    async def _download_layout(self, dl: Download, manifest: Manifest, providers: list[str],
                               name: str, aliases: tuple[str, ...]) -> ModelEntry:
        """One attempt with one manifest and the providers that agree on it."""
        dl.sha256, dl.total = manifest.sha256, manifest.size
        partial = PartialFile(self.partial_dir, manifest)
        # Before the partial file is made: a pull no path can carry fetches nothing.
        claimed = await trio.to_thread.run_sync(partial.claimed)
        needed = manifest.size - sum(manifest.chunk_length(i) for i in claimed)
        plans = self._plan_relays(dl, manifest, providers, name, needed)
        try:
            verified = await trio.to_thread.run_sync(partial.open)
        except OSError as e:
            partial.close()
            raise self._disk_error(e, manifest) from None
        try:
            resumed = sum(manifest.chunk_length(i) for i in verified)
            dl.completed = resumed
            dl.resumed = max(dl.resumed, resumed)
            if resumed:
                self.metrics.pull_resumed_bytes.inc(resumed)
                plog.info("pull of %s resumes with %d of %d chunks already verified", name,
                          len(verified), manifest.n_chunks)
            dl.status = "downloading"
            dl.emit()
            done = set(verified)
            missing = [i for i in range(manifest.n_chunks) if i not in done]
            try:
                with one_error():
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._report, dl)
                        nursery.start_soon(self._hash_in_order, partial, done)
                        nursery.start_soon(self._sync_every_second, partial)
                        await self._fetch_chunks(dl, manifest, partial, providers, missing,
                                                 done, plans)
                        nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True), contextlib.suppress(OSError):
                    await trio.to_thread.run_sync(partial.sync)  # keep what was verified
            dl.emit()  # the last "downloading" line shows completed == total
            dl.status = "verifying sha256 digest"
            dl.emit()
            sha, info = await self._verify(partial)
            if sha != manifest.sha256:
                # Every chunk matched the manifest, so the manifest itself lied.
                partial.discard()
                raise ManifestFalse(f"its chunks make a file that hashes to {sha}, not"
                                    f" {manifest.sha256}")
            if isinstance(info, GGUFError):
                partial.discard()
                raise ManifestFalse(f"the file it describes is not a usable model: {info}")
            partial.close()
            try:
                entry = self.store.commit(partial.path, name, manifest.sha256, info,
                                          aliases=aliases)
            except (OSError, StoreError) as e:
                raise PullError(500, f"cannot add the pulled model to the store: {e}") from e
        finally:
            partial.close()
        with contextlib.suppress(FileNotFoundError):
            partial.path.unlink()  # only left if the blob already existed
        with contextlib.suppress(FileNotFoundError):
            partial.state_path.unlink()
        with contextlib.suppress(OSError):
            save_manifest(self.store, manifest)  # serve it onward without a rebuild
        return entry

    def _plan_relays(self, dl: Download, manifest: Manifest, providers: list[str],
                     name: str, needed: int) -> dict[str, RelayPlan]:
        """Each relayed provider's share (see relay_plan.py); PullError(413) when no path
        can carry `needed` bytes. Providers that cannot carry one chunk are dropped."""
        return self.relays.plan(
            manifest, providers, name, needed, dropped=dl.dropped,
            drop=lambda peer, why: self._drop(dl, peer, why, "relay_limit"))

    async def _hash_in_order(self, partial: PartialFile, done: set[int]) -> None:
        """Feed the whole-file hash with chunks as soon as they are contiguous, so only
        the tail is left to hash when the last chunk lands."""
        n = partial.manifest.n_chunks
        while partial.hashed < n:
            end = partial.hashed
            while end < n and end in done:
                end += 1
            if end > partial.hashed:
                await trio.to_thread.run_sync(partial.hash_upto, end)
            else:
                await trio.sleep(0.05)

    async def _sync_every_second(self, partial: PartialFile) -> None:
        while True:
            await trio.sleep(1.0)
            await trio.to_thread.run_sync(partial.sync)

    async def _verify(self, partial: PartialFile) -> tuple[str, GGUFInfo | GGUFError]:
        """The whole file's sha256 and its GGUF header (or the GGUFError), side by side:
        the header parse is pure Python, the hash runs without the GIL."""
        out: dict[str, Any] = {}

        async def header() -> None:
            try:
                out["info"] = await trio.to_thread.run_sync(read_gguf, partial.path)
            except GGUFError as e:
                out["info"] = e

        async with trio.open_nursery() as nursery:
            nursery.start_soon(header)
            out["sha"] = await trio.to_thread.run_sync(partial.whole_sha256)
        return out["sha"], out["info"]

    def _succeed(self, dl: Download, entry: ModelEntry, manifest: Manifest | None) -> ModelEntry:
        dl.result = entry
        dl.sha256, dl.total, dl.name = entry.sha256, entry.size, entry.name
        dl.completed = entry.size
        dl.status = "success"
        if manifest is not None:
            plog.info("pulled %s (sha256 %s, %d bytes: %d fetched, %d resumed) from %d peer(s)"
                      " in %.1f s%s", entry.name, entry.sha256, entry.size, dl.fetched,
                      dl.resumed, len(dl.used), time.monotonic() - dl.started,
                      f"; dropped {dl.dropped}" if dl.dropped else "")
            if self.network is not None:
                self.network.capacity_changed()  # announce: we can seed it now
        dl.emit()
        return entry

    def _disk_error(self, e: OSError, manifest: Manifest) -> PullError:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return PullError(507, f"disk full: the model needs {manifest.size} bytes in"
                             f" {self.partial_dir}; free some space and pull again (the"
                             " partial download is kept and resumes)")
        return PullError(500, f"cannot write the partial download in {self.partial_dir}:"
                         f" {e.strerror or e}")

    async def _report(self, dl: Download) -> None:
        label = dl.name or dl.target
        while True:
            self.metrics.pull_total.labels(label).set(dl.total)
            self.metrics.pull_completed.labels(label).set(dl.completed)
            self.metrics.pull_rate.labels(label).set(dl.rate())
            self.metrics.pull_sources.labels(label).set(len(dl.sources))
            dl.emit()
            await trio.sleep(self.options.progress_interval_s)

    # -- finding providers and the manifest --------------------------------------------

    def _from_records(self, sha: str | None, name: str | None) -> dict[str, str]:
        """peer -> model sha256, from unexpired capacity records listing the model."""
        out: dict[str, str] = {}
        if self.network is None:
            return out
        now = time.time()
        for entry in self.network.table:
            rec = entry.record
            if rec is None or rec.is_expired(now):
                continue
            for m in rec.models:
                if (sha is not None and m.sha256 == sha) or (name is not None and m.name == name):
                    out[entry.peer_id] = m.sha256
                    break
        return out

    def _record_name(self, sha: str) -> str | None:
        names: collections.Counter[str] = collections.Counter()
        if self.network is not None:
            for entry in self.network.table:
                if entry.record is not None:
                    names.update(m.name for m in entry.record.models if m.sha256 == sha)
        for name, _ in names.most_common():
            if _NAME_RE.match(name):
                return name
        return None

    async def _resolve(
        self, dl: Download
    ) -> tuple[list[tuple[Manifest, list[str]]], str, tuple[str, ...]]:
        """Manifests offered by trusted providers, grouped by layout, best first; the
        name to store the model under; aliases to add."""
        if self.network is None:
            raise PullError(503, "this node runs without the peer-to-peer side (--no-p2p);"
                            " it cannot pull models")
        sha = _parse_sha(dl.target)
        name = None if sha else normalize_name(dl.target)
        opts = self.options
        known = {e.peer_id for e in self.network.table if e.record is not None}
        holders = self._from_records(sha, name)
        by_alias = False
        if dl.from_peer is not None:
            holders = {dl.from_peer: holders.get(dl.from_peer, sha or "")}
        elif sha is not None or holders:
            # DHT provider records, keyed by the file's sha256: peers beyond our table, or
            # holding the same file under another name. Short when records already answer.
            key = sha or collections.Counter(holders.values()).most_common(1)[0][0]
            wait = 1.0 if holders else opts.dht_timeout_s
            try:
                for peer in await self.network.find_model_providers(key, timeout=wait):
                    holders.setdefault(peer, key)
            except Exception as e:  # noqa: BLE001 - a DHT failure must not hide the table
                plog.info("DHT provider lookup for %s failed: %s", key, e)
        else:
            # The name may be an alias no record carries: ask trusted connected peers.
            holders = {p: "" for p in self.network.connected_peers() if self._trusted(p)}
            by_alias = True
        holders.pop(self.network.peer_id_str, None)
        asked = len(known | set(holders))
        if not holders:
            raise PullError(404, f"no peer has model {dl.target!r}: asked {asked} peer(s);"
                            " check the name with `qvacd peers`, or pull by sha256")
        untrusted = [p for p in holders if not self._trusted(p)]
        trusted = [p for p in holders if p not in untrusted]
        if not trusted:
            raise PullError(403, f"model {dl.target!r} is only on peers this node does not"
                            f" trust ({', '.join(untrusted[:4])}); trust one with `qvacd"
                            " trust add PEER --roles provider`")
        # Prefer peers whose record lists the model, then the rest; cap the fan-out.
        trusted.sort(key=lambda p: (holders[p] == "", p))
        candidates = trusted[: opts.max_providers * 2]
        manifests: dict[str, Manifest] = {}
        failures: dict[str, PeerFault] = {}

        async def ask(peer: str) -> None:
            want = sha or holders.get(peer) or dl.target
            for attempt in range(opts.transient_retries + 1):
                try:
                    with trio.fail_after(opts.manifest_timeout_s):
                        manifests[peer] = await self.shard.fetch_manifest(
                            peer, want, sha or holders.get(peer) or None)
                    failures.pop(peer, None)
                    return
                except trio.TooSlowError:
                    failures[peer] = PeerFault(
                        f"no manifest within {opts.manifest_timeout_s:.0f} s", "stall")
                    return
                except PeerFault as f:
                    failures[peer] = f
                    if f.kind not in TRANSIENT:
                        return
                    # why: an idle connection can be dead without us knowing yet; the
                    # failed open drops it and the next one dials afresh
                    await trio.sleep(0.5 * (attempt + 1))
            plog.info("pull of %s: %s failed %d times: %s", dl.target, peer,
                      opts.transient_retries + 1, failures[peer].reason)

        with one_error():
            async with trio.open_nursery() as nursery:
                for peer in candidates:
                    nursery.start_soon(ask, peer)
        if not manifests and by_alias:
            refused = [f"{p}: {f.reason}" for p, f in failures.items() if f.code != "not_found"]
            raise PullError(404, f"no peer has model {dl.target!r}: asked {asked} peer(s)"
                            + (f"; {len(refused)} could not answer ({'; '.join(refused)})"
                               if refused else ""))
        for peer, f in failures.items():
            self._drop(dl, peer, f.reason, f.kind)
        if not manifests:
            detail = "; ".join(f"{p}: {f.reason}" for p, f in failures.items())
            codes = {f.code for f in failures.values()}
            status = 403 if codes == {"unauthorized"} else 404 if codes == {"not_found"} else 502
            raise PullError(status, f"no trusted peer served {dl.target!r} (asked"
                            f" {len(candidates)} of {asked} peer(s)): {detail}")
        # Providers that agree on a layout form a group; the largest group is tried first
        # (ties: smallest peer id, for stable behaviour). A group whose chunks do not make
        # up the file is blamed and the next one tried, so a liar in a 1-1 tie cannot get
        # an honest peer dropped.
        by_layout: dict[tuple, list[str]] = collections.defaultdict(list)
        for peer in sorted(manifests):
            by_layout[manifests[peer].layout_key()].append(peer)
        ordered = sorted(by_layout.values(), key=lambda ps: (-len(ps), ps[0]))
        groups = [(manifests[ps[0]], ps[: opts.max_providers]) for ps in ordered]
        first = groups[0][0]
        model_name = (name if name and _NAME_RE.match(name) else None) \
            or self._record_name(first.sha256) \
            or f"sha256-{first.sha256[:12]}"
        aliases = tuple(a for a in (normalize_name(dl.target),)
                        if not sha and a != model_name)
        plog.info("pull of %s: sha256 %s, %d bytes in %d chunks; providers by manifest: %s",
                  model_name, first.sha256, first.size, first.n_chunks,
                  " | ".join(", ".join(ps) for _, ps in groups))
        return groups, model_name, aliases

    # -- fetching chunks ---------------------------------------------------------------

    def _drop(self, dl: Download, peer: str, reason: str, kind: str) -> None:
        if peer in dl.dropped:
            return
        dl.dropped[peer] = reason
        dl.sources.discard(peer)
        self.metrics.pull_dropped.labels(kind).inc()
        # the full peer id, not the short one: tests/test_pull.py looks for it, and it is
        # what `qvacd trust rm` takes
        plog.warning("pull of %s: dropped provider %s: %s; the pull goes on without it",
                     dl.name or dl.target, peer, reason)

    async def _fetch_chunks(self, dl: Download, manifest: Manifest, partial: PartialFile,
                            providers: list[str], missing: list[int], done: set[int],
                            plans: dict[str, RelayPlan] | None = None) -> None:
        opts = self.options
        pending = collections.deque(missing)
        left = set(missing)
        changed = [trio.Event()]
        inflight = trio.Semaphore(opts.max_inflight)
        scopes: dict[str, trio.CancelScope] = {}
        plans = {} if plans is None else plans
        lanes = LanePlan([p for p in providers if p not in dl.dropped],  # see lanes.py
                         start_lanes=opts.streams_per_provider, max_total=opts.max_inflight,
                         max_per_provider=opts.streams_per_provider, now=time.monotonic())

        def notify() -> None:
            changed[0].set()
            changed[0] = trio.Event()

        def drop(peer: str, reason: str, kind: str) -> None:
            self._drop(dl, peer, reason, kind)
            lanes.drop(peer)
            if peer in scopes:
                scopes[peer].cancel()
            notify()

        async def worker(peer: str, slot: int, busy_since: list[float | None],
                         strikes: list[float]) -> None:
            lane = ChunkLane()  # one stream to `peer`, kept for chunk after chunk
            try:
                await fetch_from(peer, slot, busy_since, strikes, lane)
            finally:
                with trio.CancelScope(shield=True):
                    await lane.close()

        async def fetch_from(peer: str, slot: int, busy_since: list[float | None],
                             strikes: list[float], lane: ChunkLane) -> None:
            arrived = functools.partial(lanes.delivered, peer)
            while left:
                if slot >= lanes.lanes(peer):
                    if peer in dl.dropped:
                        return
                    # Not wanted now (lanes.py): the stream goes, the lane waits to be.
                    if lane.stream is not None:
                        await lane.close()
                    with trio.move_on_after(1.0):
                        await changed[0].wait()
                    continue
                if not pending:
                    with trio.move_on_after(1.0):
                        await changed[0].wait()  # a chunk may come back if its peer fails
                    continue
                index = pending.popleft()
                finished = False
                plan, why = self.relays.charge(plans, peer, manifest.chunk_length(index))
                if why is not None:
                    # Not a fault: this provider's relayed circuit cannot take another
                    # chunk. Its chunks in flight finish; the others take the rest.
                    pending.appendleft(index)
                    self._drop(dl, peer, why, "relay_limit")
                    lanes.drop(peer)
                    notify()
                    return
                try:
                    await inflight.acquire()  # released by store() (or below, on a failure)
                    try:
                        pieces = await self.shard.fetch_chunk(peer, manifest, index, lane,
                                                              arrived)
                    except BaseException:
                        inflight.release()
                        raise
                    # The hash and the write run while this lane asks for its next chunk:
                    # a provider with one lane would otherwise idle through them.
                    storing.start_soon(store, peer, index, pieces)
                    finished = True  # store() owns the chunk now
                    busy_since[0] = None
                    strikes[0] = 0
                except Busy as b:
                    self.metrics.pull_chunks.labels("busy").inc()
                    if plan is not None:
                        plan.charged -= manifest.chunk_length(index)  # nothing was sent
                    now = time.monotonic()
                    busy_since[0] = busy_since[0] or now
                    if now - busy_since[0] > opts.max_busy_s:
                        drop(peer, f"busy for over {opts.max_busy_s:.0f} s", "busy")
                        return
                    await trio.sleep(min(max(b.retry_after, 0.05), 5.0))
                except PeerFault as f:
                    self.metrics.pull_chunks.labels(f.kind).inc()
                    now = time.monotonic()
                    if f.kind in TRANSIENT and (strikes[0] < opts.transient_retries
                                                or now - strikes[1] < _SAME_EVENT_S):
                        # A broken stream or failed dial may be the network, not the peer
                        # (yamux resets a stream whose reader lagged ~5 s): retry a little.
                        # Failures within _SAME_EVENT_S of the last are one event: a lost
                        # connection ends every stream of this provider at once.
                        if now - strikes[1] >= _SAME_EVENT_S:
                            strikes[0] += 1
                            strikes[1] = now
                        plog.info("pull of %s: %s %s; retrying (%d/%d)", dl.name, peer,
                                  f.reason, strikes[0], opts.transient_retries)
                        await trio.sleep(0.5)
                        continue
                    drop(peer, f.reason, f.kind)
                    return
                except OSError as e:
                    raise self._disk_error(e, manifest) from None
                finally:
                    if not finished:
                        pending.appendleft(index)  # someone else fetches it
                    notify()

        async def store(peer: str, index: int, pieces: list[bytes]) -> None:
            try:
                good = await trio.to_thread.run_sync(partial.store_chunk, index, pieces)
            except OSError as e:
                raise self._disk_error(e, manifest) from None
            finally:
                inflight.release()
            # Book-keeping with no checkpoint in between: a cancel arriving now must not
            # lose a stored chunk or put it back in the queue.
            if good and index in left:
                n = manifest.chunk_length(index)
                left.discard(index)
                done.add(index)
                dl.used.add(peer)
                dl.completed += n
                dl.fetched += n
                dl.samples.append((time.monotonic(), n))
                self.metrics.pull_bytes.inc(n)
                self.metrics.pull_chunks.labels("ok").inc()
            elif not good:
                self.metrics.pull_chunks.labels("bad_chunk").inc()
                if index in left:
                    pending.appendleft(index)  # someone else fetches it
                drop(peer, f"sent chunk {index} that failed its sha256 check", "bad_chunk")
            notify()

        async def provider(peer: str) -> None:
            busy_since: list[float | None] = [None]
            # transient failure events in a row, all streams of this provider; when the
            # last one began
            strikes = [0, -_SAME_EVENT_S]
            with trio.CancelScope() as scope, one_error():
                scopes[peer] = scope
                dl.sources.add(peer)
                try:
                    async with trio.open_nursery() as nursery:
                        for slot in range(opts.streams_per_provider):
                            nursery.start_soon(worker, peer, slot, busy_since, strikes)
                finally:
                    dl.sources.discard(peer)

        async def steer() -> None:
            while True:
                await trio.sleep(0.25)
                if lanes.tick(time.monotonic()):
                    plog.debug("pull of %s: %s", dl.name, lanes.summary())
                    notify()

        with one_error():
            async with trio.open_nursery() as outer:
                outer.start_soon(steer)
                # chunks being hashed and written: outside the providers' scopes, so a
                # provider dropped meanwhile does not lose the good chunks it sent
                async with trio.open_nursery() as storing, trio.open_nursery() as nursery:
                    for peer in providers:
                        if peer not in dl.dropped:
                            nursery.start_soon(provider, peer)
                outer.cancel_scope.cancel()
        plog.info("pull of %s: %s", dl.name, lanes.summary())
        if left:
            detail = "; ".join(f"{p}: {r}" for p, r in dl.dropped.items()) or "none answered"
            raise AllFailed(502, f"every provider of {dl.name} failed with {len(left)} of"
                            f" {manifest.n_chunks} chunks missing ({detail}); pull again to"
                            " resume from what was verified")


__all__ = ["PullNetwork", "Puller", "TrustView"]

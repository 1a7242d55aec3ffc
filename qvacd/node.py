"""The daemon: one trio nursery that owns the engine, the HTTP server and the peer side.

Shutdown is cancelling that nursery (SIGINT/SIGTERM do exactly that), so nothing
runs that no nursery owns and nothing is left behind.
"""

from __future__ import annotations

import logging
import signal
import time
from typing import TYPE_CHECKING, Any

import trio

from models.engine import Engine, EngineConfig, EngineError
from models.store import ModelEntry, ModelStore, StoreError, install_default_model
from peers.identity import Identity, IdentityError, load_or_create_identity
from peers.mesh import MeshError, MeshStore
from peers.trust import TrustError, TrustStore

from . import __version__
from .api import build_app
from .config import Config
from .daemon_file import remove_daemon_file, write_daemon_file
from .dashboard.recorder import ActivityRecorder
from .metrics import Metrics
from .router import Router

if TYPE_CHECKING:
    from peers import PeerNetwork
    from peers.device import DeviceInfo
    from peers.records import CapacityRecord

    from .pairing import PairingService
    from .delegation import RemoteInference
    from .pull import Puller
    from .remote_embed import RemoteEmbedder
    from .services.infer import PeerQuota
    from .services.layers import LayersService
    from .split import SplitInference

log = logging.getLogger("qvacd.node")


class StartupError(Exception):
    """The daemon cannot start; one line that says why and what to do."""


class Node:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.started = time.time()
        data_dir = config.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.identity: Identity = load_or_create_identity(data_dir)
        except IdentityError as e:
            raise StartupError(str(e)) from e
        try:
            self.mesh = MeshStore(data_dir, own_peer_id=self.identity.peer_id_str)
            self.trust = TrustStore.in_dir(data_dir, self.mesh)
            self.trust.reload_if_changed()
        except (TrustError, MeshError) as e:
            raise StartupError(str(e)) from e
        try:
            self.store = ModelStore(data_dir)
            self.store.clean_tmp()
            if config.default_model:
                install_default_model(self.store, log=lambda m: log.info("%s", m))
        except StoreError as e:
            raise StartupError(str(e)) from e
        gpu_layers = None if config.gpu_layers == -2 else config.gpu_layers
        budget = config.memory_budget
        if config.layers_memory and config.p2p:
            # the memory offered for peers' layers is set aside from this node's budget
            from models.engine import default_memory_budget

            whole = budget or default_memory_budget()
            if config.layers_memory >= whole:
                raise StartupError(f"--layers-memory {config.layers_memory} is not below the"
                                   f" memory budget {whole}; lower it or raise --memory-budget")
            budget = whole - config.layers_memory
        self.engine = Engine(self.store, EngineConfig(
            n_ctx=config.ctx_size, memory_budget=budget, parallel=config.sequences,
            queue_size=config.queue_size, n_threads=config.threads, gpu_layers=gpu_layers))
        self.metrics = Metrics()
        self.recorder = ActivityRecorder()  # the dashboard's requests and tokens/s
        self.metrics.on_scrape(self._refresh_gauges)
        self.node_id = self.identity.peer_id_str
        self.router = Router(self.node_id, self.engine, delegate=config.delegate,
                             overflow=config.overflow)
        self.network: PeerNetwork | None = None  # once the P2P side is up (not --no-p2p)
        self.api_bound: str | None = None
        self.device: DeviceInfo | None = None
        self.puller: Puller | None = None  # with the network
        self.pairing: PairingService | None = None  # with the network
        self.layers: LayersService | None = None  # the worker side of splits
        self.split: SplitInference | None = None  # the head side of splits
        self.remote_embed: RemoteEmbedder | None = None  # embeddings from peers
        if config.p2p:
            self._init_network()

    def _init_network(self) -> None:
        from peers.device import detect_device
        from peers import NetworkError, NetworkLimits, PeerNetwork
        from peers.relay import RelayError, RelayOptions
        from protocol import INFER_PROTOCOL, SHARD_PROTOCOL

        from .delegation import RemoteInference
        from .pull import Puller
        from .services.infer import InferService, PeerQuota
        from .services.shard import ShardService

        self.device = detect_device()
        cfg = self.config
        relay = RelayOptions(
            service=cfg.relay_service, max_reservations=cfg.relay_max_reservations,
            reservation_ttl_s=cfg.relay_reservation_ttl,
            circuit_duration_s=cfg.relay_circuit_duration, circuit_bytes=cfg.relay_circuit_bytes,
            allow=tuple(cfg.relay_allow), relays=tuple(cfg.relay), hole_punch=cfg.hole_punch,
            dht_max=cfg.relay_dht_max)
        try:
            self.network = PeerNetwork(
                self.identity, capacity_source=self.capacity_record,
                listen_addrs=self.config.listen, bootstrap=self.config.bootstrap,
                mdns=self.config.mdns, trust_store=self.trust,
                # Changes are pushed the moment they happen and a dead peer drops its
                # connection, so polling is only a safety net: every 60 s, not 5 s
                # (5 s cost an idle node ~3% CPU with 8 peers, 20 s ~0.4%).
                limits=NetworkLimits(refresh_interval_s=60.0), relay=relay)
        except (NetworkError, RelayError) as e:
            raise StartupError(str(e)) from e
        except Exception as e:  # a malformed --listen address and the like
            raise StartupError(f"cannot set up the P2P host: {e}") from e
        self.infer_service = InferService(
            self.engine, is_authorized=self._may_consume,
            quota=PeerQuota(self.config.peer_max_streams, self.config.peer_tokens_per_minute),
            metrics=self.metrics)
        self.infer_service.on_offence = self.network.offence
        self.network.set_stream_handler(INFER_PROTOCOL, self.infer_service.handle)
        self.shard_service = ShardService(
            self.store, is_authorized=self._may_fetch_shards, max_uploads=cfg.shard_max_uploads,
            upload_rate=cfg.shard_upload_rate, registry=self.metrics.registry)
        self.shard_service.on_offence = self.network.offence
        self.network.set_stream_handler(SHARD_PROTOCOL, self.shard_service.handle)
        self.puller = Puller(self.store, self.network, self.trust,
                             registry=self.metrics.registry)
        self.router.remote = RemoteInference(self.node_id, self.network, metrics=self.metrics)
        self._init_embeddings(self.network, self.router.remote, self.infer_service.quota)
        self._init_split(self.network)
        self._init_pairing(self.network)
        self.engine.on_change = self.network.capacity_changed

    def _init_split(self, network: PeerNetwork) -> None:
        from protocol import LAYERS_PROTOCOL

        from .services.layers import LayersService
        from .split import SplitInference, SplitOrDelegate

        cfg = self.config
        self.layers = LayersService(
            is_authorized=lambda peer: self.trust.is_trusted(peer, "layers"),
            offered=cfg.layers_memory, cache_dir=cfg.data_dir / "layer-cache",
            model_file=lambda sha: (e.path if (e := self.store.resolve(sha)) else None),
            n_threads=cfg.threads or 1, idle_timeout=float(cfg.layers_idle_timeout))
        self.layers.on_offence = network.offence
        self.layers.on_change = network.capacity_changed
        network.set_stream_handler(LAYERS_PROTOCOL, self.layers.handle)
        self.split = SplitInference(self.node_id, self.engine, network, self.trust,
                                    n_threads=cfg.threads)
        assert self.router.remote is not None
        self.router.remote = SplitOrDelegate(self.router.remote, self.split)

    def _init_embeddings(self, network: PeerNetwork, remote: RemoteInference,
                         quota: PeerQuota) -> None:
        """/qvac/embed/1.0.0 both ways. Who may ask: the generation rule (`consumer`
        role or --public-donor), sharing the per-peer stream limit of /qvac/infer."""
        from protocol import EMBED_PROTOCOL

        from .remote_embed import RemoteEmbedder
        from .services.embed import EmbedService

        self.embed_service = EmbedService(self.engine, is_authorized=self._may_consume,
                                          quota=quota, metrics=self.metrics)
        self.embed_service.on_offence = network.offence
        network.set_stream_handler(EMBED_PROTOCOL, self.embed_service.handle)
        self.remote_embed = RemoteEmbedder(network, remote, metrics=self.metrics)

    def _init_pairing(self, network: PeerNetwork) -> None:
        from protocol import PAIR_PROTOCOL

        from .pairing import PairingService

        def link_addrs() -> list[str]:
            # why this order: a link is for peers beyond the LAN, so relayed and public
            # addresses first, loopback last
            addrs = network.relay.circuit_addrs() + network.listen_addrs()
            return sorted(dict.fromkeys(addrs), key=lambda a: (
                "/p2p-circuit" not in a, "/ip4/127." in a or "/ip6/::1/" in a))

        self.pairing = PairingService(self.node_id, self.trust, network, link_addrs=link_addrs,
                                      registry=self.metrics.registry, mesh=self.mesh)
        network.set_stream_handler(PAIR_PROTOCOL, self.pairing.handle)

    def _may_fetch_shards(self, peer_id: str) -> bool:
        return self.config.public_donor or self.trust.is_trusted(peer_id, "seeder")

    def _may_consume(self, peer_id: str) -> bool:
        return self.config.public_donor or self.trust.is_trusted(peer_id, "consumer")

    def capacity_record(self) -> CapacityRecord:
        """This node's current capacity, unsigned (the network signs and sequences it)."""
        from peers.device import DeviceInfo
        from peers.records import CapacityRecord, ModelInfo

        eng = self.engine.status()
        loaded = self.engine.loaded()
        tps = {sha: round(v, 2) for sha, v in self.engine.tokens_per_s().items()}
        dev = self.device
        free = _mem_available()
        if dev is not None and dev.kind == "cpu" and free is not None:
            dev = DeviceInfo(dev.kind, dev.name, dev.memory_total, free)
        models = tuple(
            ModelInfo(sha256=e.sha256, name=e.name, size=e.size, loaded=e.sha256 in loaded,
                      memory=self.engine.memory_needed(e))
            for e in self.store.list()[:128])
        return CapacityRecord.issue(
            self.node_id, 0, dev, memory_budget=eng["memory_budget"], models=models,
            slots_total=eng["slots_total"], slots_free=eng["slots_free"],
            queue_len=eng["queue"], tokens_per_s=tps,
            aggregate_tokens_per_s=eng["aggregate_tokens_per_s"], roles=("provider", "seeder"),
            certificates=tuple(self.mesh.certificates_to_present())[:4], version=__version__,
            layers_memory=self.layers.free if self.layers is not None else 0)

    # ---- views used by the API -----------------------------------------------------

    def _refresh_gauges(self) -> None:
        if self.network is not None:
            for reason, n in self.network.rejected.items():
                self.metrics.records_rejected.labels(reason).set(n)
        st = self.engine.status()
        self.metrics.queue_length.set(st["queue"])
        self.metrics.slots_free.set(st["slots_free"])
        self.metrics.sequences.set(st["slots_total"])
        self.metrics.aggregate_tps.set(st["aggregate_tokens_per_s"])

    def available_models(self) -> list[ModelEntry]:
        return self.store.list()

    def status(self) -> dict[str, Any]:
        eng = self.engine.status()
        models = []
        loaded = self.engine.loaded()
        for e in self.store.list():
            models.append({
                "name": e.name, "sha256": e.sha256, "size": e.size,
                "loaded": e.sha256 in loaded,
                "memory_estimate": self.engine.memory_needed(e),
                "fits_budget": self.engine.fits(e),
                "tokens_per_s": self.engine.tokens_per_s().get(e.sha256),
                "parallel": self.engine.parallel_for(e),
                **{k: e.info.get(k) for k in ("architecture", "parameters", "quantization",
                                                "context_length")},
            })
        out: dict[str, Any] = {
            "peer_id": self.node_id,
            "version": __version__,
            "api": self.api_bound or self.config.api,
            "uptime_s": round(time.time() - self.started, 1),
            "data_dir": str(self.config.data_dir),
            "models": models,
            "memory_budget": eng["memory_budget"],
            "memory_used": eng["memory_used"],
            "slots_total": eng["slots_total"],
            "slots_free": eng["slots_free"],
            "parallel": eng["parallel"],
            "aggregate_tokens_per_s": eng["aggregate_tokens_per_s"],
            "queue": eng["queue"],
            "queue_limit": eng["queue_limit"],
            "n_ctx": eng["n_ctx"],
            "gpu_layers": eng["gpu_layers"],
            "delegate": self.config.delegate,
        }
        if self.network is not None:
            out["listen_addrs"] = self.network.listen_addrs()
            out["peers"] = len(self.network.table.snapshot())
            out["network"] = self.network.beyond_lan_status()
            out["banned"] = self.network.guard.banned()
        if self.pairing is not None:
            out["pairing"] = self.pairing.status()
        if self.layers is not None:
            out["layers"] = self.layers.status()
        if self.device is not None:
            out["device"] = {"kind": self.device.kind, "name": self.device.name,
                             "memory_total": self.device.memory_total,
                             "memory_free": _mem_available() if self.device.kind == "cpu"
                             else self.device.memory_free}
        return out

    def peers_snapshot(self) -> list[dict[str, Any]]:
        if self.network is None:
            return []
        snap = self.network.table.snapshot()
        for entry in snap:
            entry["path"], entry["relay"] = self.network.peer_path(entry["peer_id"])
        return snap

    # ---- lifecycle -------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        from hypercorn.config import Config as HyperConfig
        from hypercorn.trio import serve

        host, port = self.config.api_host_port
        hc = HyperConfig()
        hc.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
        hc.accesslog = None
        hc.errorlog = logging.getLogger("qvacd.http")
        hc.graceful_timeout = 0.5
        hc.keep_alive_timeout = 30
        app = build_app(self)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_signals, nursery.cancel_scope)
            nursery.start_soon(self.recorder.run, self.engine.aggregate_tokens_per_s)
            await nursery.start(self.engine.run)  # owns the model threads
            if self.network is not None:
                try:
                    await nursery.start(self.network.run)
                except Exception as e:
                    err: BaseException = e
                    while isinstance(err, BaseExceptionGroup):
                        err = err.exceptions[0]
                    raise StartupError(f"cannot start the P2P side on {self.config.listen}:"
                                       f" {err}; pick another --listen port") from e
                nursery.start_soon(self._watch_local_state, self.network)
                if self.split is not None:
                    await nursery.start(self.split.run)
                if self.layers is not None:
                    await nursery.start(self.layers.run)
                if self.puller is not None:  # always, with the network
                    await nursery.start(self.puller.run)
            if self.config.preload and self.config.default_model:
                nursery.start_soon(self._preload)
            try:
                binds = await nursery.start(lambda task_status: serve(
                    app, hc, task_status=task_status, mode="asgi"))
            except (OSError, BaseExceptionGroup) as e:
                err = e
                while isinstance(err, BaseExceptionGroup):
                    err = err.exceptions[0]
                if not isinstance(err, OSError):
                    raise
                raise StartupError(f"cannot listen on {self.config.api}: {err.strerror};"
                                   " is another qvacd running? pick another --api port") from e
            self.api_bound = binds[0].replace("http://", "") if binds else self.config.api
            self._write_runtime_file()
            log.info("qvacd %s serving on http://%s as %s", __version__, self.api_bound,
                     self.node_id)
            task_status.started(self)

    async def _watch_local_state(self, network: PeerNetwork) -> None:
        """Changes made by the CLI in another process (models added, trust, mesh
        certificates seen on peers) reach the running daemon within a second."""
        seen = self.store.generation
        store_error: str | None = None  # the last one logged: said once, not every 0.5 s
        while True:
            await trio.sleep(0.5)
            try:
                self.store.reload()
                store_error = None
                if self.store.generation != seen:
                    seen = self.store.generation
                    log.info("model store changed; republishing capacity")
                    network.capacity_changed()
            except StoreError as e:
                if str(e) != store_error:
                    log.warning("%s; serving the models read before, and reading the index"
                                " again every 0.5 s", e)
                store_error = str(e)
            for entry in list(network.table):
                rec = entry.record
                if rec is not None and rec.certificates:
                    try:
                        self.mesh.observe(entry.peer_id, rec.certificates)
                    except Exception as e:  # a bad certificate grants nothing
                        log.debug("certificate of %s ignored: %s", entry.peer_id[:16], e)

    async def _preload(self) -> None:
        try:
            await self.engine.preload("gemma3-270m")
        except EngineError as e:
            log.info("not preloading the default model: %s", e.message)

    async def _watch_signals(self, cancel_scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for sig in signals:
                log.info("received %s, shutting down", signal.Signals(sig).name)
                cancel_scope.cancel()
                return

    def _write_runtime_file(self) -> None:
        """Tells the CLI where this daemon's API is (qvacd/daemon_file.py)."""
        write_daemon_file(self.config.data_dir, api=self.api_bound, peer_id=self.node_id)

    def remove_runtime_file(self) -> None:
        remove_daemon_file(self.config.data_dir)


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None

"""A model no single device can hold, run split across this node and trusted workers.

Routing (`SplitOrDelegate`, plugged in as the router's remote side): whole-request
delegation to one device stays first; only when it finds nobody (not when everyone is
busy) and this node holds the model but cannot fit it, the request goes to a split.

`SplitInference`:
- `plan(model)`: this node's free budget and every trusted worker's offered memory (the
  `layers_memory` of its capacity record; the worker must be trusted with `provider`
  here, since the activations it computes reveal the prompt) -> qvacd.split_plan;
- loading: every worker is probed first (`LayersHello` with `probe`: role, RPC version
  and memory checked, nothing placed), then one `LayerTunnel` per worker and the split
  process (models/split_load.py) with "127.0.0.1:PORT" endpoints; the loaded split is
  kept for the next request and unloaded after KEEP_ALIVE_S idle;
- a generation names every node (`served_by`). A worker lost mid-answer ends the split
  process (llama.cpp aborts on a broken RPC link); the client's stream then ends with
  finish_reason error and one WARNING naming the worker. No failover to another plan:
  a split exists because nothing else could serve.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from models.engine import EngineError, GenerationRequest, GenerationResult
from models.split_load import SplitFailed, SplitProcess
from peers import short_peer_id
from protocol import LayersHello

from .layer_tunnel import LayerRefused, LayerTunnel, StreamOpener, probe
from .router import RemoteGenerator, RoutedGeneration
from .services.layers import library_rpc_version
from .split_plan import Device, ModelNeeds, PlanError, SplitPlan, plan_split

log = logging.getLogger("qvacd.split")

KEEP_ALIVE_S = 300.0  # below the workers' default idle timeout (600 s)


class SplitNetwork(StreamOpener, Protocol):
    @property
    def table(self) -> Any: ...


class TrustView(Protocol):
    def is_trusted(self, peer_id: str, role: str) -> bool: ...


@dataclass
class _Active:
    sha256: str
    name: str
    plan: SplitPlan
    tunnels: list[LayerTunnel]
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    process: SplitProcess | None = None
    busy: int = 0
    last_used: float = field(default_factory=time.monotonic)
    loaded_in: float = 0.0

    def failure(self) -> str:
        for t in self.tunnels:
            if t.failure:
                return t.failure
        return (self.process.ended if self.process is not None else None) or "split ended"


class SplitInference:
    def __init__(self, node_id: str, engine: Any, network: SplitNetwork, trust: TrustView, *,
                 n_threads: int = 0) -> None:
        self.node_id = node_id
        self.engine = engine
        self.network = network
        self.trust = trust
        self.n_threads = n_threads or 1
        self.active: _Active | None = None
        self._nursery: trio.Nursery | None = None
        self._lock = trio.Lock()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                await trio.sleep(5)
                a = self.active
                if a is not None and not a.busy and \
                        time.monotonic() - a.last_used > KEEP_ALIVE_S:
                    log.info("unloading the split of %s after %.0f s idle", a.name, KEEP_ALIVE_S)
                    self._drop(a)

    # ---- planning ------------------------------------------------------------------------

    def workers(self) -> list[Device]:
        out = []
        for entry in list(self.network.table):
            rec = entry.record
            if rec is None or not rec.layers_memory:
                continue
            if not self.trust.is_trusted(entry.peer_id, "provider"):
                continue
            out.append(Device(entry.peer_id, rec.layers_memory,
                              rec.aggregate_tokens_per_s or None))
        return out

    def plan(self, model: str) -> tuple[Any, SplitPlan]:
        """(entry, plan); EngineError NOT_FOUND, or UNAVAILABLE with PlanError's line."""
        entry = self.engine.resolve(model)
        info = self.engine.store.info(entry)
        needs = ModelNeeds.from_gguf(entry.name, info, self.engine.n_ctx_for(info))
        st = self.engine.status()
        head_free = max(0, st["memory_budget"] - st["memory_used"])
        try:
            return entry, plan_split(needs, Device("local", head_free), self.workers())
        except PlanError as e:
            raise EngineError("UNAVAILABLE", str(e)) from None

    def plan_dict(self, model: str) -> dict[str, Any]:
        entry, plan = self.plan(model)
        out = plan.to_dict()
        out["sha256"] = entry.sha256
        a = self.active
        out["loaded"] = a is not None and a.sha256 == entry.sha256 and not a.scope.cancel_called
        return out

    # ---- loading ---------------------------------------------------------------------

    async def _load(self, model: str) -> _Active:
        if self._nursery is None:
            raise EngineError("UNAVAILABLE", "the split side is not running")
        entry, plan = self.plan(model)
        if not plan.workers:
            raise EngineError("UNAVAILABLE", f"model {entry.name} fits no split with a worker")
        try:
            rpc = await library_rpc_version()
        except RuntimeError as e:
            raise EngineError("UNAVAILABLE", str(e)) from None
        hellos = {p.device.name: LayersHello(*rpc, memory=p.memory, model_sha256=entry.sha256)
                  for p in plan.workers}
        for peer, hello in hellos.items():
            try:
                await probe(self.network, peer, hello)
            except LayerRefused as e:
                raise EngineError("UNAVAILABLE", f"cannot split {entry.name}: {e}") from None
        a = _Active(entry.sha256, entry.name, plan,
                    [LayerTunnel(self.network, peer, hello, model_path=entry.path)
                     for peer, hello in hellos.items()])
        t0 = time.monotonic()
        try:
            await self._nursery.start(self._hold, a, str(entry.path))
        except SplitFailed as e:
            raise EngineError("UNAVAILABLE", f"cannot load {entry.name} split: {a.failure()}"
                              if any(t.failure for t in a.tunnels) else
                              f"cannot load {entry.name} split: {e}") from None
        a.loaded_in = time.monotonic() - t0
        log.info("loaded %s split in %.1fs: %d layers here, %s", entry.name, a.loaded_in,
                 plan.head.layers, ", ".join(f"{p.layers} on {short_peer_id(p.device.name)}"
                                              for p in plan.workers))
        return a

    async def _hold(self, a: _Active, path: str, *, task_status: Any) -> None:
        """Owns a split's tunnels and process; ends when the process ends or `a.scope` is
        cancelled (unload, shutdown)."""
        with a.scope:
            async with trio.open_nursery() as nursery:
                ports = [await nursery.start(t.run) for t in a.tunnels]
                info = self.engine.store.info(self.engine.resolve(a.sha256))
                a.process = SplitProcess(
                    path, [f"127.0.0.1:{p}" for p in ports], gpu_layers=a.plan.gpu_layers,
                    tensor_split=a.plan.tensor_split if len(ports) > 1 else [],
                    n_ctx_seq=self.engine.n_ctx_for(info), n_threads=self.n_threads)
                await nursery.start(a.process.run)
                task_status.started()
                while a.process.alive:
                    await trio.sleep(0.2)
                nursery.cancel_scope.cancel()
        if self.active is a:
            self.active = None

    def _drop(self, a: _Active) -> None:
        a.scope.cancel()
        if self.active is a:
            self.active = None

    async def _active_for(self, model: str) -> _Active:
        async with self._lock:
            entry = self.engine.resolve(model)
            a = self.active
            if a is not None and a.sha256 == entry.sha256 and a.process is not None \
                    and a.process.alive:
                return a
            if a is not None:
                if a.busy:
                    raise EngineError("BUSY", f"the split of {a.name} is in use; retry shortly",
                                      retry_after=2.0)
                self._drop(a)
            self.active = await self._load(model)
            return self.active

    # ---- generating ------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def generate(self, req: GenerationRequest) -> AsyncIterator[RoutedGeneration]:
        a = await self._active_for(req.model)
        assert a.process is not None
        if req.messages is not None:
            chat = self.engine.render_chat(self.engine.resolve(req.model), list(req.messages))
            prompt, stops = chat.prompt, tuple(req.stop) + tuple(chat.stop)
        else:
            prompt, stops = req.prompt, tuple(req.stop)
        body = {"prompt": prompt, "resume": req.resume, "max_tokens": req.max_tokens,
                "sampling": {"temperature": req.temperature, "top_p": req.top_p,
                             "top_k": req.top_k, "min_p": req.min_p,
                             "repeat_penalty": req.repeat_penalty, "seed": req.seed},
                "stops": [s for s in stops if s], "reuse_prefix": req.seed is None,
                "grammar": req.grammar,
                "grammar_prefix": req.resume if req.grammar is not None else ""}
        result = GenerationResult()
        served = [self.node_id] + [p.device.name for p in a.plan.workers]
        a.busy += 1
        try:
            async with contextlib.AsyncExitStack() as stack:
                try:
                    gen = await stack.enter_async_context(a.process.generate(body))
                except SplitFailed as e:
                    raise EngineError("UNAVAILABLE", f"split of {a.name} failed: {e}") from None
                routed = RoutedGeneration(served, "split", result)
                routed._pieces = self._pieces(a, gen, result)
                yield routed
        finally:
            a.busy -= 1
            a.last_used = time.monotonic()

    async def _pieces(self, a: _Active, gen: Any, result: GenerationResult
                      ) -> AsyncIterator[str]:
        sent = 0
        async for piece in gen:
            sent += len(piece)
            yield piece
        if gen.outcome is not None:
            o = gen.outcome
            result.finish_reason = o["finish_reason"]
            result.prompt_tokens = o["prompt_tokens"]
            result.completion_tokens = o["completion_tokens"]
            result.cached_tokens = o["cached_tokens"]
            result.time_to_first_token = o["time_to_first_token"]
            result.tokens_per_s = o["tokens_per_s"]
            return
        if gen.failure is not None and a.process is not None and a.process.alive:
            raise EngineError("BAD_REQUEST", gen.failure)  # refused by the split process
        # the process is gone: give the tunnels a moment to record which worker failed
        with trio.move_on_after(1):
            while a.process is not None and a.process.alive:
                await trio.sleep(0.05)
        log.warning("split of %s failed mid-answer after %d characters: %s; ended the"
                    " client's stream with finish_reason error", a.name, sent, a.failure())
        result.finish_reason = "error"
        result.error = f"split of {a.name} failed mid-answer: {a.failure()}; retry the request"
        self._drop(a)


class SplitOrDelegate:
    """The router's remote side: delegation first, a split when delegation finds nobody."""

    def __init__(self, remote: RemoteGenerator, split: SplitInference) -> None:
        self.remote = remote
        self.split = split

    def has_candidates(self, model: str) -> bool:
        return self.remote.has_candidates(model)

    def __getattr__(self, name: str) -> Any:  # the rest of RemoteInference, unchanged
        return getattr(self.remote, name)

    @contextlib.asynccontextmanager
    async def generate(self, req: GenerationRequest, *, local_reason: EngineError | None = None
                       ) -> AsyncIterator[RoutedGeneration]:
        entered = False
        try:
            async with self.remote.generate(req, local_reason=local_reason) as routed:
                entered = True
                yield routed
            return
        except EngineError as e:
            if entered or e.code == "BUSY" or local_reason is None \
                    or local_reason.code != "TOO_LARGE":
                raise
            delegation_error = e
        async with contextlib.AsyncExitStack() as stack:
            try:
                routed = await stack.enter_async_context(self.split.generate(req))
            except EngineError as e:
                raise EngineError(e.code, f"{delegation_error.message}; and {e.message}",
                                  retry_after=e.retry_after) from None
            yield routed

"""Which layers of a model go on which device: pure logic, no I/O.

A split keeps on the head what llama.cpp keeps on the host anyway (token embeddings, the
output head when it is tied to them, the compute buffers) plus as many repeating blocks
("layers") as its free memory holds; the remaining layers go to workers. llama.cpp puts
the LAST `n_gpu_layers` layers on the offload devices (the RPC devices, divided by
`tensor_split`), so a plan is "the head keeps layers [0, k), worker 1 the next n1, ...".

Each layer costs its weights plus its share of the KV cache at the sequence context.
Layers go to devices in proportion to their speed (tokens/s measured on the model, when
known; else equal), clamped by what fits; the head first gets what its speed share and
memory allow, because a layer on the head costs no round trip. A plan that cannot fit
raises PlanError naming every device's free memory and the model's needs.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.gguf import GGUFInfo

# Compute buffers a worker allocates for its layers' activations (small next to weights).
WORKER_OVERHEAD = 32 << 20


@dataclass(frozen=True)
class ModelNeeds:
    name: str
    n_layers: int
    layer_bytes: int  # weights of one layer
    kv_layer_bytes: int  # KV cache of one layer at the sequence context
    head_fixed: int  # what stays on the head whatever the split (embeddings, compute)

    @property
    def per_layer(self) -> int:
        return self.layer_bytes + self.kv_layer_bytes

    @property
    def total(self) -> int:
        return self.head_fixed + self.n_layers * self.per_layer

    @classmethod
    def from_gguf(cls, name: str, info: GGUFInfo, n_ctx: int) -> ModelNeeds:
        n = max(1, info.n_layers)
        compute = info.memory_estimate(n_ctx) - info.tensor_bytes - info.kv_cache_bytes(n_ctx)
        block = info.block_tensor_bytes or info.tensor_bytes
        return cls(name=name, n_layers=n, layer_bytes=-(-block // n),
                   kv_layer_bytes=-(-info.kv_cache_bytes(n_ctx) // n),
                   head_fixed=info.tensor_bytes - block + compute)


@dataclass(frozen=True)
class Device:
    name: str  # "local" or the worker's peer id
    free: int  # bytes it may use for this model
    tokens_per_s: float | None = None  # its measured speed on this model, if known

    @property
    def is_head(self) -> bool:
        return self.name == "local"


@dataclass(frozen=True)
class Placement:
    device: Device
    layers: int
    memory: int  # bytes this placement needs on that device


@dataclass(frozen=True)
class SplitPlan:
    needs: ModelNeeds
    head: Placement
    workers: tuple[Placement, ...]

    @property
    def gpu_layers(self) -> int:
        """llama.cpp's n_gpu_layers: every layer not on the head."""
        return sum(p.layers for p in self.workers)

    @property
    def tensor_split(self) -> list[float]:
        return [float(p.layers) for p in self.workers]

    def to_dict(self) -> dict[str, object]:
        return {
            "model": self.needs.name,
            "n_layers": self.needs.n_layers,
            "model_memory": self.needs.total,
            "devices": [
                {"device": p.device.name, "layers": p.layers,
                 "first_layer": start, "memory": p.memory, "free": p.device.free}
                for p, start in zip((self.head, *self.workers), self._starts(), strict=True)
            ],
        }

    def _starts(self) -> list[int]:
        out, at = [], 0
        for p in (self.head, *self.workers):
            out.append(at)
            at += p.layers
        return out


class PlanError(Exception):
    """No split fits; the message names each device's free memory and the model's needs."""


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def plan_split(needs: ModelNeeds, head: Device, workers: list[Device]) -> SplitPlan:
    per = needs.per_layer
    cap = {head.name: max(0, (head.free - needs.head_fixed) // per) if per else 0}
    for w in workers:
        cap[w.name] = max(0, (w.free - WORKER_OVERHEAD) // per) if per else 0
    if head.free < needs.head_fixed or sum(cap.values()) < needs.n_layers:
        devices = "; ".join(f"{d.name if not d.is_head else 'this node'} has {_mib(d.free)}"
                            f" free" for d in (head, *workers))
        raise PlanError(
            f"model {needs.name} needs {_mib(needs.total)} ({_mib(needs.head_fixed)} on the"
            f" head plus {needs.n_layers} layers of {_mib(per)}); {devices or 'no workers'};"
            " no split fits: add a trusted worker with --layers-memory or free memory")
    devices = [head, *workers]
    speed = {d.name: d.tokens_per_s or 1.0 for d in devices}
    total_speed = sum(speed.values())
    share = {d.name: min(cap[d.name], int(needs.n_layers * speed[d.name] / total_speed))
             for d in devices}
    left = needs.n_layers - sum(share.values())
    # the rest goes where it fits: the head first (no round trip), then the fastest workers
    for d in sorted(devices, key=lambda d: (not d.is_head, -speed[d.name])):
        take = min(left, cap[d.name] - share[d.name])
        share[d.name] += take
        left -= take
    assert left == 0
    head_p = Placement(head, share[head.name], needs.head_fixed + share[head.name] * per)
    worker_p = tuple(Placement(w, share[w.name], WORKER_OVERHEAD + share[w.name] * per)
                     for w in workers if share[w.name] > 0)
    return SplitPlan(needs, head_p, worker_p)

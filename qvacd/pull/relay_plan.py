"""What a pull may fetch from providers whose only path is a relayed connection.

The relay charges every byte it forwards on one circuit (one relayed connection, both
directions, Noise and yamux framing included) to one budget, and cuts the whole
connection when the budget or the circuit's duration runs out; it does not count
circuits over time. So a pull *could* finish a large model by letting the relay cut it
and reconnecting again and again. We do not: the limit is what the relay's owner agreed
to carry per connection, and each cut kills every stream on that connection (a delegated
answer included) and the chunks in flight. The rule:
  - what a pull fetches from one provider over a relayed connection must fit in what
    that circuit has left when the pull plans (bytes left minus RELAY_RESERVE for the
    other traffic on the connection, divided by 1 + RELAY_OVERHEAD for framing), and a
    chunk is only started with time for it at the slowest rate we accept (min_rate)
    before the relay ends the circuit;
  - providers with a direct path, or a relay that sets no limit, are unlimited; several
    relayed providers each carry their own share over their own circuit;
  - a pull none of whose providers can carry it, alone or together, fails before it
    fetches a chunk, naming the model's size, the relay's limit and what to do;
  - a provider whose share is spent stops taking chunks (the others finish); a
    connection that went direct (hole punching) is unlimited from then on; one that
    broke and came back over a new circuit (never a cut of ours) is planned afresh.

The circuits themselves (limits from the relay's CONNECT/STOP, bytes counted as the
relay counts them) are peers/relay.py's; this module only reads them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Container
from dataclasses import dataclass
from typing import Protocol

from models.manifest import Manifest

from .errors import PullError
from .options import PullOptions

plog = logging.getLogger("qvacd.pull")

RELAY_OVERHEAD = 0.02  # framing is ~0.1 % of a bulk transfer; the rest is headroom
RELAY_RESERVE = 1 << 20  # bytes left to capacity pushes, pings and delegation


class Circuit(Protocol):
    """One relayed connection and the relay's limits on it (peers.relay.Circuit)."""

    @property
    def relay(self) -> str: ...
    @property
    def limit_bytes(self) -> int: ...  # 0: unlimited
    @property
    def limit_duration_s(self) -> int: ...  # 0: unlimited
    @property
    def used(self) -> int: ...  # bytes carried both ways so far

    def bytes_left(self) -> int | None: ...
    def seconds_left(self) -> float | None: ...


class CircuitView(Protocol):
    """Where the relayed circuits are known (peers.relay.RelayService)."""

    def circuit(self, peer: str) -> Circuit | None: ...


@dataclass
class RelayPlan:
    """What one provider may carry for a pull over its relayed circuit."""

    circuit: Circuit
    allowance: int | None  # model bytes, whole chunks are charged against it; None: no limit
    charged: int = 0  # bytes of chunks fetched or in flight over it

    @staticmethod
    def carries(circuit: Circuit) -> int | None:
        """Model bytes `circuit` may still carry; None when the relay sets no byte limit."""
        left = circuit.bytes_left()
        if left is None:
            return None
        return max(0, int((left - RELAY_RESERVE) / (1 + RELAY_OVERHEAD)))


def human(n: int) -> str:
    """Bytes for people, in decimal units: 268.1 MB."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


class RelayPlanner:
    """Applies the rule above: plans each relayed provider's share before a pull fetches,
    and charges every chunk to its provider's circuit as it is started."""

    def __init__(self, relay: CircuitView | None, options: PullOptions) -> None:
        self.relay = relay
        self.options = options

    def circuit(self, peer: str) -> Circuit | None:
        """The relayed circuit our only path to `peer` goes over, or None (direct, none
        yet, or a relay that set no limits we know of)."""
        if self.relay is None:
            return None
        try:
            return self.relay.circuit(peer)
        except Exception:  # noqa: BLE001 - a view; a failure must not stop a pull
            plog.debug("relay circuit of %s unknown", peer, exc_info=True)
            return None

    def plan(self, manifest: Manifest, providers: list[str], name: str, needed: int, *,
             dropped: Container[str], drop: Callable[[str, str], None]
             ) -> dict[str, RelayPlan]:
        """Each relayed provider's share; PullError(413) when no path can carry `needed`
        bytes. Providers that cannot carry one chunk are dropped for this pull
        (`drop(peer, why)`); those in `dropped` already are not considered."""
        plans: dict[str, RelayPlan] = {}
        if needed <= 0:
            return plans
        chunk = manifest.chunk_size
        unusable: dict[str, str] = {}
        unlimited = False
        capacity = 0  # bytes, in whole chunks, the relayed providers can carry together
        for peer in providers:
            if peer in dropped:
                continue
            c = self.circuit(peer)
            if c is None:
                unlimited = True
                continue
            plan = RelayPlan(c, RelayPlan.carries(c))
            secs = c.seconds_left()
            if secs is not None and secs < self.options.chunk_deadline(chunk):
                unusable[peer] = (f"its relayed connection through {c.relay} ends in"
                                  f" {secs:.0f} s (the relay limits a connection to"
                                  f" {c.limit_duration_s} s)")
            elif plan.allowance is not None and plan.allowance < min(chunk, needed):
                unusable[peer] = (f"its relayed connection through {c.relay} has"
                                  f" {human(c.bytes_left() or 0)} left of the relay's"
                                  f" {human(c.limit_bytes)} limit per connection")
            else:
                plans[peer] = plan
                if plan.allowance is None:
                    unlimited = True
                else:  # whole chunks: a share is never cut inside one
                    capacity += (plan.allowance if plan.allowance >= needed
                                 else plan.allowance // chunk * chunk)
        if not unlimited and capacity < needed:
            raise PullError(413, self.too_big(manifest, name, needed, providers, plans))
        for peer, why in unusable.items():
            drop(peer, why)
        for peer, plan in plans.items():
            c = plan.circuit
            plog.info("pull of %s: %s only through relay %s: may carry %s of %s (limit %s"
                      " per connection, %s used; %s)", name, peer, c.relay,
                      "all" if plan.allowance is None else human(plan.allowance),
                      human(needed), human(c.limit_bytes) if c.limit_bytes else "none",
                      human(c.used), "no time limit" if c.seconds_left() is None
                      else f"{c.seconds_left():.0f} s left")
        return plans

    def too_big(self, manifest: Manifest, name: str, needed: int, providers: list[str],
                plans: dict[str, RelayPlan]) -> str:
        """The one-line refusal of a pull that no provider's path can carry."""
        circuits = [c for c in (self.circuit(p) for p in providers) if c is not None]
        best = max(circuits, key=lambda c: (c.bytes_left() or 0, c.seconds_left() or 0))
        relays = sorted({c.relay for c in circuits})
        still = "" if needed == manifest.size else f", {human(needed)} of it still to fetch"
        what = (f"cannot pull {name}: the model is {human(manifest.size)}"
                f" ({manifest.size} bytes{still}) and its {len(providers)} provider(s) can"
                f" be reached only through relay {', '.join(relays)}")
        if best.limit_bytes:
            what += (f", which carries at most {human(best.limit_bytes)}"
                     f" ({best.limit_bytes} bytes) per connection")
            if (best.bytes_left() or 0) < best.limit_bytes:
                what += f" ({human(best.bytes_left() or 0)} left on the one in use)"
        secs = best.seconds_left()
        if (not plans and secs is not None
                and secs < self.options.chunk_deadline(manifest.chunk_size)):
            what += (f"; it ends a connection after {best.limit_duration_s} s and the one in"
                     f" use has {secs:.0f} s left")
            todo = ("ask the relay's owner to raise --relay-circuit-duration, or pull again"
                    " once the connection is renewed")
        else:
            want = best.used + int(needed * (1 + RELAY_OVERHEAD)) + RELAY_RESERVE
            todo = ("ask the relay's owner to raise --relay-circuit-bytes to at least"
                    f" {-(-want // (1 << 20))}MiB")
        return (f"{what}; nothing was fetched: {todo}, or pull once a direct connection"
                " works (hole punching, i.e. without --no-hole-punch, or a reachable"
                " address), or pull from another peer with --from PEERID")

    def charge(self, plans: dict[str, RelayPlan], peer: str, length: int
               ) -> tuple[RelayPlan | None, str | None]:
        """Charge one chunk of `length` bytes to `peer`'s relayed circuit, if it is
        relayed: (the plan charged or None, None) or (None, why it cannot take it)."""
        c = self.circuit(peer)
        if c is None:
            return None, None  # direct (now), or a relay without limits
        plan = plans.get(peer)
        if plan is None or plan.circuit is not c:
            # a path that was direct at the start, or a connection that broke and came
            # back over a new circuit: plan that circuit afresh
            plan = plans[peer] = RelayPlan(c, RelayPlan.carries(c))
        secs = c.seconds_left()
        if secs is not None and secs < self.options.chunk_deadline(length):
            return None, (f"its relayed connection through {c.relay} ends in {secs:.0f} s"
                          f" (the relay limits a connection to {c.limit_duration_s} s),"
                          " too soon for another chunk; pull again to go on over a new one")
        if plan.allowance is not None and plan.charged + length > plan.allowance:
            return None, (f"its share ({human(plan.allowance)}) of what relay {c.relay}"
                          f" carries per connection ({human(c.limit_bytes)}) is fetched")
        plan.charged += length
        return plan, None


__all__ = ["RELAY_OVERHEAD", "RELAY_RESERVE", "Circuit", "CircuitView", "RelayPlan",
           "RelayPlanner", "human"]

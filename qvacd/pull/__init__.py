"""Pulling a model from peers over `/qvac/shard/1.0.0` (the seeder is
qvacd/services/shard.py).

The public surface is `Puller`, `PullOptions` and `PullError`; the modules behind it:
    puller.py        orchestration: providers, manifests, chunks from all providers at
                     once, verification, commit to the store
    download.py      one download shared by every pull of a model, and its progress
    shard_client.py  one manifest or chunk request to one provider, with its timeouts
    lanes.py         how many lanes (kept streams) each provider runs, by measured rate
    relay_plan.py    what a provider reachable only through a relay may carry
    errors.py        PullError, and the faults that decide whom to drop
    options.py       the knobs
    metrics.py       the puller's Prometheus metrics
The partial file and its record of verified chunks are models/partial.py.

Through a relay: a provider whose only path is a relayed connection is limited by the
relay's per-circuit byte and duration limits (relay_plan.py has the rule); a pull that
no provider path can carry fails before it fetches anything, and says why and what to do.
"""

from .errors import PullError
from .options import PullOptions
from .puller import Puller

__all__ = ["PullError", "PullOptions", "Puller"]

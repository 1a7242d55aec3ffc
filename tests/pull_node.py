"""Test launcher: `qvacd start` with test-only knobs for the shard service and puller.

Until qvacd/node.py, qvacd/api.py and qvacd/cli.py wire the shard service, the puller and
`/api/pull` themselves, integration tests start daemons through this script instead of
`python -m qvacd.cli start`. It does exactly what the real wiring will do:

    node._init_network:  ShardService.for_node(node) on SHARD_PROTOCOL; Puller.for_node(node)
    node.run:            the puller's nursery runs beside the node's
    api.build_app:       POST /api/pull -> api_pull(request, node)

Test-only knobs (environment; the real daemon gets these as config options):
    QVACD_SHARD_UPLOAD_RATE      seeder upload cap, bytes/s (default unlimited)
    QVACD_SHARD_MAX_UPLOADS      seeder concurrent uploads (default 4)
    QVACD_PULL_STALL_TIMEOUT     puller stall timeout, seconds
    QVACD_PULL_STREAMS           puller streams per provider (bench)
    QVACD_TEST_BAD_SEEDER        corrupt | short | stall | manifest: serve with the
                                 dishonest seeder from tests/pull_bad_seeder.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for pull_bad_seeder
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from protocol import SHARD_PROTOCOL
from qvacd import api as api_mod
from qvacd import cli
from qvacd import node as node_mod
from qvacd.pull_api import api_pull
from qvacd.shards import Puller, PullOptions, ShardService


def _shard_service(node: node_mod.Node) -> ShardService:
    rate = float(os.environ.get("QVACD_SHARD_UPLOAD_RATE", "0") or 0)
    uploads = int(os.environ.get("QVACD_SHARD_MAX_UPLOADS", "4") or 4)
    bad = os.environ.get("QVACD_TEST_BAD_SEEDER", "")
    cls: type[ShardService] = ShardService
    kwargs = {}
    if bad:
        from pull_bad_seeder import BadShardService

        cls = BadShardService
        kwargs = {"mode": bad}
    svc = ShardService.for_node(node)
    return cls(node.store, is_authorized=svc.is_authorized, max_uploads=uploads,
               upload_rate=rate, registry=node.metrics.registry, **kwargs)


_orig_init_network = node_mod.Node._init_network


def _init_network(self: node_mod.Node) -> None:
    _orig_init_network(self)
    self.shard_service = _shard_service(self)
    self.network.set_stream_handler(SHARD_PROTOCOL, self.shard_service.handle)
    opts = PullOptions()
    stall = os.environ.get("QVACD_PULL_STALL_TIMEOUT")
    if stall:
        opts.stall_timeout_s = float(stall)
    streams = os.environ.get("QVACD_PULL_STREAMS")
    if streams and int(streams) > 0:
        opts.streams_per_provider = int(streams)
    self.puller = Puller.for_node(self, opts)


node_mod.Node._init_network = _init_network

if __name__ == "__main__":
    sys.exit(cli.main(["start", *sys.argv[1:]]))

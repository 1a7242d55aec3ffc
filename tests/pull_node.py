"""Test launcher: `qvacd start`, plus test-only knobs for the shard service and puller.

The daemon wires model distribution itself (qvacd/node.py); this script changes nothing
unless one of these is set (real options such as --shard-upload-rate go on the command
line or in QVACD_* variables as usual):

    QVACD_TEST_BAD_SEEDER     corrupt | short | stall | manifest: serve with the
                              dishonest seeder from tests/pull_bad_seeder.py
    QVACD_PULL_STALL_TIMEOUT  puller stall timeout, seconds (default 15)
    QVACD_PULL_STREAMS        puller streams per provider (bench)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for pull_bad_seeder
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocol import SHARD_PROTOCOL
from qvacd import cli
from qvacd import node as node_mod
from qvacd.pull import Puller, PullOptions

_orig_init_network = node_mod.Node._init_network


def _init_network(self: node_mod.Node) -> None:
    _orig_init_network(self)
    bad = os.environ.get("QVACD_TEST_BAD_SEEDER", "")
    if bad:
        from pull_bad_seeder import BadShardService

        real = self.shard_service
        self.shard_service = BadShardService(
            self.store, is_authorized=real.is_authorized, max_uploads=real.max_uploads,
            upload_rate=real.rate.rate, registry=self.metrics.registry, mode=bad)
        self.network.set_stream_handler(SHARD_PROTOCOL, self.shard_service.handle)
    stall = os.environ.get("QVACD_PULL_STALL_TIMEOUT")
    streams = os.environ.get("QVACD_PULL_STREAMS")
    if stall or streams:
        opts = PullOptions()
        if stall:
            opts.stall_timeout_s = float(stall)
        if streams and int(streams) > 0:
            opts.streams_per_provider = int(streams)
        self.puller = Puller(self.store, self.network, self.trust,
                             registry=self.metrics.registry, options=opts)


node_mod.Node._init_network = _init_network

if __name__ == "__main__":
    sys.exit(cli.main(["start", *sys.argv[1:]]))

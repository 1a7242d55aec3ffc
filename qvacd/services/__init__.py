"""The peer-protocol services this node runs: what it answers when a peer opens a stream.

    infer.py   /qvac/infer/1.0.0: generations for trusted consumers (InferService)
    shard.py   /qvac/shard/1.0.0: manifests and chunks of our models for trusted
               seeders (ShardService); the puller, its client, is qvacd/pull/

Each service is handed to the network with `set_stream_handler` by qvacd.node; none of
them dials out or imports the HTTP API.
"""

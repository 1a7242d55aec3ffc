"""A provider from before InferRequest.grammar, for tests: a real libp2p node with a real
signed capacity record that claims the default model (warm, fast, idle, so the router
picks it first), that answers every request as an old qvacd would: Accepted without
`grammar` (it never read the field), then free text and Done.

    python tests/grammar_blind_provider.py DATA_DIR PORT SHA256
"""

from __future__ import annotations

import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from peers import PeerNetwork
from peers.device import DeviceInfo
from peers.identity import load_or_create_identity
from peers.records import CapacityRecord, ModelInfo
from peers.trust import TrustStore
from protocol import INFER_PROTOCOL, Accepted, Done, FinishReason, Token, encode_frame

TEXT = "not JSON, because the grammar was never read"


async def main() -> None:
    data_dir, port, sha = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    ident = load_or_create_identity(data_dir)

    def capacity() -> CapacityRecord:
        return CapacityRecord.issue(
            ident.peer_id_str, 0, DeviceInfo("cpu", "old provider", 1 << 34, 1 << 34),
            memory_budget=1 << 34,
            models=(ModelInfo(sha, "gemma3-270m", 253113024, True, 400 << 20),),
            slots_total=4, slots_free=4, queue_len=0, tokens_per_s={sha: 10000.0},
            roles=("provider",))

    async def handler(stream, peer: str) -> None:
        await stream.read(65536)  # the request; its grammar (if any) goes unread
        await stream.write(encode_frame(Accepted(queue_position=0)))
        await stream.write(encode_frame(Token(text=TEXT)))
        await stream.write(encode_frame(Done(finish_reason=FinishReason.STOP, prompt_tokens=1,
                                             completion_tokens=9)))
        await stream.close()

    net = PeerNetwork(ident, capacity_source=capacity,
                      listen_addrs=[f"/ip4/127.0.0.1/tcp/{port}"], mdns=False,
                      trust_store=TrustStore.in_dir(data_dir))
    net.set_stream_handler(INFER_PROTOCOL, handler)
    async with trio.open_nursery() as nursery:
        await nursery.start(net.run)
        print("ready", flush=True)


if __name__ == "__main__":
    trio.run(main)

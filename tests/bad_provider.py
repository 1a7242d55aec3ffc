"""A misbehaving provider for tests: a real libp2p node with a real signed capacity
record that claims the default model (warm, fast, idle, so the router picks it first),
that answers in one of three ways (MODE):
- `garbage`: an undecodable frame after three tokens;
- `stall`: silent after three tokens;
- `grammar-blind`: as a qvacd from before InferRequest.grammar would: Accepted without
  `grammar` (it never read the field), then free text (GRAMMAR_BLIND_TEXT) and Done.

    python tests/bad_provider.py DATA_DIR PORT MODE SHA256
"""

from __future__ import annotations

import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from peers.device import DeviceInfo  # noqa: E402
from peers.identity import load_or_create_identity  # noqa: E402
from peers import PeerNetwork  # noqa: E402
from peers.records import CapacityRecord, ModelInfo  # noqa: E402
from peers.trust import TrustStore  # noqa: E402
from protocol import (  # noqa: E402
    INFER_PROTOCOL, Accepted, Done, FinishReason, Token, encode_frame)

PIECES = [" 4", ",", " 5,"]
GRAMMAR_BLIND_TEXT = "not JSON, because the grammar was never read"
MODES = ("garbage", "stall", "grammar-blind")


async def main() -> None:
    data_dir, port, mode, sha = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    if mode not in MODES:
        raise SystemExit(f"bad_provider.py: MODE must be one of {', '.join(MODES)}, not {mode!r}")
    ident = load_or_create_identity(data_dir)

    def capacity() -> CapacityRecord:
        return CapacityRecord.issue(
            ident.peer_id_str, 0, DeviceInfo("cpu", "bad provider", 1 << 34, 1 << 34),
            memory_budget=1 << 34,
            models=(ModelInfo(sha, "gemma3-270m", 253113024, True, 400 << 20),),
            slots_total=4, slots_free=4, queue_len=0, tokens_per_s={sha: 10000.0},
            roles=("provider",))

    async def handler(stream, peer: str) -> None:
        await stream.read(65536)  # the request; we do not care what it says
        await stream.write(encode_frame(Accepted(queue_position=0)))
        if mode == "grammar-blind":
            await stream.write(encode_frame(Token(text=GRAMMAR_BLIND_TEXT)))
            await stream.write(encode_frame(Done(finish_reason=FinishReason.STOP,
                                                 prompt_tokens=1, completion_tokens=9)))
            await stream.close()
            return
        for piece in PIECES:
            await stream.write(encode_frame(Token(text=piece)))
        if mode == "garbage":
            await stream.write(b"\x08\xc1\xc1\xc1\xc1\xc1\xc1\xc1\xc1")  # 0xc1: never valid
            await trio.sleep(60)
        else:
            await trio.sleep(3600)

    net = PeerNetwork(ident, capacity_source=capacity,
                      listen_addrs=[f"/ip4/127.0.0.1/tcp/{port}"], mdns=False,
                      trust_store=TrustStore.in_dir(data_dir))
    net.set_stream_handler(INFER_PROTOCOL, handler)
    async with trio.open_nursery() as nursery:
        await nursery.start(net.run)
        print("ready", flush=True)


if __name__ == "__main__":
    trio.run(main)

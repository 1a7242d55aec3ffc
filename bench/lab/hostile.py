"""A hostile node for the mesh lab: untrusted, on the same LAN, doing its worst.

    ip netns exec NS nice -n 19 python -m bench.lab.hostile TARGETS_JSON DATA_DIR

TARGETS_JSON: [{"peer_id", "ip", "port"}, ...], the lab's trusted nodes. It is a real
libp2p node (its own fresh identity, announced over mDNS like any other) that serves a
too-good capacity record claiming the default model, warm, idle and very fast, so a
router that forgot to check trust would pick it. Prints {"peer_id": ...} when up, then
obeys lines on stdin, answering each with one JSON line:

  on [I,J..]  start attacking every target (or only targets I, J, ... by index):
           - capacity flood: 8 concurrent loops per target of new stream + CapacityRequest;
           - malformed frames: 2 loops per target sending junk on /qvac/capacity and
             /qvac/infer (bad varints, oversized lengths, deep nesting, wrong types,
             random bytes, requests it is not allowed to make);
           - raw garbage: TCP connections to the libp2p port that send random bytes
             instead of a handshake, plus up to 16 held open and silent;
           - mDNS spoofing: announces itself under the first target's peer id.
  off    stop attacking (the node stays up)
  stats  counters so far
End of stdin stops it.
"""

from __future__ import annotations

import json
import os
import random
import socket
import sys
import time
from pathlib import Path
from typing import Any

import trio
from zeroconf import IPVersion, ServiceInfo, Zeroconf

from peers.device import DeviceInfo
from peers.identity import load_or_create_identity
from peers.mdns import SERVICE_TYPE
from peers import PeerNetwork
from peers.records import CapacityRecord, ModelInfo
from protocol import (
    CAPACITY_PROTOCOL,
    INFER_PROTOCOL,
    CapacityRequest,
    CapacityResponse,
    Error,
    FrameDecoder,
    InferRequest,
    Token,
    encode_frame,
    encode_varint,
)

MODEL_SHA = "0" * 64  # replaced by the real sha from a target's record when known


def junk_payloads(rng: random.Random) -> list[tuple[str, bytes]]:
    import msgpack

    deep = b"\x91" * 5000 + b"\xc0"
    return [
        (CAPACITY_PROTOCOL, b"\x05hello"),
        (CAPACITY_PROTOCOL, encode_varint(100 << 20) + b"x" * 64),
        (INFER_PROTOCOL, encode_varint(len(deep)) + deep),
        (INFER_PROTOCOL, encode_varint(20) + msgpack.packb({"t": "req", "model": 7})),
        (INFER_PROTOCOL, encode_frame(Token(text="not a request"))),
        (INFER_PROTOCOL, encode_frame(InferRequest(model="gemma3-270m", prompt="x" * 2000,
                                                   max_tokens=512, deadline_ms=60000))),
        (CAPACITY_PROTOCOL, bytes(rng.getrandbits(8) for _ in range(256))),
        (INFER_PROTOCOL, b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"),
        (CAPACITY_PROTOCOL, encode_varint(9) + b"\xc1" * 9),
    ]


class Hostile:
    def __init__(self, targets: list[dict[str, Any]], data_dir: Path) -> None:
        self.targets = targets
        self.ident = load_or_create_identity(data_dir)
        self.on = False
        self.active: set[str] = set()  # peer ids under attack while on
        self.wake = trio.Event()
        self.c: dict[str, Any] = {k: 0 for k in (
            "cap_sent", "cap_ok", "cap_busy", "cap_fail", "junk_sent", "junk_replied",
            "raw_sent", "raw_held")}
        self.c["spoof"] = False
        self.attack_s = 0.0
        self._on_since: float | None = None
        self.rng = random.Random(7)
        self.net = PeerNetwork(self.ident, capacity_source=self.capacity,
                               listen_addrs=["/ip4/0.0.0.0/tcp/4001"], mdns=True)

    def capacity(self) -> CapacityRecord:
        sha = MODEL_SHA
        for e in self.net.table:  # claim exactly what the victims hold
            if e.record is not None:
                for m in e.record.models:
                    sha = m.sha256
        return CapacityRecord.issue(
            self.ident.peer_id_str, 0, DeviceInfo("cuda", "hostile", 1 << 36, 1 << 36),
            memory_budget=1 << 36,
            models=(ModelInfo(sha, "gemma3-270m", 253113024, True, 400 << 20),),
            slots_total=64, slots_free=64, queue_len=0, tokens_per_s={sha: 99999.0},
            roles=("provider", "seeder"))

    async def gate(self, t: dict[str, Any] | None = None) -> None:
        while not self.on or (t is not None and t["peer_id"] not in self.active):
            await self.wake.wait()

    async def cap_flood(self, t: dict[str, Any]) -> None:
        while True:
            await self.gate(t)
            self.c["cap_sent"] += 1
            try:
                with trio.fail_after(5):
                    s = await self.net.open_stream(t["peer_id"], CAPACITY_PROTOCOL, timeout=5)
                    await s.write(encode_frame(CapacityRequest()))
                    dec = FrameDecoder()
                    msg = None
                    while msg is None:
                        data = await s.read(65536)
                        if not data:
                            break
                        dec.feed(data)
                        msg = dec.next_message()
                    await s.close()
                if isinstance(msg, CapacityResponse):
                    self.c["cap_ok"] += 1
                elif isinstance(msg, Error):
                    self.c["cap_busy"] += 1
                else:
                    self.c["cap_fail"] += 1
            except Exception:  # noqa: BLE001 - a hostile node shrugs off anything
                self.c["cap_fail"] += 1
                await trio.sleep(0.05)

    async def junk(self, t: dict[str, Any]) -> None:
        payloads = junk_payloads(self.rng)
        k = 0
        while True:
            await self.gate(t)
            proto, payload = payloads[k % len(payloads)]
            k += 1
            self.c["junk_sent"] += 1
            try:
                with trio.fail_after(5):
                    s = await self.net.open_stream(t["peer_id"], proto, timeout=5)
                    await s.write(payload)
                    if await s.read(65536):
                        self.c["junk_replied"] += 1
                    await s.reset()
            except Exception:  # noqa: BLE001 - a hostile node shrugs off anything
                await trio.sleep(0.05)

    async def raw(self, t: dict[str, Any]) -> None:
        held: list[trio.SocketStream] = []
        try:
            while True:
                await self.gate(t)
                try:
                    with trio.fail_after(3):
                        st = await trio.open_tcp_stream(t["ip"], t["port"])
                        self.c["raw_sent"] += 1
                        if len(held) < 16 and self.rng.random() < 0.2:
                            held.append(st)  # a silent half-open handshake
                            self.c["raw_held"] += 1
                        else:
                            await st.send_all(os.urandom(self.rng.randrange(1, 2048)))
                            await st.aclose()
                except (OSError, trio.TooSlowError, trio.BrokenResourceError):
                    await trio.sleep(0.05)
                await trio.sleep(0.01)
        finally:
            for st in held:
                with trio.CancelScope(shield=True):
                    await st.aclose()

    def _spoof_info(self) -> ServiceInfo | None:
        if not self.targets:
            return None
        victim = self.targets[0]["peer_id"]
        ip = next((a.split("/")[2] for a in self.net.listen_addrs() if "/ip4/" in a
                   and not a.startswith("/ip4/127.")), None)
        if ip is None:
            return None
        return ServiceInfo(SERVICE_TYPE, f"{victim}.{SERVICE_TYPE}",
                           addresses=[socket.inet_aton(ip)], port=4001,
                           properties={"id": victim, "a0": f"/ip4/{ip}/tcp/4001"},
                           server=f"spoof-{victim[-8:].lower()}.local.")

    async def spoof(self) -> None:
        await self.gate()
        info = self._spoof_info()
        if info is None:
            return
        zc = await trio.to_thread.run_sync(lambda: Zeroconf(ip_version=IPVersion.V4Only))
        try:
            await trio.to_thread.run_sync(
                lambda: zc.register_service(info, cooperating_responders=True))
            self.c["spoof"] = True
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(zc.close)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.net.run)
            for t in self.targets:  # connect directly too, so the flood starts at once
                try:
                    await self.net.connect(f"/ip4/{t['ip']}/tcp/{t['port']}/p2p/{t['peer_id']}",
                                           source="bootstrap")
                except Exception:  # noqa: BLE001, S110 - unreachable now: mDNS finds it later
                    pass
            print(json.dumps({"peer_id": self.ident.peer_id_str}), flush=True)
            # LAB_ATTACKS (comma list of cap, junk, raw, spoof; default all) picks attacks,
            # to tell which one costs the victims what
            attacks = set(os.environ.get("LAB_ATTACKS", "cap,junk,raw,spoof").split(","))
            for t in self.targets:
                for _ in range(8 if "cap" in attacks else 0):
                    nursery.start_soon(self.cap_flood, t)
                for _ in range(2 if "junk" in attacks else 0):
                    nursery.start_soon(self.junk, t)
                if "raw" in attacks:
                    nursery.start_soon(self.raw, t)
            if "spoof" in attacks:
                nursery.start_soon(self.spoof)
            stdin = trio.lowlevel.FdStream(os.dup(0))
            buf = b""
            while True:
                data = await stdin.receive_some(4096)
                if not data:
                    break
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    cmd, _, arg = line.strip().decode().partition(" ")
                    now = time.monotonic()
                    if cmd == "on":
                        idx = [int(x) for x in arg.split(",") if x.strip()] or range(
                            len(self.targets))
                        self.active = {self.targets[i]["peer_id"] for i in idx}
                        if not self.on:
                            self.on, self._on_since = True, now
                        self.wake.set()
                        self.wake = trio.Event()
                    elif cmd == "off" and self.on:
                        self.on = False
                        self.attack_s += now - (self._on_since or now)
                        self.wake = trio.Event()
                    out = dict(self.c)
                    out["attack_s"] = self.attack_s + (now - self._on_since
                                                       if self.on and self._on_since else 0)
                    print(json.dumps(out), flush=True)
            nursery.cancel_scope.cancel()


def main() -> None:
    targets = json.loads(sys.argv[1])
    data_dir = Path(sys.argv[2])
    data_dir.mkdir(parents=True, exist_ok=True)
    trio.run(Hostile(targets, data_dir).run)


if __name__ == "__main__":
    main()

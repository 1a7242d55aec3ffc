"""The split scenario: a model split across two lab hosts, at 0, 20 and 80 ms per host,
and what bounds its tokens/s: the RPC round trips each token waits for.

A head (n0) and a worker (n1), each started with a budget too small for the default model
(300 MiB at a 1024-token context; the worker offers 200 MiB of it for layers), the worker
trusting the head with the "layers" role, the head trusting only the worker as a
provider (so delegation finds nobody and the split runs: the last layers on the
worker, over /qvac/layers/1.0.0 across the lab link). The reference is the same model
whole on one full node (n2, same context), asked with X-Qvac-Local-Only, in the same
rounds, alternating order.

Round trips are measured, not assumed: a packet sniffer (`python -m
bench.lab.split_scenario sniff`, AF_PACKET, run inside the head's namespace) records

- on lo, the plaintext ggml RPC between the split process and the head's tunnel port:
  every command (cmd byte, u64 size, payload) parsed from the reassembled stream; the
  ones whose server sends an answer (GET_TENSOR, SET_TENSOR_HASH, COPY_TENSOR, ...) each
  block the RPC client's one dispatcher thread for a round trip (SET_TENSOR and
  GRAPH_(RE)COMPUTE are sent without waiting). Their count per token, between the
  client's first and last token, over the tokens in between, is the round trips per
  token the bound uses; GRAPH_COMPUTE + GRAPH_RECOMPUTE per token is the worker's
  decodes (one per token);
- on eth0, every TCP segment with payload between head and worker (what crossed the lab
  link; encrypted, so timing, direction and size only): an answer burst is a run of
  worker->head segments after a head->worker one. Those carrying at least the smallest
  GET_TENSOR answer are the link's round trips per token (a cross-check of the RPC
  count, independent of it); the rest are flow control (yamux window updates), counted
  beside them ("any size"). The median time from a GET_TENSOR leaving the split process
  to its answer burst is the answer wait: RTT + the worker's compute + both tunnels.

Bound per condition: tokens/s <= 1 / (round_trips_per_token x RTT + compute per token),
compute per token taken from the clean row (1 / its tokens/s: its RTT is ~0), RTT the
lab's (every host's egress delayed, so RTT = 2 x delay). PASS: every stream completes,
served by head + worker (the split) or by the reference node alone; at least one
answered RPC command per token (a split that waits for nothing would mean the capture
missed it); and no measured tokens/s above 1.1 x the bound computed with the whole
model's time per token from the same rounds (the split does that work and more, under
the same load, so only round trips counted too many could break it). The clean-split
bound shifts with the machine's load between conditions; the decomposition does not: a
token's period against the capture's head time + answer wait, both medians.
"""

from __future__ import annotations

import bisect
import os
import pickle
import select
import socket
import statistics
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from bench.lab.netns import Impair
from bench.lab.nodes import Lab, LabNode, StreamResult
from bench.lab.scenarios import PROMPT, Options, Result, ensure_mesh, f1, med, ms, say
from peers.trust import TrustStore

CTX = "1024"
HEAD_BUDGET = "300MiB"
WORKER_LAYERS = "200MiB"
CONDITIONS = [Impair(0), Impair(20), Impair(80)]
BOUND_WHOLE = "bound, whole's compute tok/s"
API_PORT = 11435  # bench/lab/nodes.py's, inside every namespace: not RPC

# ggml-rpc.cpp (RPC protocol 7): command ids, and the ones whose server sends an answer
RPC_NAMES = ["ALLOC_BUFFER", "GET_ALIGNMENT", "GET_MAX_SIZE", "BUFFER_GET_BASE",
             "FREE_BUFFER", "BUFFER_CLEAR", "SET_TENSOR", "SET_TENSOR_HASH", "GET_TENSOR",
             "COPY_TENSOR", "GRAPH_COMPUTE", "GET_DEVICE_MEMORY", "INIT_TENSOR",
             "GET_ALLOC_SIZE", "HELLO", "DEVICE_COUNT", "GRAPH_RECOMPUTE", "MEMSET_TENSOR"]
ANSWERED = {0, 1, 2, 3, 7, 8, 9, 11, 13, 14, 15}
DECODES = {10, 16}  # GRAPH_COMPUTE, GRAPH_RECOMPUTE
GET_TENSOR = 8
_GET_TENSOR_REQ = 296 + 8 + 8  # rpc_tensor | offset u64 | size u64


# ---- the sniffer (a child process inside the head's namespace) ------------------------

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
SO_TIMESTAMPNS = 35
SO_RCVBUFFORCE = 33
PACKET_STATISTICS = 6
SOL_PACKET = 263


def sniff(out: str, here: str, peer: str) -> int:
    """Until stdin closes: TCP segments with payload between `here` and `peer` on any
    interface but lo (t, up?, length), their SYN/FIN/RSTs (upper case: sent by `here`),
    and every TCP payload on lo except the API's (t, src port, dst port, seq, bytes);
    pickled to `out` with the kernel's drop count."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    try:
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
    except OSError:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 20)
    s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    here_b, peer_b = socket.inet_aton(here), socket.inet_aton(peer)
    offset = time.time() - time.monotonic()  # kernel stamps are CLOCK_REALTIME
    link: list[tuple[float, bool, int]] = []
    lo: list[tuple[float, int, int, int, bytes]] = []
    conns: list[tuple[float, str, int, int]] = []  # SYN/FIN/RST on the link: (t, flag, ports)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while True:
        r, _, _ = select.select([s, sys.stdin], [], [])
        if sys.stdin in r and not os.read(sys.stdin.fileno(), 4096):
            break
        if s not in r:
            continue
        for _ in range(256):
            try:
                data, anc, _, addr = s.recvmsg(70000, 64, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            ifname, _, pkttype = addr[0], addr[1], addr[2]
            t = time.monotonic()
            for level, kind, val in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack("ll", val[:16])
                    t = sec + nsec / 1e9 - offset
            if ifname == "lo" and pkttype == PACKET_OUTGOING:
                continue  # loopback shows each packet twice
            if len(data) < 34 or data[12:14] != b"\x08\x00":
                continue
            ip = data[14:]
            ihl = (ip[0] & 0x0F) * 4
            if ip[9] != 6:
                continue
            total = struct.unpack("!H", ip[2:4])[0]
            tcp = ip[ihl:]
            sport, dport, seq = struct.unpack("!HHI", tcp[:8])
            thl = (tcp[12] >> 4) * 4
            payload = ip[ihl + thl:total]
            src, dst = ip[12:16], ip[16:20]
            flags = tcp[13]
            if flags & 0x07 and ifname != "lo" and {src, dst} == {here_b, peer_b}:
                kind = "SYN" if flags & 0x02 else "RST" if flags & 0x04 else "FIN"
                conns.append((t, kind if src == here_b else kind.lower(), sport, dport))
            if not payload:
                continue
            if ifname == "lo":
                if API_PORT not in (sport, dport):
                    lo.append((t, sport, dport, seq, bytes(payload)))
            elif {src, dst} == {here_b, peer_b}:
                link.append((t, src == here_b, len(payload)))
    drops = None
    try:
        _, drops = struct.unpack("II", s.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
    except OSError:
        pass
    with open(out, "wb") as f:
        pickle.dump({"link": link, "lo": lo, "conns": conns, "drops": drops}, f)
    return 0


class Sniffer:
    """The sniffer child in `node`'s namespace; `stop()` returns what it captured."""

    def __init__(self, lab: Lab, node: LabNode, peer: LabNode, tag: str) -> None:
        self.lab, self.node, self.peer = lab, node, peer
        self.out = lab.work / f"sniff-{tag}.pickle"
        self.proc: trio.Process | None = None

    async def start(self) -> None:
        import subprocess

        self.out.unlink(missing_ok=True)
        self.proc = await self.lab.spawn(
            [*self.lab.lan.exec_prefix(self.node.i), sys.executable, "-m",
             "bench.lab.split_scenario", "sniff", str(self.out), self.node.ip, self.peer.ip],
            f"sniffer {self.node.name}", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        with trio.fail_after(30):
            line = await self.proc.stdout.receive_some(64)
        if b"ready" not in line:
            raise RuntimeError(f"the sniffer did not start: {line!r}")

    async def stop(self) -> dict[str, Any]:
        assert self.proc is not None
        await self.proc.stdin.aclose()
        with trio.fail_after(60):
            await self.proc.wait()
        self.lab.registry.discard(self.proc.pid)
        if self.proc.returncode != 0:
            raise RuntimeError(f"the sniffer exited with {self.proc.returncode}")
        data = pickle.loads(self.out.read_bytes())
        self.out.unlink(missing_ok=True)
        return data


# ---- what the capture says ------------------------------------------------------------


def answer_bursts(link: list[tuple[float, bool, int]]) -> list[tuple[float, int]]:
    """(start time, payload bytes) of each worker->head run of payload segments that
    follows a head->worker segment: the head sent something and got something back (an
    RPC answer, or only flow control: the size tells them apart)."""
    bursts: list[tuple[float, int]] = []
    last_up = None
    for t, up, n in sorted(link):
        if up:
            last_up = True
        elif last_up is not False:
            bursts.append((t, n))
            last_up = False
        else:
            bursts[-1] = (bursts[-1][0], bursts[-1][1] + n)
    return bursts


@dataclass
class RpcCommand:
    t: float
    cmd: int
    size: int
    answer: int = 0  # GET_TENSOR: the bytes asked for


@dataclass
class RpcStreams:
    commands: list[RpcCommand] = field(default_factory=list)
    gaps: int = 0  # holes in a reassembled stream (the sniffer missed a segment)
    unparsed: int = 0  # lo connections whose first speaker did not frame as ggml RPC
    answer_streams: int = 0  # the other direction of each RPC connection, not parsed


def _reassemble(segs: list[tuple[float, int, bytes]]) -> tuple[bytes, list[tuple[int, float]], int]:
    """One direction of one TCP flow: its bytes in order, (offset, time) of each segment,
    and the number of holes."""
    base = segs[0][1]
    parts = sorted((((seq - base) % (1 << 32)), t, data) for t, seq, data in segs)
    out = bytearray()
    marks: list[tuple[int, float]] = []
    gaps = 0
    for off, t, data in parts:
        end = len(out)
        if off > end:
            gaps += 1
            break  # bytes after a hole cannot be framed
        if off + len(data) <= end:
            continue  # a retransmission
        marks.append((end, t))
        out += data[end - off:]
    return bytes(out), marks, gaps


def _commands(stream: bytes, marks: list[tuple[int, float]]) -> list[RpcCommand] | None:
    """The stream parsed as ggml RPC commands from its start, None unless it is one."""
    offs = [m[0] for m in marks]
    out: list[RpcCommand] = []
    o = 0
    while o + 9 <= len(stream):
        cmd = stream[o]
        size = struct.unpack_from("<Q", stream, o + 1)[0]
        if cmd >= len(RPC_NAMES) or size > 1 << 31:
            return None
        t = marks[bisect.bisect_right(offs, o) - 1][1]
        answer = 0
        if cmd == GET_TENSOR and size >= _GET_TENSOR_REQ and o + 9 + size <= len(stream):
            answer = struct.unpack_from("<Q", stream, o + 9 + _GET_TENSOR_REQ - 8)[0]
        out.append(RpcCommand(t, cmd, size, answer))
        o += 9 + size
    # a stream may end mid-command only where its connection broke (a failed split)
    return out or None


def rpc_commands(lo: list[tuple[float, int, int, int, bytes]]) -> RpcStreams:
    """The commands of every lo TCP connection whose first speaker frames as ggml RPC
    from the first byte the capture saw (it starts while the split is idle, so at a
    command's start; an RPC server never speaks first, so the other direction is its
    answers, and is not parsed: zeros or floats could frame up as commands)."""
    flows: dict[tuple[int, int], list[tuple[float, int, bytes]]] = {}
    for t, sport, dport, seq, data in lo:
        flows.setdefault((sport, dport), []).append((t, seq, data))
    res = RpcStreams()
    for key, segs in flows.items():
        back = flows.get((key[1], key[0]))
        if back is not None and min(back)[0] < min(segs)[0]:
            res.answer_streams += 1
            continue  # the other side spoke first
        stream, marks, gaps = _reassemble(segs)
        cmds = _commands(stream, marks)
        if cmds is None:
            res.unparsed += 1
            continue
        res.gaps += gaps
        res.commands += cmds
    res.commands.sort(key=lambda c: c.t)
    return res


@dataclass
class Timed:
    """One streamed completion and when each of its pieces arrived."""

    r: StreamResult
    times: list[float]

    @property
    def window(self) -> tuple[float, float] | None:
        return (self.times[0], self.times[-1]) if len(self.times) > 1 else None


async def timed_stream(node: LabNode, max_tokens: int, *, local_only: bool = False) -> Timed:
    times: list[float] = []
    r = await node.stream(PROMPT, max_tokens, timeout=300, local_only=local_only,
                          on_token=lambda _r, now: times.append(now))
    return Timed(r, times)


def per_token(events: list[float], streams: list[Timed]) -> float | None:
    """Events in each stream's (first piece, last piece] window over the pieces after
    the first, all streams together."""
    n = k = 0
    for s in streams:
        w = s.window
        if w is None:
            continue
        k += len(s.times) - 1
        n += sum(1 for t in events if w[0] < t <= w[1])
    return n / k if k else None


# ---- the scenario -----------------------------------------------------------------------


async def split(lab: Lab, opt: Options, res: Result) -> None:
    """See the module docstring."""
    from qvacd.layer_worker import REBUILD_HINT, rpc_available

    if not rpc_available():
        res.passed = None
        res.summary = f"skipped: {REBUILD_HINT}"
        return
    await ensure_mesh(lab, fresh=True)
    head, worker, whole = lab.nodes[0], lab.nodes[1], lab.nodes[2]
    others = [n for n in lab.nodes if n not in (head, worker)]
    head_ts, worker_ts = TrustStore.in_dir(head.data_dir), TrustStore.in_dir(worker.data_dir)
    rounds = max(2, opt.rounds // 2)
    common = ("--threads", str(lab.threads), "--ctx-size", CTX)
    try:
        for n in (head, worker, whole):
            await n.stop()
        for n in others:  # delegation must find nobody: the split is what is measured
            head_ts.remove(n.peer_id, ["provider"])
        worker_ts.add(head.peer_id, ["layers"])
        await worker.start(*common, "--memory-budget", HEAD_BUDGET, "--layers-memory",
                           WORKER_LAYERS)
        await head.start(*common, "--memory-budget", HEAD_BUDGET)
        await whole.start(*common)
        await lab.wait_mesh([head, worker, whole], timeout=60)
        t0 = time.monotonic()
        first = await timed_stream(head, 4)
        load_s = time.monotonic() - t0
        if not res.check(first.r.ok and first.r.served_by == [head.peer_id, worker.peer_id],
                         f"the first split request was not served by {head.name} +"
                         f" {worker.name}: {first.r.kind} {first.r.error} served by"
                         f" {first.r.served_by}\n{head.log_tail(1500)}"):
            return
        say(f"  split loaded and answered in {load_s:.1f} s (first request)")
        await _conditions(lab, opt, res, head, worker, whole, rounds)
        st = (await worker.status()).get("layers", {})
        res.rows.append({"network": "worker's layer sessions", "RTT ms": "",
                         "split tok/s": f"{st.get('sessions')} sessions,"
                                        f" {st.get('bytes_in', 0) / 2**20:.1f} MiB in,"
                                        f" {st.get('bytes_from_file', 0) / 2**20:.1f} MiB"
                                        f" from its own file, first request {load_s:.1f} s"})
    finally:
        lab.lan.impair_all(Impair())
        for n in others:
            head_ts.add(n.peer_id, ["provider"])
        worker_ts.remove(head.peer_id, ["layers"])
        lab.dirty = True  # three daemons run with this scenario's flags
    res.summary = "; ".join(
        f"{r['network']}: split {r['split tok/s']} tok/s (bound {r['bound tok/s']}),"
        f" {r['RPC answered cmds/token']} RT/token, whole {r['whole tok/s']}"
        for r in res.rows if "bound tok/s" in r)


async def _conditions(lab: Lab, opt: Options, res: Result, head: LabNode, worker: LabNode,
                      whole: LabNode, rounds: int) -> None:
    compute_s: float | None = None
    for imp in CONDITIONS:
        lab.lan.impair_all(imp)
        rtt = 2 * imp.delay_ms / 1e3
        # discarded: a new impairment's first stream (TCP's window after a change)
        await timed_stream(head, opt.max_tokens)
        await timed_stream(whole, opt.max_tokens, local_only=True)
        sniffer = Sniffer(lab, head, worker, f"{imp.delay_ms:g}")
        await sniffer.start()
        splits: list[Timed] = []
        wholes: list[Timed] = []
        try:
            for k in range(rounds):
                pair = [(splits, head, False), (wholes, whole, True)]
                for out, node, local_only in (pair if k % 2 == 0 else pair[::-1]):
                    out.append(await timed_stream(node, opt.max_tokens, local_only=local_only))
                    if not out[-1].r.ok and node is head:
                        say(f"  {imp}: split stream failed ({out[-1].r.error[:160]});"
                            " one discarded request reloads it")
                        await timed_stream(head, 4)
        finally:
            cap = await sniffer.stop()
        rpc = rpc_commands(cap["lo"])
        bursts = answer_bursts(cap["link"])
        gets = [c for c in rpc.commands if c.cmd == GET_TENSOR and c.answer
                and any(s.window and s.window[0] < c.t <= s.window[1] for s in splits)]
        # an answer burst that carries at least the smallest GET_TENSOR answer: data, not
        # only flow control (a yamux window update, a noise frame of a few dozen bytes)
        least = min((c.answer for c in gets), default=None)
        data = [b for b in bursts if least is not None and b[1] >= least]
        any_rt = per_token([b[0] for b in bursts], splits)
        link_rt = per_token([b[0] for b in data], splits) if least is not None else None
        rpc_rt = per_token([c.t for c in rpc.commands if c.cmd in ANSWERED], splits)
        decodes = per_token([c.t for c in rpc.commands if c.cmd in DECODES], splits)
        kinds: dict[str, float] = {}
        for c in rpc.commands:
            if c.cmd in ANSWERED and any(w[0] < c.t <= w[1] for w in
                                         (s.window for s in splits) if w):
                kinds[RPC_NAMES[c.cmd]] = kinds.get(RPC_NAMES[c.cmd], 0) + 1
        n_tok = sum(len(s.times) - 1 for s in splits if s.window) or 1
        waits = _answer_waits(gets, [b[0] for b in data])
        heads = _head_times(gets, [b[0] for b in data])
        # medians over the streams that completed (a failed one is counted below)
        ts, tw = med([s.r.tps for s in splits if s.r.ok]), med([s.r.tps for s in wholes if s.r.ok])
        fs, fw = (med([s.r.ttft for s in splits if s.r.ok]),
                  med([s.r.ttft for s in wholes if s.r.ok]))
        if not rtt and ts:
            compute_s = 1 / ts
        rt = rpc_rt if rpc_rt is not None else link_rt
        bound = (1 / (rt * rtt + compute_s)) if compute_s and rt is not None else None
        # the same bound with the whole model's time per token, measured in the same
        # rounds (so under the same load): the split's work without its tunnel
        bound_whole = (1 / (rt * rtt + 1 / tw)) if tw and rt is not None else None
        bad = [s.r for s in splits + wholes if not s.r.ok]
        wrong = [s.r.served_by for s in splits if s.r.ok
                 and s.r.served_by != [head.peer_id, worker.peer_id]]
        wrong += [s.r.served_by for s in wholes if s.r.ok and s.r.served_by != [whole.peer_id]]
        row = {"network": str(imp), "RTT ms": f"{rtt * 1e3:.0f}", "rounds": str(len(splits)),
               "split tok/s": f1(ts), "whole tok/s": f1(tw),
               "split/whole": "—" if not (ts and tw) else f"{ts / tw:.2f}",
               "split TTFT ms": ms(fs), "whole TTFT ms": ms(fw),
               "RPC answered cmds/token": "—" if rpc_rt is None else f"{rpc_rt:.2f}",
               "link RTs/token": "—" if link_rt is None else f"{link_rt:.2f}",
               "link bursts/token (any size)": "—" if any_rt is None else f"{any_rt:.2f}",
               "answered cmds": ", ".join(f"{k} {v / n_tok:.2f}" for k, v in
                                          sorted(kinds.items(), key=lambda kv: -kv[1])
                                          if v / n_tok >= 0.05) or "—",
               "decodes/token": "—" if decodes is None else f"{decodes:.2f}",
               "answer wait ms": ms(waits),
               "head time/token ms": ms(heads),
               "token period ms": ms(1 / ts if ts else None),
               "head + wait ms": ms(heads + waits if heads and waits else None),
               "compute/token ms (clean split)": ms(compute_s),
               "bound tok/s": f1(bound),
               "split/bound": "—" if not (bound and ts) else f"{ts / bound:.2f}",
               BOUND_WHOLE: f1(bound_whole),
               "split/bound whole": "—" if not (bound_whole and ts) else
                                    f"{ts / bound_whole:.2f}",
               "capture": f"{len(cap['link'])} link segs, {len(rpc.commands)} RPC cmds,"
                          f" drops {cap['drops']}, holes {rpc.gaps}",
               # new connections (SYN) and closes (FIN/RST) between head and worker while
               # measured: a split session rides one connection for its life
               "link opens/closes": _conn_events(cap.get("conns", []), splits),
               "failed": str(len(bad))}
        res.rows.append(row)
        res.points.append((f"split {imp}", "whole (one node)", tw, fw))
        res.points.append((f"split {imp}", "split (head + worker)", ts, fs))
        res.points.append((f"split {imp}", "bound 1/(RTs x RTT + compute)", bound, None))
        say(f"  {imp!s:<8} RTT {row['RTT ms']} ms: split {row['split tok/s']} tok/s TTFT"
            f" {row['split TTFT ms']} ms | whole {row['whole tok/s']} tok/s TTFT"
            f" {row['whole TTFT ms']} ms | RPC answered/token"
            f" {row['RPC answered cmds/token']} ({row['answered cmds']}), link RTs/token"
            f" {row['link RTs/token']} (any size {row['link bursts/token (any size)']}),"
            f" decodes/token {row['decodes/token']}, answer wait {row['answer wait ms']} ms,"
            f" head time {row['head time/token ms']} ms |"
            f" period {row['token period ms']} ms = head + wait {row['head + wait ms']} ms? |"
            f" bound {row['bound tok/s']} tok/s (split/bound {row['split/bound']}), with the"
            f" whole's compute {row[BOUND_WHOLE]} tok/s"
            f" (split/bound {row['split/bound whole']}) |"
            f" {row['capture']}")
        res.check(not bad, f"{imp}: {len(bad)} streams failed: "
                           + "; ".join(f"{r.kind} {r.error}" for r in bad[:3])
                           + f"; head<->worker TCP meanwhile: {row['link opens/closes'][:400]}")
        res.check(not wrong, f"{imp}: served by the wrong nodes: {wrong[:2]}")
        res.check(rpc_rt is not None and rpc_rt >= 1.0,
                  f"{imp}: {row['RPC answered cmds/token']} answered RPC commands per token:"
                  " the capture missed the split's round trips")
        if rtt and bound_whole and ts:
            res.check(ts <= 1.1 * bound_whole,
                      f"{imp}: split {ts:.1f} tok/s above 1.1 x the bound with the whole"
                      f" model's compute ({bound_whole:.1f}): the round trips are miscounted")


def _head_times(gets: list[RpcCommand], answers: list[float]) -> float | None:
    """Median time from an answer burst arriving to the split process's next GET_TENSOR:
    what the head spends per token (its layers, the output head, sampling, both hops of
    its tunnel), nothing of it waiting for the link."""
    times = []
    starts = [c.t for c in gets]
    for k, c in enumerate(gets[:-1]):
        j = bisect.bisect_right(answers, c.t)
        if j < len(answers) and answers[j] < starts[k + 1]:
            times.append(starts[k + 1] - answers[j])
    return statistics.median(times) if times else None


def _conn_events(conns: list[tuple[float, str, int, int]], streams: list[Timed]) -> str:
    """SYN/FIN/RST seen on the link, with when they came relative to the split streams
    that failed (lower case: sent by the worker)."""
    if not conns:
        return "none"
    failed = [s.times[-1] for s in streams if not s.r.ok and s.times]
    out = []
    for t, kind, sp, dp in conns:
        near = [f"{t - f:+.1f} s from a failure" for f in failed if abs(t - f) < 15]
        out.append(f"{kind} {sp}->{dp}" + (f" ({near[0]})" if near else ""))
    return "; ".join(out[:12]) + (f"; ... {len(out) - 12} more" if len(out) > 12 else "")


def _answer_waits(gets: list[RpcCommand], answers: list[float]) -> float | None:
    """Median time from a GET_TENSOR leaving the split process (lo) to the next answer
    burst arriving on the link: one round trip, plus the worker's compute and both
    tunnels' hops."""
    waits = []
    for c in gets:
        k = bisect.bisect_right(answers, c.t)
        if k < len(answers):
            waits.append(answers[k] - c.t)
    return statistics.median(waits) if waits else None


def write_split_chart(path: Path, results: list[Result]) -> str | None:
    """Split tokens/s against RTT, measured and bound, with the whole model's; None when
    drawn, else why not."""
    rows = [row for r in results if r.name == "split" for row in r.rows if "bound tok/s" in row]

    def num(x: str | None) -> float | None:
        try:
            return float(x)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return None

    pts = [(num(r["RTT ms"]), num(r["split tok/s"]), num(r["bound tok/s"]),
            num(r["whole tok/s"]), r["RPC answered cmds/token"], num(r.get(BOUND_WHOLE)))
           for r in rows]
    pts = [p for p in pts if p[0] is not None and p[1] is not None]
    if not pts:
        return "the split scenario did not run"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: pip install -e '.[bench]'"
    fig, ax = plt.subplots(figsize=(7, 4.6))
    xs = [p[0] for p in pts]
    ax.plot(xs, [p[1] for p in pts], "o-", color="C0", label="split, measured")
    ax.plot([p[0] for p in pts if p[2]], [p[2] for p in pts if p[2]], "s--", color="C1",
            label="bound 1 / (RTs/token × RTT + the clean split's time/token)")
    ax.plot([p[0] for p in pts if p[5]], [p[5] for p in pts if p[5]], "x-.", color="C3",
            label="bound with the whole model's time/token, same rounds")
    ax.plot([p[0] for p in pts if p[3]], [p[3] for p in pts if p[3]], "^:", color="C2",
            label="whole model on one node")
    for rtt, tps, _, _, rts, _ in pts:
        ax.annotate(f"{tps:.1f} tok/s, {rts} RT/token", (rtt, tps), textcoords="offset points",
                    xytext=(6, 6), fontsize=7)
    ax.set_xlabel("round-trip time between head and worker, ms")
    ax.set_ylabel("tokens/s after the first token")
    ax.set_title("split across two lab hosts: tokens/s against RTT", fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


SPLIT_SCENARIOS = {
    "split": (split, "Split across two hosts: tokens/s and round trips per token", 900),
}


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "sniff":
        sys.exit(sniff(*sys.argv[2:]))
    sys.exit("usage: python -m bench.lab.split_scenario sniff OUT HERE_IP PEER_IP")

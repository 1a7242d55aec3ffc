"""A learning Ethernet switch in user space, with netem-like impairment per port.

For kernels without sch_netem. Run by bench/lab/netns.py as

    python -m bench.lab.switch TAP0 TAP1 ...

It creates one TAP device per name (the lab then moves each into its host's namespace),
prints "ready", and forwards frames between them: unicast to the port that MAC was last
seen on, broadcast, multicast and unknown destinations to every other port.

Impairment is applied to the frames a port *sends* (a host's egress, as netem on that
host's interface would): each is dropped with probability loss, else delivered after
delay ± uniform jitter. Frames from one port are never reordered (each leaves no earlier
than the one before it), so jitter shows as variable latency, not as reordering.
A port may also have an upload rate (a home uplink, netem's `rate`): its frames leave one
after another at that many bits per second, and a frame that would wait more than
RATE_QUEUE_S behind the ones queued is dropped (a tail-drop queue, so TCP finds the rate).

Control: one JSON object per line on stdin, one JSON reply per line on stdout:
  {"port": i, "delay_ms": D, "jitter_ms": J, "loss_pct": L, "rate_mbit": R} -> {"ok": true}
  {"cmd": "stats"}                                           -> {"ports": [...]}
End of stdin (the lab went away, however it ended) stops the switch; the TAP devices
vanish with it.
"""

from __future__ import annotations

import errno
import fcntl
import heapq
import json
import os
import random
import selectors
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
MAX_FRAME = 65536 + 64
BATCH = 256  # frames read from one port per wakeup, so no port starves the others
RATE_QUEUE_S = 0.1  # a rate-capped port's queue: frames that would wait longer are dropped


def open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI))
    return fd


class Port:
    __slots__ = ("capped", "delay", "errors", "fd", "free", "jitter", "last", "loss", "lost",
                 "name", "rate", "rx", "tx")

    def __init__(self, fd: int, name: str) -> None:
        self.fd, self.name = fd, name
        self.delay = self.jitter = self.loss = 0.0
        self.rate = 0.0  # bytes/s this port may send; 0 = unlimited
        self.last = 0.0  # when this port's latest queued frame leaves
        self.free = 0.0  # when this port's uplink has sent everything queued (rate cap)
        self.rx = self.tx = self.lost = self.errors = self.capped = 0


def main(names: list[str]) -> None:
    ports = [Port(open_tap(n), n) for n in names]
    macs: dict[bytes, int] = {}
    queue: list[tuple[float, int, int, bytes]] = []
    seq = 0
    rng = random.Random()
    sel = selectors.DefaultSelector()
    for i, p in enumerate(ports):
        sel.register(p.fd, selectors.EVENT_READ, i)
    sel.register(0, selectors.EVENT_READ, -1)
    ctl = b""
    out = sys.stdout
    out.write("ready\n")
    out.flush()

    def deliver(src: int, frame: bytes) -> None:
        dst = frame[:6]
        targets = range(len(ports))
        if not dst[0] & 1:
            j = macs.get(dst)
            if j is not None:
                targets = (j,)
        for j in targets:
            if j == src:
                continue
            p = ports[j]
            try:
                os.write(p.fd, frame)
                p.tx += 1
            except OSError as e:  # EIO: that host's link is down; EAGAIN: full
                if e.errno not in (errno.EIO, errno.EAGAIN, errno.ENOBUFS, errno.EINVAL):
                    raise
                p.errors += 1

    def control(line: bytes) -> str:
        try:
            obj = json.loads(line)
            if obj.get("cmd") == "stats":
                return json.dumps({"ports": [
                    {"name": p.name, "rx": p.rx, "tx": p.tx, "lost": p.lost,
                     "errors": p.errors, "capped": p.capped,
                     "rate_mbit": p.rate * 8 / 1e6, "delay_ms": p.delay * 1e3,
                     "jitter_ms": p.jitter * 1e3, "loss_pct": p.loss * 100} for p in ports]})
            p = ports[int(obj["port"])]
            p.delay = max(0.0, float(obj.get("delay_ms", 0))) / 1e3
            p.jitter = max(0.0, float(obj.get("jitter_ms", 0))) / 1e3
            p.loss = min(1.0, max(0.0, float(obj.get("loss_pct", 0)) / 100))
            p.rate = max(0.0, float(obj.get("rate_mbit", 0))) * 1e6 / 8
            return json.dumps({"ok": True})
        except (ValueError, KeyError, IndexError, TypeError) as e:
            return json.dumps({"error": f"bad control line {line[:80]!r}: {e}"})

    while True:
        timeout = max(0.0, queue[0][0] - time.monotonic()) if queue else None
        for key, _ in sel.select(timeout):
            i = key.data
            if i == -1:
                data = os.read(0, 4096)
                if not data:
                    return
                ctl += data
                while b"\n" in ctl:
                    line, ctl = ctl.split(b"\n", 1)
                    if line.strip():
                        out.write(control(line) + "\n")
                        out.flush()
                continue
            p = ports[i]
            for _ in range(BATCH):
                try:
                    frame = os.read(p.fd, MAX_FRAME)
                except BlockingIOError:
                    break
                except OSError as e:
                    if e.errno in (errno.EAGAIN, errno.EIO):
                        break
                    raise
                if len(frame) < 14:
                    continue
                p.rx += 1
                if not frame[6] & 1:
                    macs[frame[6:12]] = i
                if p.loss and rng.random() < p.loss:
                    p.lost += 1
                    continue
                now = time.monotonic()
                sent = now
                if p.rate:
                    # the uplink sends one frame after another; a full queue drops
                    start = max(now, p.free)
                    if start - now > RATE_QUEUE_S:
                        p.capped += 1
                        continue
                    p.free = sent = start + len(frame) / p.rate
                if p.delay or p.jitter or p.last > now or sent > now:
                    d = p.delay + (rng.uniform(-p.jitter, p.jitter) if p.jitter else 0.0)
                    t = max(sent + max(0.0, d), p.last)
                    p.last = t
                    seq += 1
                    heapq.heappush(queue, (t, seq, i, frame))
                else:
                    deliver(i, frame)
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, _, i, frame = heapq.heappop(queue)
            deliver(i, frame)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except KeyboardInterrupt:
        pass

"""Real `qvacd start` daemons, one per lab host, and a client that talks to their APIs.

Each daemon runs as `ip netns exec NS python -m qvacd.cli start ...` in its own session
(process group), with its own data dir (model blobs hard-linked from one template, by
tests/harness as for the tests), its API on 127.0.0.1:11435 inside its namespace, and libp2p on
the namespace's address. The lab reaches the API through a Unix socket forwarder started
once per namespace (bench/lab/forward.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from bench.lab.netns import REPO, RUN_DIR, LabError, Lan
from tests.harness import clone_data_dir, install_model_template, preload_settled

MODEL = "gemma3-270m"
ALL_ROLES = ["consumer", "provider", "seeder"]
API_PORT = 11435
P2P_PORT = 4001


class Registry:
    """Every process the lab started, also written to RUN_DIR/<pid>.json so that a later
    run can kill what a SIGKILLed lab left behind (netns.cleanup_stale)."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.procs: dict[int, str] = {}
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        self.path = RUN_DIR / f"{os.getpid()}.json"
        self._write()

    def add(self, pid: int, what: str) -> None:
        self.procs[pid] = what
        self._write()

    def discard(self, pid: int) -> None:
        self.procs.pop(pid, None)
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "work": str(self.work),
                                   "procs": list(self.procs)}))
        os.replace(tmp, self.path)

    def kill_all(self) -> None:
        for pid in list(self.procs):
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.procs.clear()
        self.path.unlink(missing_ok=True)


def pin(pid: int, cpus: str) -> bool:
    """Move every thread of `pid` to the CPU list `cpus` (taskset syntax); False if we can't."""
    if shutil.which("taskset") is None:
        return False
    r = subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(pid)], capture_output=True,
                       check=False)
    return r.returncode == 0


def kill_group(proc: Any, sig: int = signal.SIGKILL) -> None:
    if proc is None or proc.returncode is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class StreamResult:
    """One streamed /v1/completions, as the client saw it."""

    ok: bool = False
    status: int | None = None
    error: str = ""  # the server's error message or the transport failure
    kind: str = ""  # "", "http_error", "sse_error", "connect", "truncated", "timeout"
    ttft: float | None = None
    tps: float | None = None
    tokens: int = 0
    text: str = ""
    finish: str | None = None
    served_by: list[str] = field(default_factory=list)
    header_served_by: str = ""
    started: float = 0.0
    ended: float = 0.0
    gap_after_mark: float | None = None  # first token after `mark` (a kill, a link cut)


class LabNode:
    def __init__(self, lab: Lab, i: int) -> None:
        self.lab = lab
        self.i = i
        self.name = f"n{i}"
        self.ns = lab.lan.ns[i]
        self.ip = lab.lan.ips[i]
        self.data_dir = lab.work / "nodes" / self.name
        self.sock = str(lab.work / f"api-{self.name}.sock")
        self.log_path = lab.work / f"{self.name}.log"
        self.peer_id = ""
        self.proc: trio.Process | None = None
        self.forwarder: trio.Process | None = None
        self.args: list[str] = []
        self.client = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=self.sock), base_url="http://localhost",
            timeout=httpx.Timeout(10.0, read=30.0))
        self.restarts = 0

    @property
    def p2p_addr(self) -> str:
        return f"/ip4/{self.ip}/tcp/{P2P_PORT}/p2p/{self.peer_id}"

    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start_forwarder(self) -> None:
        self.forwarder = await self.lab.spawn(
            [*self.lab.lan.exec_prefix(self.i), sys.executable, "-m", "bench.lab.forward",
             self.sock, str(API_PORT)], f"forwarder {self.name}", stdin=subprocess.PIPE,
            stdout=subprocess.PIPE)
        with trio.fail_after(30):
            line = await self.forwarder.stdout.receive_some(64)
        if b"ready" not in line:
            raise LabError(f"the API forwarder for {self.name} did not start: {line!r}")

    async def start(self, *args: str, wait: bool = True, timeout: float = 90) -> None:
        """Start `qvacd start` with the lab's common flags plus `args`."""
        if self.running():
            raise RuntimeError(f"{self.name} already running")
        self.args = list(args)
        log = self.log_path.open("ab")
        log.write(f"\n==== start {time.strftime('%H:%M:%S')} {' '.join(args)}\n".encode())
        log.flush()
        self.proc = await self.lab.spawn(
            [*self.lab.lan.exec_prefix(self.i), sys.executable, "-m", "qvacd.cli", "start",
             "--data-dir", str(self.data_dir), "--api", f"127.0.0.1:{API_PORT}",
             "--listen", f"/ip4/{self.ip}/tcp/{P2P_PORT}", *args],
            f"qvacd {self.name}", stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.started_at = time.monotonic()
        if wait:
            await self.wait_ready(timeout)

    async def wait_ready(self, timeout: float = 90) -> float:
        """Until the API answers and the default model is loaded (or cannot be); returns
        the time since start."""
        with trio.move_on_after(timeout):
            while True:
                if not self.running():
                    raise LabError(f"{self.name} exited with {self.proc.returncode if self.proc else '?'}:"
                                   f"\n{self.log_tail()}")
                try:
                    r = await self.client.get("/qvac/status", timeout=2)
                    if r.status_code == 200:
                        st = r.json()
                        self.peer_id = st["peer_id"]
                        if preload_settled(st, self.args):
                            return time.monotonic() - self.started_at
                except (httpx.TransportError, ValueError, KeyError):
                    pass
                await trio.sleep(0.1)
        raise LabError(f"{self.name} not ready within {timeout:.0f}s:\n{self.log_tail()}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        kill_group(self.proc, sig)

    async def stop(self, timeout: float = 10) -> tuple[float, bool]:
        """SIGTERM and wait; SIGKILL after `timeout`. Returns (seconds to exit, wedged)."""
        if not self.running():
            return 0.0, False
        t0 = time.monotonic()
        self.kill(signal.SIGTERM)
        wedged = False
        with trio.move_on_after(timeout):
            await self.proc.wait()
        if self.proc.returncode is None:
            wedged = True
            self.kill(signal.SIGKILL)
            with trio.move_on_after(10):
                await self.proc.wait()
        self.lab.registry.discard(self.proc.pid)
        return time.monotonic() - t0, wedged

    async def reap(self) -> None:
        """After a kill: wait for the process to be gone."""
        if self.proc is not None:
            with trio.move_on_after(10):
                await self.proc.wait()
            self.lab.registry.discard(self.proc.pid)

    def note(self, msg: str) -> None:
        """A line in this node's log, so lab actions line up with the daemon's own lines."""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        with self.log_path.open("a") as f:
            f.write(f"{stamp}.{int(time.time() * 1000) % 1000:03d}Z ==== lab: {msg}\n")

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    async def status(self) -> dict:
        r = await self.client.get("/qvac/status", timeout=5)
        r.raise_for_status()
        return r.json()

    async def peers(self) -> list[dict]:
        r = await self.client.get("/qvac/peers", timeout=5)
        r.raise_for_status()
        return r.json()["peers"]

    async def verified_peers(self) -> set[str]:
        """Peers whose verified record this node would route on: fresh (checked in the
        last 30 s), or connected and checked within two of the daemon's 60 s refresh
        rounds (a connected peer pushes every change, so a quiet mesh is re-checked
        only once a minute and "fresh" alone went false in every quiet minute)."""
        return {p["peer_id"] for p in await self.peers()
                if p.get("capacity") and (p.get("fresh", True) or (
                    p.get("connected") and (p.get("verified_age_s") or 1e9) <= 120))}

    async def stream(self, prompt: str, max_tokens: int, *, timeout: float = 120,
                     on_token: Any = None, extra: dict | None = None,
                     local_only: bool = False) -> StreamResult:
        """One streamed completion (greedy); never raises for what the server or the
        network did: the result says what happened."""
        body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens,
                "temperature": 0, "stream": True, **(extra or {})}
        res = StreamResult(started=time.monotonic())
        first = last = None
        pieces: list[str] = []
        with trio.move_on_after(timeout) as scope:
            try:
                headers = {"X-Qvac-Local-Only": "1"} if local_only else {}
                async with self.client.stream("POST", "/v1/completions", json=body,
                                              headers=headers,
                                              timeout=httpx.Timeout(10.0, read=60.0)) as r:
                    res.status = r.status_code
                    res.header_served_by = r.headers.get("x-qvac-served-by", "")
                    if r.status_code != 200:
                        raw = await r.aread()
                        res.kind = "http_error"
                        try:
                            res.error = json.loads(raw)["error"]["message"]
                        except (ValueError, KeyError, TypeError):
                            res.error = raw.decode(errors="replace")[:300]
                        return res
                    async for line in r.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        if line.strip() == "data: [DONE]":
                            break
                        ev = json.loads(line[6:])
                        if "error" in ev:
                            res.kind = "sse_error"
                            res.error = str(ev["error"].get("message", ev["error"])
                                            if isinstance(ev["error"], dict) else ev["error"])
                            break
                        ch = ev.get("choices") or []
                        if ch and ch[0].get("text"):
                            now = time.monotonic()
                            first = first or now
                            last = now
                            res.tokens += 1
                            pieces.append(ch[0]["text"])
                            if on_token is not None:
                                on_token(res, now)
                        if ch and ch[0].get("finish_reason"):
                            res.finish = ch[0]["finish_reason"]
                            res.served_by = ev.get("x_qvac_served_by", [])
            except httpx.ConnectError as e:
                res.kind, res.error = "connect", f"connect: {e}"
            except httpx.RemoteProtocolError as e:
                res.kind = "connect" if res.status is None else "truncated"
                res.error = f"{type(e).__name__}: {e}"
            except (httpx.TransportError, ValueError) as e:
                res.kind = "truncated" if res.status is not None else "connect"
                res.error = f"{type(e).__name__}: {e}"
        if scope.cancelled_caught:
            res.kind, res.error = "timeout", f"no end within {timeout:.0f}s"
        res.ended = time.monotonic()
        res.text = "".join(pieces)
        if first is not None:
            res.ttft = first - res.started
            if res.tokens > 1 and last > first:
                res.tps = (res.tokens - 1) / (last - first)
        if not res.kind and res.finish is None:
            res.kind, res.error = "truncated", "stream ended without a finish_reason"
        res.ok = not res.kind and res.finish is not None
        return res


class Lab:
    """The namespaces, the template model, the daemons; `close()` removes everything."""

    def __init__(self, n: int, work: Path, plane: str, *, extra_hosts: int = 0,
                 log=print) -> None:
        self.n = n  # daemons; the LAN has `extra_hosts` more namespaces (the hostile node)
        self.work = work
        self.log = log
        self.dirty = False  # a scenario left routing state behind (backoffs): restart
        # llama.cpp threads per daemon: several daemons share this machine's cores, and
        # more threads than free cores make llama.cpp's spinning threads crawl
        self.threads = 1
        self.lan = Lan(n + extra_hosts, plane, log=log)
        self.registry = Registry(work)
        self.nodes: list[LabNode] = []
        self.template = work / "template"
        self.model_sha = ""

    async def spawn(self, cmd: list[str], what: str, **kw: Any) -> trio.Process:
        proc = await trio.lowlevel.open_process(cmd, start_new_session=True, cwd=REPO, **kw)
        self.registry.add(proc.pid, what)
        return proc

    async def setup(self) -> None:
        await trio.to_thread.run_sync(self.lan.up)
        entry = await trio.to_thread.run_sync(install_model_template, self.template)
        if entry is None:
            raise LabError("the default model is not installed: pip install -e '.[model]'")
        self.model_sha = entry.sha256
        from peers.identity import load_or_create_identity
        from peers.trust import TrustStore

        for i in range(self.n):
            node = LabNode(self, i)
            clone_data_dir(self.template, node.data_dir)
            node.peer_id = load_or_create_identity(node.data_dir).peer_id_str
            self.nodes.append(node)
        for a in self.nodes:  # everyone trusts everyone in the lab, with every role
            ts = TrustStore.in_dir(a.data_dir)
            for b in self.nodes:
                if a is not b:
                    ts.add(b.peer_id, ALL_ROLES)
        for node in self.nodes:
            await node.start_forwarder()

    def node_args(self, i: int, *, mdns: bool = True, extra: tuple[str, ...] = ()) -> list[str]:
        args = ["--threads", str(self.threads)] + ([] if mdns else ["--no-mdns"])
        if i == 0:  # the "phone": too small for the model, it must delegate
            args += ["--memory-budget", "64MiB"]
        return [*args, *extra]

    async def start_all(self, *, mdns: bool = True, extra: tuple[str, ...] = (),
                        timeout: float = 120) -> dict[str, float]:
        """Start every node at once; returns seconds-to-ready per node."""
        ready: dict[str, float] = {}

        async def one(node: LabNode) -> None:
            await node.start(*self.node_args(node.i, mdns=mdns, extra=extra), wait=False)
            ready[node.name] = await node.wait_ready(timeout)

        async with trio.open_nursery() as nursery:
            for node in self.nodes:
                nursery.start_soon(one, node)
        return ready

    async def stop_all(self) -> list[str]:
        """Stop every running node; names of those that did not exit on SIGTERM."""
        wedged: list[str] = []

        async def one(node: LabNode) -> None:
            _, w = await node.stop()
            if w:
                wedged.append(node.name)

        async with trio.open_nursery() as nursery:
            for node in self.nodes:
                nursery.start_soon(one, node)
        return wedged

    async def wait_mesh(self, names: list[LabNode] | None = None, timeout: float = 30) -> float:
        """Until each node in `names` holds verified capacity of every other; seconds."""
        nodes = names or self.nodes
        t0 = time.monotonic()
        lacking: dict[str, list[str]] = {}
        with trio.move_on_after(timeout):
            while True:
                lacking = {}
                for a in nodes:
                    try:
                        have = await a.verified_peers()
                    except (httpx.HTTPError, ValueError):
                        have = set()
                    missing = [b for b in nodes if b is not a and b.peer_id not in have]
                    if missing:
                        lacking[a.name] = [b.name for b in missing]
                        try:  # what `a` says of them, for the error below
                            seen = {p["peer_id"]: p for p in await a.peers()}
                            lacking[a.name] = [
                                f"{b.name} ({_peer_state(seen.get(b.peer_id))})"
                                for b in missing]
                        except (httpx.HTTPError, ValueError) as e:
                            lacking[a.name] = [f"{b.name} (API: {type(e).__name__})"
                                               for b in missing]
                        break
                if not lacking:
                    return time.monotonic() - t0
                await trio.sleep(0.1)
        # why not TooSlowError: a scenario would report it as its own time limit
        raise LabError(f"no full mesh within {timeout:.0f} s: "
                       + "; ".join(f"{a} has no fresh record of {', '.join(m)}"
                                   for a, m in lacking.items()))

    def close(self) -> None:
        """Synchronous and idempotent: kill every process group, remove the LAN."""
        self.registry.kill_all()
        self.lan.down()


def _peer_state(p: dict | None) -> str:
    if p is None:
        return "unknown to it"
    return (f"connected {p.get('connected')}, verified {p.get('verified_age_s')} s ago,"
            f" failures {p.get('failures')}, backoff {p.get('backoff_s')} s,"
            f" last error {str(p.get('last_error', ''))[:80]!r}")

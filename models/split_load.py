"""A model split across devices: this machine plus llama.cpp RPC servers, in a child process.

The head of a split runs the model with `BatchRunner` (models/batch_runner.py) after
registering one ggml RPC device per remote endpoint (`ggml_backend_rpc_add_server`, then
`ggml_backend_device_register`): llama.cpp then places the last `gpu_layers` layers on
those devices, divided by `tensor_split`, and computes them there.

Why a child process (`python -m models.split_load ...`) and not a thread of the daemon:
llama.cpp's RPC client aborts the whole process (GGML_ABORT) when a server goes away or
answers badly, and a worker on another machine can always go away. In a child, that abort
ends only this split; the daemon sees the child exit and ends the split's requests with a
line naming what failed.

The endpoints are plain "127.0.0.1:PORT" strings: this room knows nothing of peers; qvacd
(qvacd/split.py) forwards each port over an authenticated peer stream.

Parent <-> child: JSON lines. stdin: {"op": "gen", "id", "prompt", "max_tokens",
"sampling", "stops", "reuse_prefix", "grammar", "grammar_prefix", "resume"} and
{"op": "cancel", "id"}; stdout: {"ev": "ready", "n_ctx_seq"}, {"ev": "piece", "id",
"text"}, {"ev": "done", "id", ...outcome}, {"ev": "refused", "id", "message"}.
llama.cpp's own log goes to stderr; the parent keeps its last lines for error messages.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import json
import math
import os
import re
import sys
import threading
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import trio

from .batch_runner import BatchRunner, Sampling, SequenceOutcome, SequenceRequest

_ABORT_LINE = re.compile(r"\.(cpp|c|h):\d+: ")
READY_TIMEOUT_S = 600.0  # weights of a first load cross the network
_MAX_LINE = 16 * 1024 * 1024


# ---- the child ------------------------------------------------------------------------


def register_rpc_devices(endpoints: list[str]) -> int:
    """Register every device of every endpoint with ggml; returns how many were added."""
    import llama_cpp

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    rpc_path = lib_dir / "libggml-rpc.so"
    if not rpc_path.exists():
        raise RuntimeError("llama-cpp-python was built without the RPC backend"
                           " (no libggml-rpc.so); rebuild with CMAKE_ARGS=\"... -DGGML_RPC=on\"")
    # the soname files (.so.0), the ones libllama links: a wheel holds no symlinks, so
    # libggml.so is a second copy with a registry of its own that llama.cpp never reads
    ggml = ctypes.CDLL(str(lib_dir / "libggml.so.0"), mode=ctypes.RTLD_GLOBAL)
    rpc = ctypes.CDLL(str(_soname(rpc_path)), mode=ctypes.RTLD_GLOBAL)
    rpc.ggml_backend_rpc_add_server.restype = ctypes.c_void_p
    rpc.ggml_backend_rpc_add_server.argtypes = [ctypes.c_char_p]
    ggml.ggml_backend_reg_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_reg_dev_count.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_reg_dev_get.restype = ctypes.c_void_p
    ggml.ggml_backend_reg_dev_get.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    ggml.ggml_backend_device_register.restype = None
    ggml.ggml_backend_device_register.argtypes = [ctypes.c_void_p]
    added = 0
    for ep in endpoints:
        reg = rpc.ggml_backend_rpc_add_server(ep.encode())
        if not reg:
            raise RuntimeError(f"cannot reach the RPC server at {ep}")
        for i in range(ggml.ggml_backend_reg_dev_count(reg)):
            ggml.ggml_backend_device_register(ggml.ggml_backend_reg_dev_get(reg, i))
            added += 1
    return added


def _soname(path: Path) -> Path:
    so0 = path.with_name(path.name + ".0")
    return so0 if so0.exists() else path


class _BuftOverride(ctypes.Structure):  # llama.h: struct llama_model_tensor_buft_override
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


# llama.cpp counts the output head as one more offloadable layer, the last: any
# n_gpu_layers > 0 would put it (and, for models with tied embeddings, a copy of the
# token embeddings) on the first worker. The split keeps it on the head, next to the
# embeddings, so a worker holds exactly its blocks. A tied output head is loaded as a
# second view of token_embd.weight under that name, hence both names.
OUTPUT_ON_HOST = rb"^(output|token_embd)\."


class _SplitRunner(BatchRunner):
    """BatchRunner whose model load keeps the output head here and divides the offloaded
    blocks by `tensor_split` (one weight per RPC device, in registration order).

    Repacking is off on the head (`use_extra_bufts` false): the CPU backend would move
    the head's Q4_K/Q8_0 weights into CPU_REPACK buffers, whose interleaved kernels sum in
    another order than the plain ones a worker's RPC server uses for its layers (its
    buffers are the device's plain type), so the split's greedy text would depend on
    where the layer boundary falls. With plain kernels everywhere the split's text is
    that of the whole model loaded without repacking, for any split (tests/test_split.py
    measures both). Cost: none measured for generation (gemma3-270m, 1 thread: 42.9 ms
    of CPU per token with repacking, 43.3 without, bench notes in bench/split.py)."""

    def __init__(self, *args: Any, tensor_split: list[float], **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.tensor_split = tensor_split

    def load(self) -> None:
        import llama_cpp

        lib_dir = Path(llama_cpp.__file__).parent / "lib"
        ggml = ctypes.CDLL(str(_soname(lib_dir / "libggml.so")), mode=ctypes.RTLD_GLOBAL)
        ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
        ggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
        ggml.ggml_backend_dev_buffer_type.restype = ctypes.c_void_p
        ggml.ggml_backend_dev_buffer_type.argtypes = [ctypes.c_void_p]
        cpu_buft = ggml.ggml_backend_dev_buffer_type(ggml.ggml_backend_dev_by_type(0))
        overrides = (_BuftOverride * 2)(_BuftOverride(OUTPUT_ON_HOST, cpu_buft),
                                        _BuftOverride(None, None))
        split = (ctypes.c_float * 128)(*self.tensor_split)
        original = llama_cpp.llama_model_default_params

        def with_split() -> Any:
            p = original()
            p.use_extra_bufts = False  # plain kernels, as on the workers (see the class)
            p.tensor_buft_overrides = ctypes.cast(overrides, ctypes.c_void_p)
            if self.tensor_split:
                p.tensor_split = ctypes.cast(split, ctypes.POINTER(ctypes.c_float))
            return p

        llama_cpp.llama_model_default_params = with_split  # this process only
        try:
            super().load()
        finally:
            llama_cpp.llama_model_default_params = original
        self._keepalive = (overrides, split)


def _child(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m models.split_load")
    p.add_argument("--model", required=True)
    p.add_argument("--rpc", action="append", default=[])
    p.add_argument("--gpu-layers", type=int, required=True)
    p.add_argument("--tensor-split", default="")
    p.add_argument("--n-ctx-seq", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--n-batch", type=int, default=512)
    a = p.parse_args(argv)
    out_lock = threading.Lock()
    # the JSON events keep the pipe to themselves: llama.cpp and ggml print to fd 1 too
    # (e.g. the RPC client's banner), so fd 1 becomes stderr from here on
    stdout = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(obj: dict[str, Any]) -> None:
        line = json.dumps(obj, separators=(",", ":")) + "\n"
        with out_lock:
            stdout.write(line)
            stdout.flush()

    register_rpc_devices(a.rpc)
    split = [float(x) for x in a.tensor_split.split(",") if x] if a.tensor_split else []
    # --gpu-layers counts blocks; llama.cpp's count includes the output layer too
    runner = _SplitRunner(a.model, n_seq=1, n_ctx_seq=a.n_ctx_seq, n_threads=a.threads,
                          gpu_layers=a.gpu_layers + 1, n_batch=a.n_batch, tensor_split=split)
    runner.load()
    send({"ev": "ready", "n_ctx_seq": runner.n_ctx_seq})
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    live: dict[int, SequenceRequest] = {}
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["op"] == "cancel":
            req = live.get(msg["id"])
            if req is not None:
                runner.cancel(req)
            continue
        rid = msg["id"]
        try:
            req = _sequence_for(runner, msg, send)
        except ValueError as e:
            send({"ev": "refused", "id": rid, "message": str(e)})
            continue
        live[rid] = req
        runner.submit(req)
    runner.stop()
    thread.join(timeout=10)
    return 0


def _sequence_for(runner: BatchRunner, msg: dict[str, Any], send: Any) -> SequenceRequest:
    rid = msg["id"]
    text = msg["prompt"] + msg.get("resume", "")
    prompt_tokens = runner.tokenize(text)
    n_ctx = runner.n_ctx_seq
    if len(prompt_tokens) >= n_ctx:
        raise ValueError(f"prompt is {len(prompt_tokens)} tokens but the context of the split"
                         f" model is {n_ctx} tokens; shorten the prompt")
    room = n_ctx - len(prompt_tokens)
    want = msg.get("max_tokens")
    if msg.get("resume") and want is not None:
        want = max(0, want - runner.count_tokens(msg["resume"]))
    if want is not None and want > room:
        raise ValueError(f"prompt ({len(prompt_tokens)} tokens) plus max_tokens ({want})"
                         f" exceeds the context of {n_ctx} tokens; lower max_tokens")

    def done(outcome: SequenceOutcome) -> None:
        send({"ev": "done", "id": rid, **asdict(outcome)})

    return SequenceRequest(
        prompt_tokens=prompt_tokens, max_new=want if want is not None else room,
        sampling=Sampling(**msg["sampling"]), stops=tuple(msg.get("stops", ())),
        emit=lambda piece: send({"ev": "piece", "id": rid, "text": piece}), done=done,
        reuse_prefix=bool(msg.get("reuse_prefix", True)), grammar=msg.get("grammar"),
        grammar_prefix=msg.get("grammar_prefix", ""))


# ---- the parent -------------------------------------------------------------------------


def _event(line: str) -> dict[str, Any]:
    try:
        ev = json.loads(line)
    except ValueError:
        raise SplitFailed(f"the split process wrote a line that is not JSON: {line[:120]!r}"
                          ) from None
    if not isinstance(ev, dict):
        raise SplitFailed("the split process wrote JSON that is not an object")
    return ev


class SplitFailed(Exception):
    """The split's process ended or refused; the message says why."""


class SplitGeneration:
    """One generation on the split: iterate for pieces; `outcome` once it ended."""

    def __init__(self, recv: trio.MemoryReceiveChannel[str]) -> None:
        self._recv = recv
        self.outcome: dict[str, Any] | None = None
        self.failure: str | None = None

    def __aiter__(self) -> AsyncIterator[str]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[str]:
        async for piece in self._recv:
            yield piece


class SplitProcess:
    """Runs `python -m models.split_load` and multiplexes generations over its pipes.

    `run` (in a nursery) owns the process: cancelling it kills the child. One sequence
    at a time (a split pays a network round trip per layer group per token; parallel
    sequences are future work), so `generate` waits on a lock."""

    def __init__(self, model_path: str, endpoints: list[str], *, gpu_layers: int,
                 tensor_split: list[float], n_ctx_seq: int, n_threads: int) -> None:
        self.args = [sys.executable, "-m", "models.split_load", "--model", model_path,
                     "--gpu-layers", str(gpu_layers), "--n-ctx-seq", str(n_ctx_seq),
                     "--threads", str(max(1, n_threads))]
        for ep in endpoints:
            self.args += ["--rpc", ep]
        if tensor_split:
            self.args += ["--tensor-split", ",".join(f"{x:g}" for x in tensor_split)]
        self.n_ctx_seq = 0
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=60)
        self.ended: str | None = None  # why the process is gone
        self._proc: trio.Process | None = None
        self._lock = trio.Lock()
        self._next_id = 0
        self._gens: dict[int, tuple[trio.MemorySendChannel[str], SplitGeneration]] = {}
        self._ready = trio.Event()

    @property
    def alive(self) -> bool:
        return self._proc is not None and self.ended is None

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Start the child, report started once it loaded the model, serve until cancelled
        or the child exits. Raises SplitFailed if it never got ready."""
        import os
        import subprocess

        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        proc = await trio.lowlevel.open_process(
            self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=env)
        self._proc = proc
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._drain_stderr, proc)
                started = False
                try:
                    with trio.fail_after(READY_TIMEOUT_S):
                        await self._read_until_ready(proc)
                except trio.TooSlowError:
                    raise SplitFailed("the split model did not load within"
                                      f" {READY_TIMEOUT_S:.0f} s") from None
                started = True
                task_status.started()
                await self._read_events(proc)
                nursery.cancel_scope.cancel()
        finally:
            if self.ended is None:
                self.ended = "stopped"
            with trio.CancelScope(shield=True):
                with contextlib.suppress(ProcessLookupError, OSError):
                    proc.kill()
                with trio.move_on_after(5):
                    await proc.wait()
            self._fail_all(self.ended)
            if not started and self.ended != "stopped":
                raise SplitFailed(self.ended)

    async def _lines(self, proc: trio.Process) -> AsyncIterator[str]:
        assert proc.stdout is not None
        buf = b""
        while True:
            nl = buf.find(b"\n")
            if nl >= 0:
                line, buf = buf[:nl], buf[nl + 1:]
                yield line.decode("utf-8", "replace")
                continue
            if len(buf) > _MAX_LINE:
                raise SplitFailed("the split process wrote an over-long line")
            data = await proc.stdout.receive_some(65536)
            if not data:
                return
            buf += data

    async def _read_until_ready(self, proc: trio.Process) -> None:
        self._line_iter = self._lines(proc)
        async for line in self._line_iter:
            ev = _event(line)
            if ev.get("ev") == "ready":
                self.n_ctx_seq = int(ev["n_ctx_seq"])
                self._ready.set()
                return
        self.ended = self._exit_reason("exited while loading the model")

    async def _read_events(self, proc: trio.Process) -> None:
        async for line in self._line_iter:
            ev = _event(line)
            entry = self._gens.get(ev.get("id", -1))
            if entry is None:
                continue
            send, gen = entry
            kind = ev.get("ev")
            if kind == "piece":
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    send.send_nowait(ev["text"])
            elif kind in ("done", "refused"):
                if kind == "done":
                    gen.outcome = ev
                else:
                    gen.failure = ev["message"]
                send.close()
                del self._gens[ev["id"]]
        with trio.move_on_after(2):
            await proc.wait()
        self.ended = self._exit_reason("exited")

    def _exit_reason(self, what: str) -> str:
        tail = [s for s in self.stderr_tail if s.strip()]
        # ggml's abort line ("ggml-rpc.cpp:612: Remote RPC server crashed ..."), else the
        # last line that says error; the backtrace after it is gdb's noise
        last = next((s for s in tail if _ABORT_LINE.search(s)), None) or next(
            (s for s in reversed(tail) if "error" in s.lower() or "failed" in s.lower()),
            "")
        code = self._proc.returncode if self._proc is not None else None
        return f"split process {what} (exit {code}){': ' + last.strip() if last else ''}"

    async def _drain_stderr(self, proc: trio.Process) -> None:
        assert proc.stderr is not None
        buf = b""
        while True:
            data = await proc.stderr.receive_some(65536)
            if not data:
                return
            buf = (buf + data)[-65536:]
            *lines, buf = buf.split(b"\n")
            for ln in lines:
                self.stderr_tail.append(ln.decode("utf-8", "replace")[:500])

    def _fail_all(self, why: str) -> None:
        for send, gen in self._gens.values():
            gen.failure = why
            send.close()
        self._gens.clear()

    async def _send(self, obj: dict[str, Any]) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        await self._proc.stdin.send_all((json.dumps(obj) + "\n").encode())

    @contextlib.asynccontextmanager
    async def generate(self, body: dict[str, Any]) -> AsyncIterator[SplitGeneration]:
        """`body`: the "gen" fields (prompt, max_tokens, sampling, stops, ...)."""
        async with self._lock:
            if not self.alive:
                raise SplitFailed(self.ended or "the split process is not running")
            rid = self._next_id
            self._next_id += 1
            send, recv = trio.open_memory_channel[str](math.inf)
            gen = SplitGeneration(recv)
            self._gens[rid] = (send, gen)
            try:
                await self._send({"op": "gen", "id": rid, **body})
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                raise SplitFailed(self.ended or "the split process is gone") from None
            try:
                yield gen
            finally:
                if rid in self._gens:  # left early: cancel it in the child
                    self._gens.pop(rid, None)
                    with trio.CancelScope(shield=True), contextlib.suppress(Exception):
                        await self._send({"op": "cancel", "id": rid})


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))

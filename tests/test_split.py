"""A model split across two real daemons over llama.cpp's RPC backend, tunnelled through
/qvac/layers/1.0.0, with the real default model.

Neither node can hold gemma3-270m (317 MiB at the 1024-token context used here) within
its budget: the head has 300 MiB, the worker 300 MiB of which 200 MiB are offered for
layers. The split's greedy text must equal that of a node holding the whole model with
the same CPU kernels (plain, no repacking: see tests/plain_kernels_node.py for why), and
llama.cpp's own RPC split of the same layers.

These tests need llama-cpp-python built with -DGGML_RPC=on, which the README's set-up
commands do. Without libggml-rpc they FAIL (not skip): the README build is supposed to
provide it, and a silently skipped split would pass a broken set-up.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import trio

from qvacd.layer_worker import REBUILD_HINT, rpc_available
from tests.harness import Daemon, Mesh, clone_data_dir, free_port

MODEL = "gemma3-270m"
PROMPT = "The capital of France is"
CTX = "1024"
HEAD_ARGS = ("--memory-budget", "300MiB", "--ctx-size", CTX, "--threads", "1")
WORKER_ARGS = ("--memory-budget", "300MiB", "--layers-memory", "200MiB", "--ctx-size", CTX,
               "--threads", "1")
# the worker also listens on every address, so a server bound beyond loopback would show
WORKER_WIDE_PORT = free_port()


def test_rpc_backend_is_built() -> None:
    assert rpc_available(), REBUILD_HINT


@pytest.fixture(scope="module")
def split_mesh(tmp_path_factory: pytest.TempPathFactory, model_template: Path):
    assert rpc_available(), REBUILD_HINT
    m = Mesh(tmp_path_factory.mktemp("split"), model_template)
    m.add("head", *HEAD_ARGS)
    m.add("worker", *WORKER_ARGS, "--listen", f"/ip4/0.0.0.0/tcp/{WORKER_WIDE_PORT}")
    m.trust("worker", "head", ["layers"])  # the head may place layers on the worker
    m.trust("head", "worker", ["provider"])  # and send it what its prompts become
    m.start("worker")
    m.start("head", bootstrap=["worker"])
    m.wait_peers("head", ["worker"], timeout=30)
    yield m
    m.stop_all()


def _complete(api: str, max_tokens: int = 24) -> httpx.Response:
    return httpx.post(api + "/v1/completions", timeout=600, json={
        "model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0})


def _wait_worker_capacity(m: Mesh, timeout: float = 30) -> None:
    """Until the head's view of the worker offers its layer memory again (after a session)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        peers = httpx.get(m.nodes["head"].api + "/qvac/peers", timeout=5).json()["peers"]
        if any(p["peer_id"] == m.ids["worker"] for p in peers):
            return
        time.sleep(0.2)


def test_split_runs_what_no_node_fits(split_mesh):
    m = split_mesh
    head, worker = m.nodes["head"], m.nodes["worker"]
    for node in (head, worker):
        assert not node.status()["models"][0]["fits_budget"]
    plan = httpx.get(head.api + "/qvac/plan", params={"model": MODEL}, timeout=30).json()
    devices = {d["device"]: d for d in plan["devices"]}
    assert set(devices) == {"local", m.ids["worker"]}
    assert sum(d["layers"] for d in plan["devices"]) == plan["n_layers"] == 18
    assert devices[m.ids["worker"]]["layers"] > 0 and devices["local"]["layers"] > 0
    assert devices[m.ids["worker"]]["memory"] <= 200 * 2**20
    cli = subprocess.run([sys.executable, "-m", "qvacd.cli", "plan", MODEL, "--api",
                          head.api.replace("http://", "")], capture_output=True, text=True,
                         timeout=60)
    assert cli.returncode == 0, cli.stderr
    assert "this node" in cli.stdout and m.ids["worker"][:12] in cli.stdout

    oai = openai.OpenAI(base_url=head.api + "/v1", api_key="x", max_retries=0, timeout=600)
    raw = oai.completions.with_raw_response.create(
        model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stream=True)
    assert raw.headers["x-qvac-served-by"].split(",") == [m.ids["head"], m.ids["worker"]]
    chunks = list(raw.parse())
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text.strip()
    final = [c for c in chunks if getattr(c, "x_qvac_served_by", None)]
    assert final and final[-1].x_qvac_served_by == [m.ids["head"], m.ids["worker"]]
    st = worker.status()["layers"]
    assert st["sessions"] == 1 and st["bytes_in"] > 0 and len(st["server_pids"]) == 1
    # a second request reuses the loaded split, greedy: the same text
    pids = st["server_pids"]
    again = _complete(head.api).json()["choices"][0]["text"]
    assert again == text and worker.status()["layers"]["server_pids"] == pids


class PlainKernelDaemon(Daemon):
    """A whole-model node that loads with the split head's kernel choice (no repacking)."""

    launcher = (sys.executable, str(Path(__file__).resolve().parent / "plain_kernels_node.py"))


# the second prompt's first greedy token already differs between repacked and plain
# kernels; the first departs after about ten tokens when only the head repacks
EQUAL_PROMPTS = (PROMPT, "Here is a long story about a dragon who learned to cook. Once"
                 " upon a time,")


def test_split_text_equals_a_node_holding_the_whole_model(split_mesh):
    """The issue's test: two nodes each too small run the model split; greedy, its text is
    byte-for-byte that of one node holding the whole model, loaded with the same kernels.

    The kernels are the condition: a CPU_REPACK buffer (llama.cpp's default on the CPU)
    sums in another order than the plain kernels an RPC server's buffers get, and a base
    model's near ties then flip. So the split head loads without repacking
    (models/split_load.py) and the whole-model node here too (tests/plain_kernels_node.py);
    a node with its default repacking is not byte-equal to every split, nor is llama.cpp's
    own RPC split to its all-local run unless both run --no-repack (bench/split.py prints
    those comparisons)."""
    m = split_mesh
    whole = PlainKernelDaemon(clone_data_dir(m.template, m.root / "whole-plain"), "--no-p2p",
                              "--ctx-size", CTX, "--threads", "1", name="whole")
    whole.start()
    try:
        assert whole.status()["models"][0]["fits_budget"]
        for prompt in EQUAL_PROMPTS:
            body = {"model": MODEL, "prompt": prompt, "max_tokens": 48, "temperature": 0}
            r = httpx.post(m.nodes["head"].api + "/v1/completions", json=body, timeout=600)
            assert r.status_code == 200, r.text
            assert r.headers["x-qvac-served-by"] == f"{m.ids['head']},{m.ids['worker']}"
            split_text = r.json()["choices"][0]["text"]
            w = httpx.post(whole.api + "/v1/completions", json=body, timeout=600)
            assert w.status_code == 200, w.text
            whole_text = w.json()["choices"][0]["text"]
            assert w.json()["usage"]["completion_tokens"] == 48
            assert split_text == whole_text, (prompt, split_text, whole_text)
    finally:
        whole.stop()


def test_split_text_equals_llama_cpps_own_rpc_split(split_mesh):
    """Greedy, our split (RPC through the peer stream) is byte-for-byte what llama.cpp's
    own ggml-rpc-server + llama-server --rpc give for the same split over plain TCP, with
    the same kernels (--no-repack, as our head)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.split import llama_bin, llama_complete, llama_server
    from bench.split import model_path as _model_path

    bin_dir = llama_bin()
    if bin_dir is None:
        pytest.skip("llama-server and ggml-rpc-server are not built (QVACD_LLAMA_BIN or"
                    " /work/llama-rpc-build/bin; see bench/split.py): no anchor to compare")
    ours = _complete(split_mesh.nodes["head"].api).json()["choices"][0]["text"]
    model = _model_path(split_mesh.template)
    with llama_server(model, bin_dir, rpc_blocks=9, repack=False) as url:
        theirs, _, _ = llama_complete(url, PROMPT, 24)
    assert ours == theirs


def test_three_nodes_split_with_two_workers_equal_the_whole_model(
        tmp_path: Path, model_template: Path):
    """A head and two workers, none of which can hold the model: the blocks are divided
    over all three (two RPC devices, tensor_split), the answer names all three, and the
    greedy text is the whole model's (same kernels, as above)."""
    assert rpc_available(), REBUILD_HINT
    m = Mesh(tmp_path / "three", model_template)
    m.add("head", *HEAD_ARGS)
    workers = ("worker1", "worker2")
    for w in workers:
        m.add(w, "--memory-budget", "300MiB", "--layers-memory", "80MiB", "--ctx-size", CTX,
              "--threads", "1")
        m.trust(w, "head", ["layers"])
        m.trust("head", w, ["provider"])
    whole = PlainKernelDaemon(clone_data_dir(model_template, tmp_path / "whole-plain"),
                              "--no-p2p", "--ctx-size", CTX, "--threads", "1", name="whole")
    try:
        for w in workers:
            m.start(w)
        m.start("head", bootstrap=list(workers))
        whole.start()
        m.wait_peers("head", list(workers), timeout=30)
        head = m.nodes["head"]
        for node in m.nodes.values():
            assert not node.status()["models"][0]["fits_budget"]
        plan = httpx.get(head.api + "/qvac/plan", params={"model": MODEL}, timeout=30).json()
        layers = {d["device"]: d["layers"] for d in plan["devices"]}
        assert set(layers) == {"local", m.ids["worker1"], m.ids["worker2"]}, layers
        assert all(n > 0 for n in layers.values()) and sum(layers.values()) == 18, layers
        body = {"model": MODEL, "prompt": EQUAL_PROMPTS[1], "max_tokens": 48,
                "temperature": 0}
        r = httpx.post(head.api + "/v1/completions", json=body, timeout=600)
        assert r.status_code == 200, r.text
        served = r.headers["x-qvac-served-by"].split(",")  # the head, then the plan's order
        assert served[0] == m.ids["head"] and len(served) == 3
        assert set(served[1:]) == {m.ids["worker1"], m.ids["worker2"]}, served
        for w in workers:
            st = m.nodes[w].status()["layers"]
            assert st["bytes_in"] > 0 and len(st["server_pids"]) == 1, (w, st)
        w = httpx.post(whole.api + "/v1/completions", json=body, timeout=600)
        assert w.status_code == 200, w.text
        assert r.json()["choices"][0]["text"] == w.json()["choices"][0]["text"]
    finally:
        whole.stop()
        m.stop_all()


def _listening_inodes() -> dict[int, str]:
    """inode -> local address of every listening TCP socket on this machine."""
    out: dict[int, str] = {}
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(path) as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[3] == "0A":  # LISTEN
                    out[int(parts[9])] = parts[1]
    return out


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _is_loopback(addr: str) -> bool:
    host = addr.split(":")[0]
    if len(host) == 8:  # IPv4, little-endian hex
        return host.endswith("7F")
    return host == "0" * 31 + "1" or host == "0000000000000000FFFF00000100007F"


def test_worker_listens_on_no_network_address_but_its_libp2p_port(split_mesh):
    m = split_mesh
    worker = m.nodes["worker"]
    if not worker.status()["layers"]["server_pids"]:
        _complete(m.nodes["head"].api, 4)  # a session, so its RPC server process exists
    st = worker.status()
    pids = [worker.proc.pid, *st["layers"]["server_pids"]]
    assert len(pids) >= 2, "no RPC server process to check"
    listening = _listening_inodes()
    libp2p_ports = {m.ports["worker"], WORKER_WIDE_PORT}
    seen = []
    for pid in pids:
        for inode in _socket_inodes(pid) & set(listening):
            addr = listening[inode]
            port = int(addr.split(":")[1], 16)
            seen.append((pid, addr))
            assert _is_loopback(addr) or port in libp2p_ports, \
                f"pid {pid} listens on {addr} (port {port})"
    # the RPC server process does listen, on loopback
    assert any(pid in st["layers"]["server_pids"] for pid, _ in seen), seen


# ---- refusals: a raw libp2p client sending real RPC commands ------------------------------

RPC_HELLO = bytes([14]) + (24).to_bytes(8, "little") + bytes(24)
RPC_DEVICE_COUNT = bytes([15]) + (0).to_bytes(8, "little")


async def _raw_layers(worker_addr: str, worker_id: str, identity, payload: bytes,  # type: ignore[no-untyped-def]
                      after_ready: bytes = b""):
    """Open /qvac/layers/1.0.0 from a fresh libp2p node with `identity`, write `payload`
    (and `after_ready` once a first frame came back), read until the worker ends the
    stream: (the first message or None, whether the worker reset the stream)."""
    from peers import PeerNetwork
    from protocol import LAYERS_LIMITS, LAYERS_PROTOCOL, FrameDecoder
    from tests.test_network_support import FakeCapacity

    net = PeerNetwork(identity, capacity_source=FakeCapacity(),
                      listen_addrs=["/ip4/127.0.0.1/tcp/0"], bootstrap=[worker_addr],
                      mdns=False)
    dec = FrameDecoder(LAYERS_LIMITS)
    first, reset = None, False
    async with net:
        with trio.fail_after(30):
            while net.table.get(worker_id) is None:  # the bootstrap dial is under way
                await trio.sleep(0.05)
            stream = await net.open_stream(worker_id, LAYERS_PROTOCOL)
            with contextlib.suppress(Exception):  # a refusal may close it before we write
                await stream.write(payload)
            while True:
                try:
                    data = await stream.read(65536)
                except Exception:  # noqa: BLE001 - reset by the worker
                    reset = True
                    break
                if not data:
                    break
                if first is None:
                    dec.feed(data)
                    first = dec.next_message()
                    if first is not None and after_ready:
                        await stream.write(after_ready)
    return first, reset


def _layers(worker: Daemon) -> dict:
    return worker.status()["layers"]


async def test_untrusted_and_roleless_peers_are_refused_before_any_rpc_byte(split_mesh):
    from peers.identity import Identity
    from peers.trust import TrustStore
    from protocol import Error, ErrorCode, LayersHello, encode_frame

    m = split_mesh
    worker = m.nodes["worker"]
    addr, wid = m.addr("worker"), m.ids["worker"]
    before = _layers(worker)
    stranger, consumer, layered = Identity.generate(), Identity.generate(), Identity.generate()
    trust = TrustStore.in_dir(worker.data_dir)
    trust.add(consumer.peer_id_str, ["consumer", "provider", "seeder"])
    trust.add(layered.peer_id_str, ["layers"])
    await trio.sleep(1.5)  # the daemon re-reads trust.json within a second
    # real RPC commands straight away (no LayersHello): HELLO, then DEVICE_COUNT
    for ident in (stranger, consumer):
        msg, _ = await _raw_layers(addr, wid, ident, RPC_HELLO + RPC_DEVICE_COUNT)
        assert isinstance(msg, Error) and msg.code == ErrorCode.UNAUTHORIZED, msg
        assert "--roles layers" in msg.message
    # even a LayersHello first does not get an unauthorized peer further
    hello = encode_frame(LayersHello(7, 0, 0, 1 << 20))
    msg, _ = await _raw_layers(addr, wid, stranger, hello + RPC_HELLO)
    assert isinstance(msg, Error) and msg.code == ErrorCode.UNAUTHORIZED
    after = _layers(worker)
    assert after["bytes_in"] == before["bytes_in"]  # nothing reached an RPC server
    assert after["server_pids"] == before["server_pids"]  # none was started for them

    # an allowed peer: garbage instead of a hello is a protocol error, RPC bytes sent
    # before LayersReady too, an oversized frame too; a bad RPC command resets the stream
    msg, _ = await _raw_layers(addr, wid, layered, b"\x05\xc1\xc1\xc1\xc1\xc1")
    assert isinstance(msg, Error) and msg.code == ErrorCode.PROTOCOL
    msg, _ = await _raw_layers(addr, wid, layered, hello + RPC_HELLO)
    assert isinstance(msg, Error) and msg.code == ErrorCode.PROTOCOL
    assert "before LayersReady" in msg.message
    msg, _ = await _raw_layers(addr, wid, layered, b"\xff\xff\x07" + b"\x00" * 64)
    assert isinstance(msg, Error) and msg.code == ErrorCode.TOO_LARGE
    too_much = encode_frame(LayersHello(7, 0, 0, 1 << 40))
    msg, _ = await _raw_layers(addr, wid, layered, too_much)
    assert isinstance(msg, Error) and msg.code == ErrorCode.TOO_LARGE
    assert "offered here" in msg.message
    newer = encode_frame(LayersHello(8, 0, 0, 1 << 20))
    msg, _ = await _raw_layers(addr, wid, layered, newer)
    assert isinstance(msg, Error) and msg.code == ErrorCode.BAD_REQUEST
    assert "protocol mismatch" in msg.message and "8.0.0" in msg.message
    # LayersReady, then a command number ggml does not have: the stream is reset and the
    # command never reaches the RPC server (the HELLO before it does)
    from protocol import LayersReady

    mid = _layers(worker)["bytes_in"]
    msg, reset = await _raw_layers(addr, wid, layered, hello,
                                   after_ready=RPC_HELLO + bytes([200]) + bytes(8))
    assert isinstance(msg, LayersReady) and reset
    assert _layers(worker)["bytes_in"] == mid
    assert "unknown RPC command 200" in worker.log()
    # the worker still serves the head's split
    r = _complete(m.nodes["head"].api, 4)
    assert r.status_code == 200, r.text


# ---- weights from the worker's own copy of the file ---------------------------------------


@pytest.fixture(scope="module")
def bare_split_mesh(tmp_path_factory: pytest.TempPathFactory, model_template: Path):
    """The same split, but the worker's store holds no model: every weight crosses."""
    assert rpc_available(), REBUILD_HINT
    m = Mesh(tmp_path_factory.mktemp("split-bare"), model_template)
    m.add("head", *HEAD_ARGS)
    m.add("worker", "--no-default-model", *WORKER_ARGS)
    shutil.rmtree(m.root / "worker" / "models")
    m.trust("worker", "head", ["layers"])
    m.trust("head", "worker", ["provider"])
    m.start("worker")
    m.start("head", bootstrap=["worker"])
    m.wait_peers("head", ["worker"], timeout=30)
    yield m
    m.stop_all()


def _worker_layer_bytes(m: Mesh) -> int:
    """Bytes of the blocks the plan puts on the worker (the last ones), from the GGUF."""
    from models.gguf import read_gguf
    from models.store import ModelStore

    plan = httpx.get(m.nodes["head"].api + "/qvac/plan", params={"model": MODEL},
                     timeout=30).json()
    on_worker = {d["device"]: d["layers"] for d in plan["devices"]}[m.ids["worker"]]
    first = plan["n_layers"] - on_worker
    info = read_gguf(ModelStore(m.template).resolve(MODEL).path)
    return sum(size for name, _, size in info.tensor_extents
               if name.startswith("blk.") and int(name.split(".")[1]) >= first)


def test_a_worker_holding_the_file_loads_its_layers_from_it(split_mesh, bare_split_mesh):
    """The worker of `split_mesh` holds the model (by sha256, in its store): the weights of
    its layers come from its own copy and the tunnel carries a small fraction of them.
    The worker of `bare_split_mesh` holds nothing: every weight crosses. Same greedy text."""
    held = _complete(split_mesh.nodes["head"].api).json()["choices"][0]["text"]
    bare = _complete(bare_split_mesh.nodes["head"].api).json()["choices"][0]["text"]
    layer_bytes = _worker_layer_bytes(split_mesh)
    assert layer_bytes > 20 * 2**20  # 9 blocks of gemma3-270m Q4_K_M: about 33 MiB
    assert held == bare and held.strip()
    with_file = split_mesh.nodes["worker"].status()["layers"]
    without = bare_split_mesh.nodes["worker"].status()["layers"]
    print(f"tunnel bytes: {with_file['bytes_in']} with the file"
          f" ({with_file['bytes_from_file']} read from it), {without['bytes_in']} without;"
          f" {layer_bytes} bytes of layers on the worker")
    # the load and every request so far, with the file, under a tenth of the layers' bytes
    assert with_file["bytes_in"] < layer_bytes / 10, with_file
    # the weights tensors of 64 KiB and more (all but the norms) were read from the file
    assert with_file["bytes_from_file"] >= 0.95 * layer_bytes, with_file
    assert with_file["bytes_from_file"] <= layer_bytes
    # without it, every weight crossed the tunnel, none came from a file
    assert without["bytes_in"] > layer_bytes and without["bytes_from_file"] == 0, without
    assert not bare_split_mesh.nodes["worker"].status()["models"]


def test_model_file_index_finds_the_files_tensors_and_nothing_else(model_template: Path):
    import hashlib

    from models.gguf import read_gguf
    from models.store import ModelStore
    from protocol import SetTensor
    from qvacd.layer_tunnel import ModelFileIndex

    path = ModelStore(model_template).resolve(MODEL).path
    extents = read_gguf(path).tensor_extents
    index = ModelFileIndex(path)
    try:
        assert len(index) == sum(1 for _, _, size in extents if size >= 64 * 1024)
        _, offset, size = next(e for e in extents if e[0] == "blk.9.attn_q.weight")
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        head = b"h" * 305
        command = bytes([6]) + (305 + size).to_bytes(8, "little") + head + data
        assert index.is_candidate(size, data[:16])
        found = index.find(SetTensor(command))
        assert found is not None and found.head == head
        assert (found.file_offset, found.size) == (offset, size)
        assert found.sha256 == hashlib.sha256(data).digest()
        changed = data[:-1] + bytes([data[-1] ^ 1])  # same size and prefix, one bit off
        assert index.find(SetTensor(command[:-1] + changed[-1:])) is None
        assert not index.is_candidate(size, b"\xff" * 16)
    finally:
        index.close()


async def test_set_tensor_from_file_is_checked_by_the_worker(split_mesh):
    """A raw head with the layers role: SET_TENSOR_FROM_FILE on a session whose worker
    holds no file for it, a digest that is not the file's, or a range past the file's end
    resets that session with a one-line reason; the worker serves the real head after."""
    from models.gguf import read_gguf
    from models.store import ModelStore
    from peers.identity import Identity
    from peers.trust import TrustStore
    from protocol import LayersHello, LayersReady, TensorFromFile, encode_frame

    m = split_mesh
    worker = m.nodes["worker"]
    addr, wid = m.addr("worker"), m.ids["worker"]
    entry = ModelStore(m.template).resolve(MODEL)
    _, offset, size = next(e for e in read_gguf(entry.path).tensor_extents
                           if e[0] == "blk.0.attn_q.weight")
    layered = Identity.generate()
    TrustStore.in_dir(worker.data_dir).add(layered.peer_id_str, ["layers"])
    await trio.sleep(1.5)  # the daemon re-reads trust.json within a second
    before = _layers(worker)
    cases = [
        (LayersHello(7, 0, 0, 1 << 20), False, TensorFromFile(bytes(305), offset, size,
                                                               bytes(32)),
         "SET_TENSOR_FROM_FILE on a session whose worker did not say it holds the model"),
        (LayersHello(7, 0, 0, 1 << 20, entry.sha256), True,
         TensorFromFile(bytes(305), entry.size - 10, 100, bytes(32)),
         f"reads bytes {entry.size - 10}..{entry.size + 90} of a {entry.size}-byte file"),
        (LayersHello(7, 0, 0, 1 << 20, entry.sha256), True,
         TensorFromFile(bytes(305), offset, size, bytes(32)),
         f"the {size} bytes at file offset {offset} do not have the sha256 the head sent"),
    ]
    for hello, holds, command, reason in cases:
        msg, reset = await _raw_layers(addr, wid, layered, encode_frame(hello),
                                       after_ready=RPC_HELLO + command.encode())
        assert isinstance(msg, LayersReady) and msg.holds_model is holds and reset, msg
        lines = [ln for ln in worker.log().splitlines() if reason in ln]
        assert len(lines) == 1 and "layer session of" in lines[0], reason
    after = _layers(worker)
    assert after["bytes_from_file"] == before["bytes_from_file"]  # nothing reached a server
    # after a digest that did not match, that head is not offered the copy again (damaged
    # or not, its next load sends the bytes); the module's own head still is
    msg, _ = await _raw_layers(addr, wid, layered, encode_frame(cases[-1][0]),
                               after_ready=RPC_HELLO + bytes([200]) + bytes(8))  # then end it
    assert isinstance(msg, LayersReady) and msg.holds_model is False
    assert "its next load gets the weights over the network" in worker.log()
    r = _complete(m.nodes["head"].api, 4)
    assert r.status_code == 200, r.text


# ---- faults (last: it kills the worker of the module's mesh) ------------------------------


def test_worker_killed_mid_answer_ends_the_stream_with_one_line_naming_it(split_mesh):
    m = split_mesh
    head, worker = m.nodes["head"], m.nodes["worker"]
    wid = m.ids["worker"]
    _complete(head.api, 2)  # the split is loaded
    server_pids = _layers(worker)["server_pids"]
    assert server_pids
    oai = openai.OpenAI(base_url=head.api + "/v1", api_key="x", max_retries=0, timeout=120)
    stream = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=400,
                                    temperature=0, stream=True)
    pieces, killed_at, cut = [], None, None
    t0 = time.monotonic()
    try:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                pieces.append(chunk.choices[0].text)
            if len(pieces) == 5 and killed_at is None:
                for pid in server_pids:  # the worker machine goes away: daemon and RPC server
                    os.kill(pid, signal.SIGKILL)
                worker.proc.kill()
                killed_at = time.monotonic()
    except openai.APIError as e:  # the stream's last event says it was cut, and by whom
        cut = str(e)
    ended = time.monotonic()
    assert cut is not None and wid[:16] in cut and "\n" not in cut, cut
    assert killed_at is not None, "the answer ended before the worker could be killed"
    assert ended - killed_at < 60, "the stream hung after the worker died"
    assert 5 <= len(pieces) < 400
    # one WARNING on the head names the worker
    time.sleep(0.5)
    lines = [ln for ln in head.log().splitlines()
             if "split of gemma3-270m failed mid-answer" in ln]
    assert len(lines) == 1 and wid[:16] in lines[0] and "level=warning" in lines[0], lines
    # the head lives on; the next request is a 503 in one line: the worker cannot be
    # reached (its capacity record has not expired yet) or, once it is gone, no split fits
    assert head.status()["peer_id"] == m.ids["head"]
    r = _complete(head.api, 4)
    msg = r.json()["error"]["message"]
    assert r.status_code == 503 and "\n" not in msg, r.text
    assert f"worker {wid[:16]} cannot be reached" in msg or "no split fits" in msg, msg

"""Pairing with a short one-time code (qvacd/pairing.py), between real daemons on loopback.

Two daemons pair through the CLI (`qvacd pair` shows the code, `qvacd pair CODE`
completes it) and then delegate to each other; a wrong, an expired and a reused code
are refused in one line with nothing trusted on either side; a third node that knows
both peers cannot pair with 100 guessed codes (the offer dies, the guesser is banned).
The code parser and the key confirmation are unit-tested with the real spake2 package.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import trio
from spake2 import SPAKE2_A, SPAKE2_B

from peers.trust import TrustStore
from protocol import (
    PAIR_LIMITS,
    Error,
    FrameDecoder,
    PairConfirm,
    PairDone,
    PairReply,
    PairStart,
    encode_frame,
)
from qvacd.pairing import (
    MAX_FAILED_ATTEMPTS,
    PairCode,
    PairingError,
    PairingService,
    confirmation,
    parse_code,
    transcript_hash,
)
from tests.harness import Daemon, Mesh

REPO = Path(__file__).resolve().parent.parent
MODEL = "gemma3-270m"
ALL = {"consumer", "provider", "seeder"}


# ---- unit: the code and the confirmations ------------------------------------------------


@pytest.mark.parametrize("text", ["7-4821-0953", " 7 4821 0953 ", "7-48210953", "7 4821-0953"])
def test_code_forms_a_person_may_type(text: str) -> None:
    assert parse_code(text) == (PairCode(7, "48210953"), None)


def test_link_carries_an_address() -> None:
    addr = "/ip4/192.0.2.7/tcp/4001/p2p/12D3KooWExample"
    assert parse_code(f"qvac://pair/12-0000-0042@{addr}") == (PairCode(12, "00000042"), addr)


@pytest.mark.parametrize("text", ["", "hello", "0-1234-5678", "100-1234-5678", "7-123-45678",
                                  "7-1234-56789", "qvac://pair/7-1234-5678", "x" * 5000])
def test_bad_codes_are_one_line(text: str) -> None:
    with pytest.raises(PairingError) as info:
        parse_code(text)
    assert info.value.kind == "bad_input" and "\n" not in info.value.message
    assert "7-4821-0953" in info.value.message  # says what a code looks like


def test_new_codes_are_random_and_well_formed() -> None:
    codes = {str(PairCode.new(5)) for _ in range(200)}
    assert len(codes) == 200
    assert all(parse_code(c)[0].offer == 5 for c in codes)


def _exchange(code_a: PairCode, code_b: PairCode, ids_a: tuple[str, str],
              ids_b: tuple[str, str]) -> tuple[bytes, bytes]:
    """One SPAKE2 run as both sides do it; the two confirmation MACs side A would check."""
    a = SPAKE2_A(code_a.password, idA=ids_a[0].encode(), idB=ids_a[1].encode())
    b = SPAKE2_B(code_b.password, idA=ids_b[0].encode(), idB=ids_b[1].encode())
    pa, pb = a.start(), b.start()
    ka, kb = a.finish(pb), b.finish(pa)
    roles = ("consumer", "provider")
    th_a = transcript_hash(ids_a[0], ids_a[1], code_a.offer, pa, pb, roles)
    th_b = transcript_hash(ids_b[0], ids_b[1], code_b.offer, pa, pb, roles)
    return confirmation(ka, b"A", th_a), confirmation(kb, b"A", th_b)


def test_confirmation_checks_only_with_the_same_code_and_peer_ids() -> None:
    code = PairCode(3, "12345678")
    ids = ("offerer", "joiner")
    mine, theirs = _exchange(code, code, ids, ids)
    assert mine == theirs
    mine, theirs = _exchange(code, PairCode(3, "12345679"), ids, ids)
    assert mine != theirs  # one digit off
    mine, theirs = _exchange(code, code, ids, ("offerer", "someone-else"))
    assert mine != theirs  # a relay or fake peer in between has another peer id


# ---- daemons ------------------------------------------------------------------------------


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qvacd.cli", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout)


def api_arg(d: Daemon) -> list[str]:
    return ["--api", d.api.removeprefix("http://")]


def trusted(d: Daemon) -> dict[str, set[str]]:
    return {e.peer_id: set(e.roles) for e in TrustStore.in_dir(d.data_dir).list()}


def offer(d: Daemon, **body: object) -> dict:
    r = httpx.post(d.api + "/qvac/pair", json=body, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def join(d: Daemon, code: str) -> httpx.Response:
    return httpx.post(d.api + "/qvac/pair/join", json={"code": code}, timeout=120)


def wait_connected(d: Daemon, peer_id: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p["peer_id"] == peer_id and p.get("connected")
               for p in httpx.get(d.api + "/qvac/peers", timeout=5).json()["peers"]):
            return
        time.sleep(0.1)
    raise TimeoutError(f"{peer_id} never connected to {d.name}:\n{d.log()}")


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qvacd: error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def two(mesh: Mesh, *args: str) -> tuple[Daemon, Daemon]:
    mesh.add("desktop", *args)
    mesh.add("laptop", *args)
    desktop = mesh.start("desktop")
    laptop = mesh.start("laptop", bootstrap=["desktop"])
    wait_connected(laptop, mesh.ids["desktop"])
    wait_connected(desktop, mesh.ids["laptop"])
    return desktop, laptop


def complete(d: Daemon, prompt: str = "The capital of France is") -> httpx.Response:
    return httpx.post(d.api + "/v1/completions", timeout=300, json={
        "model": MODEL, "prompt": prompt, "max_tokens": 6, "temperature": 0})


def test_pair_with_the_code_then_delegate_both_ways(mesh):
    # --delegate always: each node sends every request to a trusted peer, so the only
    # way either answers is through the other; before pairing, neither trusts anyone.
    desktop, laptop = two(mesh, "--delegate", "always")
    assert complete(laptop).status_code == 503
    shower = subprocess.Popen([sys.executable, "-m", "qvacd.cli", "pair", *api_arg(desktop)],
                              cwd=REPO, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    try:
        first = shower.stdout.readline().strip()
        assert first.startswith("code: "), (first, shower.stderr.read() if shower.poll() else "")
        code = first.removeprefix("code: ")
        link = shower.stdout.readline().strip()
        assert link.startswith(f"link: qvac://pair/{code}@/"), link
        done = cli("pair", code, *api_arg(laptop))
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == (f"paired with {mesh.ids['desktop']}; trusted as"
                                       " consumer,provider,seeder")
        out, err = shower.communicate(timeout=60)
        assert shower.returncode == 0, err
        assert f"paired with {mesh.ids['laptop']}" in out
    finally:
        if shower.poll() is None:
            shower.kill()
    assert trusted(desktop) == {mesh.ids["laptop"]: ALL}
    assert trusted(laptop) == {mesh.ids["desktop"]: ALL}
    for consumer, provider in ((laptop, "desktop"), (desktop, "laptop")):
        r = complete(consumer)
        assert r.status_code == 200, r.text
        assert r.headers["x-qvac-served-by"] == mesh.ids[provider]
        assert r.json()["choices"][0]["text"].strip()
    counts = desktop.status()["pairing"]["counts"]
    assert counts["offer_paired"] == 1 and counts.get("offer_failed", 0) == 0


def test_link_pairs_a_device_that_was_not_connected(mesh):
    mesh.add("desktop")
    mesh.add("laptop")
    desktop, laptop = mesh.start("desktop"), mesh.start("laptop")  # no bootstrap, no mDNS
    made = offer(desktop, roles=["consumer"], minutes=2)
    assert made["roles"] == ["consumer"]
    bare = join(laptop, made["code"])
    assert bare.status_code == 404 and "no other qvacd device" in bare.json()["error"]["message"]
    link = next(x for x in made["links"] if "/ip4/127.0.0.1/" in x)
    r = join(laptop, link)
    assert r.status_code == 200, r.text
    assert r.json() == {"peer_id": mesh.ids["desktop"], "roles": ["consumer"]}
    assert trusted(desktop) == {mesh.ids["laptop"]: {"consumer"}}
    assert trusted(laptop) == {mesh.ids["desktop"]: {"consumer"}}


def test_wrong_expired_and_reused_codes_are_refused_in_one_line(mesh):
    desktop, laptop = two(mesh)
    made = offer(desktop)
    real = parse_code(made["code"])[0]
    wrong = str(PairCode(real.offer, f"{(int(real.secret) + 1) % 10**8:08d}"))
    one_line_error(cli("pair", wrong, *api_arg(laptop)), "wrong pairing code",
                   "nothing was trusted")
    view = httpx.get(f"{desktop.api}/qvac/pair/{real.offer}", timeout=10).json()
    assert view["state"] == "open" and view["failed_attempts"] == 1
    assert trusted(desktop) == {} and trusted(laptop) == {}
    assert "a wrong pairing code for offer" in desktop.log()
    # Expired: a code valid for 1.2 s, typed after 2 s.
    short = offer(desktop, minutes=0.02)
    time.sleep(2.0)
    one_line_error(cli("pair", short["code"], *api_arg(laptop)), "expired")
    assert trusted(desktop) == {} and trusted(laptop) == {}
    # Reused: the real code works once; the same code again is refused.
    assert cli("pair", made["code"], *api_arg(laptop)).returncode == 0
    one_line_error(cli("pair", made["code"], *api_arg(laptop)), "already used")
    assert trusted(desktop) == {mesh.ids["laptop"]: ALL}
    # Bad input never reaches the network.
    one_line_error(cli("pair", "banana", *api_arg(laptop)), "7-4821-0953")
    one_line_error(cli("pair", "--minutes", "0", *api_arg(desktop)), "minutes")
    one_line_error(cli("pair", "--roles", "admin", *api_arg(desktop)), "unknown role")


def test_a_third_node_cannot_pair_with_guessed_codes(mesh):
    mesh.add("desktop")
    mesh.add("laptop")
    mesh.add("watcher")
    desktop = mesh.start("desktop")
    laptop = mesh.start("laptop", bootstrap=["desktop"])
    watcher = mesh.start("watcher", bootstrap=["desktop", "laptop"])  # knows both peers
    wait_connected(watcher, mesh.ids["desktop"])
    wait_connected(watcher, mesh.ids["laptop"])
    made = offer(desktop)
    real = parse_code(made["code"])[0]
    answers = []
    for _ in range(100):  # the offer number is not secret; the 8 digits are guessed
        guess = PairCode(real.offer, f"{secrets.randbelow(10**8):08d}")
        if guess == real:
            continue
        answers.append(join(watcher, str(guess)).status_code)
    assert 200 not in answers and len(answers) >= 99
    assert answers[:MAX_FAILED_ATTEMPTS] == [403] * MAX_FAILED_ATTEMPTS  # real guesses
    view = httpx.get(f"{desktop.api}/qvac/pair/{real.offer}", timeout=10).json()
    assert view["state"] == "dead" and view["failed_attempts"] == MAX_FAILED_ATTEMPTS
    banned = [b["peer_id"] for b in desktop.status()["banned"]["peers"]]
    assert mesh.ids["watcher"] in banned
    assert "closed after 3 failed attempts" in desktop.log()
    # The offer is gone for the real device too, and nothing is trusted anywhere.
    assert join(laptop, made["code"]).status_code != 200
    assert trusted(desktop) == trusted(laptop) == trusted(watcher) == {}


def test_pairing_routes_need_the_token(start_daemon):
    d = start_daemon(env={"QVACD_API_TOKEN": "s3cret"}, name="tok")
    assert httpx.post(d.api + "/qvac/pair", json={}, timeout=10).status_code == 401
    assert httpx.post(d.api + "/qvac/pair/join", json={"code": "7-1234-5678"},
                      timeout=10).status_code == 401
    r = httpx.post(d.api + "/qvac/pair", json={}, timeout=10, headers=d.auth())
    assert r.status_code == 200 and r.json()["state"] == "open"


# ---- two network namespaces, found by mDNS: the code carries no address -------------------


class NamespaceDaemon(Daemon):
    """A daemon inside network namespace `ns`, mDNS on, its API on the namespace's
    address behind a token (the test reaches it across the bridge)."""

    base_args = ("--listen", "/ip4/0.0.0.0/tcp/0")

    def __init__(self, data_dir: Path, ns: str, ip: str, *args: str) -> None:
        self.launcher = ("ip", "netns", "exec", ns, sys.executable, "-m", "qvacd.cli", "start")
        super().__init__(data_dir, *args, env={"QVACD_API_TOKEN": "pair-ns-token"})
        self.api = f"http://{ip}:{self.port}"
        self.args = ["--api", f"{ip}:{self.port}", *args]


def test_two_namespaces_pair_by_code_found_by_mdns(tmp_path, model_template):
    from tests.harness import clone_data_dir
    from tests.test_mdns import Bridge, _netns_available

    why = _netns_available()
    if why:
        pytest.skip(f"{why}; run as root on Linux with iproute2 for this test")
    bridge = Bridge()
    daemons: list[NamespaceDaemon] = []
    try:
        bridge.up()
        # The test itself talks to both APIs across the bridge, from the root namespace.
        subprocess.run(["ip", "addr", "add", bridge.ips[0].rsplit(".", 1)[0] + ".254/24",
                        "dev", bridge.br], check=True, capture_output=True)
        for name, ns, ip, extra in (("a", bridge.ns[0], bridge.ips[0], ()),
                                    ("b", bridge.ns[1], bridge.ips[1],
                                     ("--memory-budget", "64MiB"))):
            d = NamespaceDaemon(clone_data_dir(model_template, tmp_path / name), ns, ip, *extra)
            daemons.append(d)
            d.start()
        big, small = daemons
        ids = [d.status()["peer_id"] for d in daemons]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # mDNS alone: no bootstrap anywhere
            peers = httpx.get(small.api + "/qvac/peers", headers=small.auth(), timeout=5).json()
            if any(p["peer_id"] == ids[0] and p.get("connected") for p in peers["peers"]):
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"no mDNS connection between the namespaces:\n{small.log()}")
        r = httpx.post(big.api + "/qvac/pair", json={}, headers=big.auth(), timeout=10)
        assert r.status_code == 200, r.text
        code = r.json()["code"]
        assert "@" not in code
        r = httpx.post(small.api + "/qvac/pair/join", json={"code": code},
                       headers=small.auth(), timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["peer_id"] == ids[0]
        assert trusted(big) == {ids[1]: ALL} and trusted(small) == {ids[0]: ALL}
        deadline = time.monotonic() + 20
        while True:  # the small node routes once it holds big's capacity record
            r = httpx.post(small.api + "/v1/completions", headers=small.auth(), timeout=300,
                           json={"model": MODEL, "prompt": "Hello", "max_tokens": 4})
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert r.status_code == 200, r.text
        assert r.headers["x-qvac-served-by"] == ids[0]
    finally:
        for d in daemons:
            try:
                d.stop()
            except subprocess.TimeoutExpired:
                pass
        bridge.down()


# ---- unit: the offering side's handler against a misbehaving peer --------------------------
# The stream is an in-memory pipe (tests only); the trust store, codes and SPAKE2 are real.


class _PipeEnd:
    def __init__(self, send: trio.MemorySendChannel, recv: trio.MemoryReceiveChannel) -> None:
        self.send, self.recv = send, recv

    async def read(self, n: int | None = None) -> bytes:
        try:
            return await self.recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            return b""

    async def write(self, data: bytes) -> None:
        await self.send.send(data)

    async def close(self) -> None:
        await self.send.aclose()

    async def reset(self) -> None:
        await self.send.aclose()


def _pipe() -> tuple[_PipeEnd, _PipeEnd]:
    a_send, b_recv = trio.open_memory_channel(64)
    b_send, a_recv = trio.open_memory_channel(64)
    return _PipeEnd(a_send, a_recv), _PipeEnd(b_send, b_recv)


class _Offences:
    def __init__(self) -> None:
        self.kinds: list[str] = []

    def offence(self, kind: str, stream: object, peer: str) -> bool:
        self.kinds.append(kind)
        return False


OFFERER = "12D3KooWPjceQrSwdWXPyLLeABRXmuqt69Rg3sBYbU1Nft9HyQ6X"
JOINER = "12D3KooWH3uVF6wv47WnArKHk5p6cvgCJEb74UTmxztmQDc298L3"


def _service(tmp_path: Path) -> tuple[PairingService, _Offences]:
    net = _Offences()
    return PairingService(OFFERER, TrustStore.in_dir(tmp_path), net), net  # type: ignore[arg-type]


async def _talk(service: PairingService, frames: list[bytes], *, close: bool = True) -> list:
    """Run the handler against a peer that sends `frames`; the messages it answered."""
    ours, theirs = _pipe()
    got = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(service.handle, ours, JOINER)
        for f in frames:
            await theirs.write(f)
        if close:
            await theirs.close()
        decoder = FrameDecoder(PAIR_LIMITS)
        while data := await theirs.read():
            decoder.feed(data)
            while (msg := decoder.next_message()) is not None:
                got.append(msg)
    return got


async def test_handler_answers_junk_with_an_error_and_an_offence(tmp_path):
    service, net = _service(tmp_path)
    made = service.create_offer()
    for frames, kind in (
        ([b"\x05garbage"], "protocol"),
        ([encode_frame(PairConfirm(confirm=b"\x00" * 32))], "protocol"),
        ([encode_frame(PairStart(offer=made.code.offer % 99 + 1, pake=b"\x01" * 33))],
         "pairing"),
    ):
        net.kinds.clear()
        answers = await _talk(service, frames)
        assert len(answers) == 1 and isinstance(answers[0], Error), answers
        assert net.kinds == [kind]
    assert made.state == "open" and made.failed == 0  # none of that was a guess at the code
    assert TrustStore.in_dir(tmp_path).list() == []


async def test_a_junk_pake_message_or_a_silent_joiner_costs_an_attempt(tmp_path, monkeypatch):
    import qvacd.pairing as pairing

    monkeypatch.setattr(pairing, "STEP_TIMEOUT_S", 0.3)
    service, net = _service(tmp_path)
    made = service.create_offer()
    answers = await _talk(service, [encode_frame(PairStart(offer=made.code.offer,
                                                           pake=b"\x07" * 33))])
    assert isinstance(answers[0], Error) and made.failed == 1
    spake = SPAKE2_B(made.code.password, idA=OFFERER.encode(), idB=JOINER.encode())
    start = encode_frame(PairStart(offer=made.code.offer, pake=spake.start()))
    answers = await _talk(service, [start], close=False)  # then never confirms
    assert isinstance(answers[0], PairReply) and made.failed == 2
    assert "pairing" in net.kinds and made.state == "open"
    answers = await _talk(service, [start, encode_frame(PairConfirm(confirm=b"\x00" * 32))])
    assert isinstance(answers[-1], Error) and made.failed == 3 and made.state == "dead"
    assert TrustStore.in_dir(tmp_path).list() == []


async def test_the_right_code_over_the_handler_trusts_the_joiner(tmp_path):
    service, _ = _service(tmp_path)
    made = service.create_offer(roles="consumer,seeder")
    spake = SPAKE2_B(made.code.password, idA=OFFERER.encode(), idB=JOINER.encode())
    pake_b = spake.start()
    ours, theirs = _pipe()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(service.handle, ours, JOINER)
        await theirs.write(encode_frame(PairStart(offer=made.code.offer, pake=pake_b)))
        decoder = FrameDecoder(PAIR_LIMITS)
        decoder.feed(await theirs.read())
        reply = decoder.next_message()
        assert isinstance(reply, PairReply) and reply.roles == ("consumer", "seeder")
        key = spake.finish(reply.pake)
        th = transcript_hash(OFFERER, JOINER, made.code.offer, reply.pake, pake_b, reply.roles)
        assert reply.confirm == confirmation(key, b"A", th)
        await theirs.write(encode_frame(PairConfirm(confirm=confirmation(key, b"B", th))))
        decoder.feed(await theirs.read())
        assert decoder.next_message() == PairDone(roles=("consumer", "seeder"))
    assert made.state == "paired" and made.peer_id == JOINER
    assert {e.peer_id: set(e.roles) for e in TrustStore.in_dir(tmp_path).list()} == {
        JOINER: {"consumer", "seeder"}}


def test_ctrl_c_cancels_the_offer(start_daemon):
    import signal

    d = start_daemon(name="cancel")
    shower = subprocess.Popen([sys.executable, "-m", "qvacd.cli", "pair", "--minutes", "3",
                               *api_arg(d)], cwd=REPO, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    try:
        code = shower.stdout.readline().strip().removeprefix("code: ")
        number = parse_code(code)[0].offer
        assert httpx.get(f"{d.api}/qvac/pair/{number}", timeout=10).json()["state"] == "open"
        time.sleep(0.5)  # into the long poll
        shower.send_signal(signal.SIGINT)
        out, _ = shower.communicate(timeout=30)
    finally:
        if shower.poll() is None:
            shower.kill()
    assert shower.returncode == 130 and "cancelled; the code no longer works" in out
    view = httpx.get(f"{d.api}/qvac/pair/{number}", timeout=10).json()
    assert view["state"] == "cancelled" and "code" not in view


def test_a_mesh_owner_issues_the_joiner_a_certificate(mesh):
    from peers.mesh import MeshStore, parse_certificate

    mesh.add("owner")
    mesh.add("newcomer")
    assert cli("mesh", "init", "--data-dir", str(mesh.nodes["owner"].data_dir)).returncode == 0
    owner = mesh.start("owner")
    newcomer = mesh.start("newcomer", bootstrap=["owner"])
    wait_connected(newcomer, mesh.ids["owner"])
    r = join(newcomer, offer(owner, roles="consumer,provider")["code"])
    assert r.status_code == 200, r.text
    assert trusted(owner) == {mesh.ids["newcomer"]: {"consumer", "provider"}}
    cert_text = MeshStore(newcomer.data_dir, own_peer_id=mesh.ids["newcomer"]).own_certificate
    assert cert_text is not None, newcomer.log()
    cert = parse_certificate(cert_text)
    assert cert.peer_id == mesh.ids["newcomer"] and set(cert.roles) == {"consumer", "provider"}
    assert "joined the mesh of" in newcomer.log()

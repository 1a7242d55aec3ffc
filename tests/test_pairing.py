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
from spake2 import SPAKE2_A, SPAKE2_B

from peers.trust import TrustStore
from qvacd.pairing import (
    MAX_FAILED_ATTEMPTS,
    PairCode,
    PairingError,
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

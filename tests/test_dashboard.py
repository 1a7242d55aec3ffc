"""The dashboard at `/` in a real headless Chromium against real daemons on 127.0.0.1.

Two daemons bootstrapped to each other: a seeder holding the default model (its uploads
rate-limited so a pull takes seconds) and a node without it. The node's page shows
both peer ids, a request it delegated and who served it, and the progress bar of a
pull started from the page's own form moving; the trust buttons change trust.json; a
screenshot is saved and is not blank. With an API token, the page asks for it and every
JSON route answers 401 without it. Bad input to the dashboard's own routes gets one
line that says what to do. The recorder behind the requests table and the chart has a
unit test of its own.

Chromium is driven over the DevTools protocol with a small client on trio-websocket
(DevTools below); nothing else is needed but Debian's `chromium` package.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from peers.identity import load_or_create_identity
from peers.trust import TrustStore
from qvacd.dashboard import ActivityRecorder
from tests.harness import Daemon, Mesh, free_port

MODEL = "gemma3-270m"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--window-size=1400,1100")


def chromium() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.access(path, os.X_OK):
        pytest.skip("needs Debian's chromium (apt-get install -y chromium; .ci/run installs"
                    " it where it can)")
    try:
        import trio_websocket  # noqa: F401
    except ImportError:
        pytest.skip("needs trio-websocket to drive Chromium: pip install -e '.[test]'")
    return path


# ---- a small DevTools-protocol client ----------------------------------------------------


class DevTools:
    """One headless Chromium and a DevTools session with its page."""

    def __init__(self, binary: str, profile: Path) -> None:
        self.profile = profile
        self.proc = subprocess.Popen(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        self.ws: Any = None
        self._ids = 0

    async def connect(self, nursery: trio.Nursery) -> None:
        from trio_websocket import connect_websocket_url

        port_file = self.profile / "DevToolsActivePort"
        with trio.fail_after(30):
            while not port_file.exists() or len(port_file.read_text().splitlines()) < 2:
                assert self.proc.poll() is None, f"chromium exited with {self.proc.returncode}"
                await trio.sleep(0.1)
        port = int(port_file.read_text().splitlines()[0])
        async with httpx.AsyncClient() as c:
            with trio.fail_after(15):
                while True:
                    targets = (await c.get(f"http://127.0.0.1:{port}/json/list")).json()
                    pages = [t for t in targets if t.get("type") == "page"]
                    if pages:
                        break
                    await trio.sleep(0.1)
        self.ws = await connect_websocket_url(nursery, pages[0]["webSocketDebuggerUrl"],
                                              max_message_size=64 << 20)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._ids += 1
        mid = self._ids
        await self.ws.send_message(json.dumps({"id": mid, "method": method, "params": params}))
        with trio.fail_after(30):
            while True:
                msg = json.loads(await self.ws.get_message())
                if msg.get("id") == mid:  # events in between are not ours to read
                    if "error" in msg:
                        raise RuntimeError(f"{method}: {msg['error']}")
                    return msg["result"]

    async def js(self, expression: str) -> Any:
        r = await self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                            awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression[:80]}: {r['exceptionDetails']}")
        return r["result"].get("value")

    async def wait_js(self, expression: str, timeout: float, what: str) -> Any:
        """Until `expression` is truthy in the page; its value."""
        deadline = trio.current_time() + timeout
        while True:
            value = await self.js(expression)
            if value:
                return value
            if trio.current_time() > deadline:
                text = await self.js("document.body.innerText")
                raise AssertionError(f"the page did not show {what} in {timeout}s; it shows:\n"
                                     f"{text[:3000]}")
            await trio.sleep(0.2)

    async def open(self, url: str) -> None:
        await self.call("Page.enable")
        await self.call("Page.navigate", url=url)
        await self.wait_js(f"location.href === {json.dumps(url)} &&"
                           " document.readyState === 'complete'", 30, f"{url} loaded")

    async def screenshot(self, path: Path) -> bytes:
        png = base64.b64decode((await self.call("Page.captureScreenshot", format="png"))["data"])
        path.write_bytes(png)
        return png

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


async def with_page(url: str, body: Any) -> None:
    """Run `body(devtools)` with a fresh Chromium showing `url`."""
    binary = chromium()
    profile = Path(tempfile.mkdtemp(prefix="qvacd-chromium-"))
    dt = DevTools(binary, profile)
    try:
        async with trio.open_nursery() as nursery:
            await dt.connect(nursery)
            try:
                await dt.open(url)
                await body(dt)
            finally:
                await dt.ws.aclose()
    finally:
        dt.close()
        shutil.rmtree(profile, ignore_errors=True)


def assert_not_blank(png: bytes) -> None:
    from io import BytesIO

    from PIL import Image

    img = Image.open(BytesIO(png)).convert("RGB")
    assert img.width >= 800 and img.height >= 600, img.size
    small = img.resize((200, 160))
    colors = small.getcolors(maxcolors=1 << 16) or []
    background = max(colors)[0] if colors else 0
    # A blank (or error) page is one or two colours; the dashboard has text, tables, a chart.
    assert len(colors) >= 24, f"screenshot has only {len(colors)} colours"
    assert background < 0.97 * 200 * 160, "screenshot is almost all one colour"


def add_empty(mesh: Mesh, name: str, *args: str) -> None:
    """A node with no model at all (the harness's Mesh.add gives each the default model)."""
    d = mesh.root / name
    d.mkdir(parents=True)
    mesh.ids[name] = load_or_create_identity(d).peer_id_str
    mesh.ports[name] = free_port()
    mesh.nodes[name] = Daemon(d, "--no-default-model", *args)


def short(peer_id: str) -> str:
    return peer_id[:16] + "…"  # how the page abbreviates a peer id (app.js, short)


# ---- tests -------------------------------------------------------------------------------


@pytest.mark.timeout(240)
async def test_dashboard_shows_mesh_requests_and_a_moving_pull(mesh, tmp_path):
    chromium()
    # 20 MB/s: the 253 MB model takes ~12 s, many polls of the page.
    mesh.add("seeder", "--shard-upload-rate", "20MB")
    add_empty(mesh, "node")
    mesh.trust("seeder", "node", ["consumer", "seeder"])
    mesh.trust("node", "seeder", ["provider"])
    await trio.to_thread.run_sync(mesh.start, "seeder")
    node = await trio.to_thread.run_sync(lambda: mesh.start("node", bootstrap=["seeder"]))
    seeder_id, node_id = mesh.ids["seeder"], mesh.ids["node"]

    async def body(dt: DevTools) -> None:
        # Both peer ids: this node's, and the seeder in the peers table, trusted, with
        # the model in its capacity record.
        await dt.wait_js(f"document.getElementById('node-peer-id').textContent === '{node_id}'",
                         30, "this node's peer id")
        row = f"document.querySelector('#peers-body tr[data-peer-id=\"{seeder_id}\"]')"
        text = await dt.wait_js(f"{row} && {row}.innerText.includes('{MODEL}') && "
                                f"{row}.innerText", 30, "the seeder with its model")
        assert seeder_id in text and "yes" in text and "provider" in text, text

        # A request in flight, delegated to the seeder: a row 'running', served by the
        # seeder; the client going away makes it 'cancelled'.
        running = ("(t => t.includes('running') && t.includes('{}') && t)"
                   "(document.getElementById('requests-body').innerText)").format(short(seeder_id))
        async with httpx.AsyncClient(timeout=120) as c:
            async with c.stream("POST", node.api + "/v1/completions", json={
                    "model": MODEL, "prompt": "Tell me a story", "max_tokens": 400,
                    "stream": True}) as stream:
                assert stream.status_code == 200
                lines = stream.aiter_lines()  # kept: a dropped iterator closes the stream
                await lines.__anext__()  # the first chunk is here
                await dt.wait_js(running, 15, "the request in flight")
        await dt.wait_js("document.getElementById('requests-body').innerText"
                         ".includes('cancelled')", 15, "the request cancelled by its client")

        # A request this node cannot serve goes to the seeder: the table names who served it.
        r = await trio.to_thread.run_sync(lambda: httpx.post(
            node.api + "/v1/completions", timeout=120, json={
                "model": MODEL, "prompt": "The capital of France is", "max_tokens": 16,
                "temperature": 0}))
        assert r.status_code == 200 and r.headers["x-qvac-served-by"] == seeder_id, r.text
        tokens = r.json()["usage"]["completion_tokens"]
        req_text = await dt.wait_js(
            f"(t => t.includes('{short(seeder_id)}') && t.includes('done') && t)"
            "(document.getElementById('requests-body').innerText)", 10, "the delegated request")
        assert "done" in req_text and "/v1/completions" in req_text and str(tokens) in req_text
        # The chart's line of delivered tokens rose above its baseline.
        await dt.wait_js("(() => { const p = document.querySelector('#chart polyline.delivered');"
                         " if (!p) return false; const ys = p.getAttribute('points').split(' ')"
                         ".filter(Boolean).map(s => +s.split(',')[1]);"
                         " return ys.length > 1 && Math.min(...ys) < Math.max(...ys); })()",
                         10, "the tokens/s chart with the request in it")

        # A pull started from the page's form: its progress bar moves, then it is done.
        await dt.js(f"document.getElementById('pull-model').value = '{MODEL}';"
                    " document.getElementById('pull-form').requestSubmit(); true")
        seen: list[float] = []
        deadline = trio.current_time() + 120
        while trio.current_time() < deadline:
            v = await dt.js("(b => b ? [b.value, b.max] : null)"
                            "(document.querySelector('#pulls-list progress'))")
            if v and v[1] > 1 and (not seen or v[0] != seen[-1]):
                seen.append(v[0])
                if len([x for x in seen if x > 0]) == 2:  # the bar part-way, in a picture
                    assert_not_blank(await dt.screenshot(tmp_path / "dashboard-pull.png"))
            if await dt.js("document.getElementById('pull-result').textContent"
                           ".startsWith('pulled')"):
                break
            await trio.sleep(0.2)
        result = await dt.js("document.getElementById('pull-result').textContent")
        assert result.startswith(f"pulled {MODEL}: success"), (result, seen)
        moving = [v for v in seen if v > 0]
        assert len(moving) >= 2 and moving == sorted(moving), seen
        assert moving[0] < moving[-1]
        st = await trio.to_thread.run_sync(node.status)
        assert [m["name"] for m in st["models"]] == [MODEL]

        # Untrust and trust from the page's buttons: the daemon's trust.json follows.
        trust = TrustStore.in_dir(node.data_dir)
        await dt.js(f"{row}.querySelector('button').click(); true")
        await dt.wait_js(f"{row} && {row}.innerText.includes('Trust') && "
                         f"!{row}.innerText.includes('Untrust')", 10, "the seeder untrusted")
        assert trust.get(seeder_id) is None
        await dt.js(f"{row}.querySelector('button').click(); true")
        await dt.wait_js(f"{row} && {row}.innerText.includes('Untrust')", 10,
                         "the seeder trusted again")
        entry = trust.get(seeder_id)
        assert entry is not None and entry.roles == {"consumer", "provider", "seeder"}

        # The pair box is there exactly when the daemon has the pairing routes.
        pair = await trio.to_thread.run_sync(lambda: httpx.get(node.api + "/qvac/pair").status_code)
        assert await dt.js("document.getElementById('pair-box').hidden") == (pair == 404), pair

        png = await dt.screenshot(tmp_path / "dashboard.png")
        assert_not_blank(png)

    await with_page(node.api + "/", body)


@pytest.mark.timeout(180)
async def test_dashboard_pairs_two_devices_with_a_code(mesh):
    chromium()
    for name in ("a", "b"):
        mesh.add(name, "--no-preload")
    a = await trio.to_thread.run_sync(mesh.start, "a")
    b = await trio.to_thread.run_sync(lambda: mesh.start("b", bootstrap=["a"]))
    if httpx.get(a.api + "/qvac/pair", timeout=10).status_code == 404:
        pytest.skip("this daemon has no pairing routes (POST /qvac/pair); the page hides"
                    " its pair box then, which the test above checks")
    a_id, b_id = mesh.ids["a"], mesh.ids["b"]

    async def on_b(dt: DevTools) -> None:
        # A wrong code typed on b: one line on the page, nothing trusted on either side.
        await dt.wait_js("!document.getElementById('pair-box').hidden", 20, "the pair box")
        await dt.js("document.getElementById('pair-code').value = '1-0000-0000';"
                    " document.getElementById('pair-join-form').requestSubmit(); true")
        msg = await dt.wait_js("(t => t.startsWith('pairing failed') && t)"
                               "(document.getElementById('pair-result').textContent)", 60,
                               "the wrong code refused")
        assert "\n" not in msg and len(msg) < 300, msg
        assert TrustStore.in_dir(b.data_dir).get(a_id) is None
        assert TrustStore.in_dir(a.data_dir).get(b_id) is None

    await with_page(b.api + "/", on_b)

    async def on_a(dt: DevTools) -> None:
        await dt.wait_js("!document.getElementById('pair-box').hidden", 20, "the pair box")
        await dt.js("document.getElementById('pair-roles').value = 'consumer,provider';"
                    " document.getElementById('pair-show-form').requestSubmit(); true")
        code = await dt.wait_js("(c => c && c.textContent)"
                                "(document.querySelector('#pair-result code'))", 20, "a code")
        assert re.fullmatch(r"\d{1,2}-\d{4}-\d{4}", code), code
        # b types the code (the route the join form posts to); a's page follows the offer.
        r = await trio.to_thread.run_sync(lambda: httpx.post(
            b.api + "/qvac/pair/join", json={"code": code}, timeout=60))
        assert r.status_code == 200, r.text
        await dt.wait_js(f"(t => t.includes('paired') && t.includes('{b_id}'))"
                         "(document.getElementById('pair-result').innerText)", 30,
                         "the offer paired with b")
        row = f"document.querySelector('#peers-body tr[data-peer-id=\"{b_id}\"]')"
        await dt.wait_js(f"{row} && {row}.innerText.includes('yes')", 20, "b trusted")

    await with_page(a.api + "/", on_a)
    entry = TrustStore.in_dir(a.data_dir).get(b_id)
    assert entry is not None and {"consumer", "provider"} <= entry.roles


@pytest.mark.timeout(120)
async def test_dashboard_with_token_asks_for_it_and_routes_refuse_without(start_daemon):
    chromium()
    token = "s3cret-dashboard-token"
    d = await trio.to_thread.run_sync(lambda: start_daemon(
        "--no-preload", env={"QVACD_API_TOKEN": token}))
    auth = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=d.api, timeout=10) as c:
        page = await c.get("/")
        assert page.status_code == 200 and token not in page.text
        assert (await c.get("/dashboard/app.js")).status_code == 200
        for method, path in [("GET", "/qvac/status"), ("GET", "/qvac/peers"),
                             ("GET", "/qvac/activity"), ("GET", "/qvac/pulls"),
                             ("POST", "/qvac/trust"), ("DELETE", "/qvac/trust/x"),
                             ("POST", "/api/pull"), ("POST", "/qvac/pair")]:
            r = await c.request(method, path, json={})
            assert r.status_code == 401, (method, path, r.status_code)
            r = await c.request(method, path, json={}, headers={"Authorization": "Bearer no"})
            assert r.status_code == 401, (method, path, r.status_code)
        peer_id = (await c.get("/qvac/status", headers=auth)).json()["peer_id"]

    async def body(dt: DevTools) -> None:
        await dt.wait_js("!document.getElementById('token-box').hidden", 20, "the token prompt")
        assert await dt.js("document.getElementById('main').hidden")
        assert peer_id not in await dt.js("document.body.innerText")
        # A wrong token: asked again. The right one: the node appears.
        await dt.js("document.getElementById('token-input').value = 'wrong';"
                    " document.getElementById('token-form').requestSubmit(); true")
        await dt.wait_js("document.getElementById('conn').textContent.includes('token was"
                         " refused') && !sessionStorage.getItem('qvacd.api_token')", 10,
                         "the token asked again after a wrong one")
        assert await dt.js("document.getElementById('main').hidden")
        await dt.js(f"document.getElementById('token-input').value = '{token}';"
                    " document.getElementById('token-form').requestSubmit(); true")
        await dt.wait_js(f"document.getElementById('node-peer-id').textContent === '{peer_id}'"
                         " && document.getElementById('token-box').hidden", 20,
                         "this node once the token was given")

    await with_page(d.api + "/", body)


def test_dashboard_routes_refuse_bad_input_in_one_line(start_daemon):
    d = start_daemon("--no-preload")
    own = d.status()["peer_id"]
    other = load_or_create_identity(d.data_dir.parent / "other").peer_id_str
    trust_file = d.data_dir / "trust.json"

    def post(body: Any, **kw: Any) -> httpx.Response:
        return httpx.post(d.api + "/qvac/trust", json=body, timeout=10, **kw)

    cases = [
        (post({"roles": ["consumer"]}), 400, "'peer_id' is required"),
        (post({"peer_id": "12D3KooWnope", "roles": ["consumer"]}), 400, "not a valid peer id"),
        (post({"peer_id": other}), 400, "'roles' must be"),
        (post({"peer_id": other, "roles": ["admin"]}), 400, "unknown role 'admin'"),
        (post({"peer_id": other, "roles": []}), 400, "no roles given"),
        (post({"peer_id": own, "roles": ["consumer"]}), 400, "own peer id"),
        (post({"peer_id": other, "roles": ["consumer"], "note": "x" * 201}), 400, "200"),
        (post([1]), 400, "JSON object"),
        (httpx.post(d.api + "/qvac/trust", content=b'{"peer_id": "x"}', timeout=10,
                    headers={"Content-Type": "text/plain"}), 403, "Content-Type: application/json"),
        (post({"peer_id": other, "roles": ["consumer"]}, headers={"Origin": "http://evil.test"}),
         403, "cross-origin"),
        (post({"peer_id": other, "roles": ["consumer"]}, headers={"Host": "evil.test"}),
         403, "not a loopback name"),
        (httpx.delete(f"{d.api}/qvac/trust/{other}", timeout=10), 404, "not in the trust file"),
        (httpx.delete(f"{d.api}/qvac/trust/nope", timeout=10), 400, "not a valid peer id"),
    ]
    for r, status, words in cases:
        msg = r.json()["error"]
        assert r.status_code == status and words in msg and "\n" not in msg, (r.status_code, msg)
    assert not trust_file.exists() or TrustStore(trust_file).list() == []  # nothing trusted

    # The good path, and removing a role the peer does not have.
    r = post({"peer_id": other, "roles": ["consumer", "seeder"], "note": "laptop"})
    assert r.status_code == 200 and r.json()["roles"] == ["consumer", "seeder"], r.text
    r = httpx.delete(f"{d.api}/qvac/trust/{other}?roles=provider", timeout=10)
    assert r.status_code == 400 and "does not have role(s) provider" in r.json()["error"]
    r = httpx.delete(f"{d.api}/qvac/trust/{other}?roles=seeder", timeout=10)
    assert r.status_code == 200 and r.json() == {"peer_id": other, "roles": ["consumer"],
                                                 "removed": False}
    entry = TrustStore(trust_file).get(other)
    assert entry is not None and entry.roles == {"consumer"} and entry.note == "laptop"
    pulls = httpx.get(d.api + "/qvac/pulls", timeout=10).json()
    assert pulls == {"pulls": [], "available": True}


async def test_recorder_counts_requests_and_samples_once_a_second(autojump_clock):
    rec = ActivityRecorder(recent=2, history_s=3)
    a = rec.begin("/v1/completions", "m", stream=True)
    rec.routed(a, ["peer-a"], "remote")
    assert [r["id"] for r in rec.snapshot()["in_flight"]] == [a.id]
    for _ in range(5):
        rec.token(a)
    a.first_token -= 2.0  # as if the first token came 2 s ago
    rec.end(a, 200, completed=True, completion_tokens=5)
    snap = rec.snapshot()
    assert snap["in_flight"] == []
    done = snap["recent"][0]
    assert done["outcome"] == "done" and done["served_by"] == ["peer-a"] and done["tokens"] == 5
    assert 1.9 < done["tokens_per_s"] <= 2.0  # 4 tokens after the first in ~2 s
    b = rec.begin("/api/chat", "m", stream=True)
    rec.token(b)
    rec.end(b, 200, completed=False)  # the client went away
    c = rec.begin("/api/chat", "m", stream=False)
    rec.end(c, 404, completed=False, error="model 'm' not found")
    snap = rec.snapshot()
    assert [(r["id"], r["outcome"]) for r in snap["recent"]] == [(c.id, "error"),
                                                               (b.id, "cancelled")]
    assert snap["recent"][0]["error"] == "model 'm' not found"

    # The sampler on trio's autojump clock (spans of exactly 0.1 s); it stops after 4 samples.
    calls: list[int] = []
    with trio.CancelScope() as scope:

        def engine_tokens_per_s() -> float:
            calls.append(1)
            if len(calls) == 1:
                for _ in range(3):  # delivered during the second interval
                    rec.token(d)
            if len(calls) == 4:
                scope.cancel()
            return float(len(calls))

        d = rec.begin("/v1/completions", "m", stream=False)
        async with trio.open_nursery() as n:
            await n.start(functools.partial(rec.run, engine_tokens_per_s, interval_s=0.1))
    points = rec.snapshot()["history"]["points"]
    assert len(points) == 3  # the ring buffer keeps the last history_s samples
    assert [p[2] for p in points] == [2.0, 3.0, 4.0]
    assert [p[1] for p in points] == [30.0, 0.0, 0.0]  # 3 tokens in 0.1 s
    assert all(y[0] >= x[0] for x, y in zip(points, points[1:]))

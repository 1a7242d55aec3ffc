// qvacd dashboard: polls the daemon's JSON once a second and draws it; no framework,
// nothing fetched from anywhere but this daemon. Text goes in with textContent only
// (peer ids, model names and errors come from the network).
"use strict";

const POLL_MS = 1000;
const TOKEN_KEY = "qvacd.api_token";
const $ = (id) => document.getElementById(id);
let pairKnown = false; // whether we asked once if the pairing routes exist
let ownPeerId = null;

// ---- talking to the daemon -------------------------------------------------------------

function headers(extra) {
  const h = Object.assign({}, extra || {});
  const tok = sessionStorage.getItem(TOKEN_KEY);
  if (tok) h["Authorization"] = "Bearer " + tok;
  return h;
}

class Unauthorized extends Error {}

async function call(method, path, body) {
  const init = { method, headers: headers(body !== undefined ? { "Content-Type": "application/json" } : {}) };
  if (body !== undefined) init.body = JSON.stringify(body);
  const r = await fetch(path, init);
  if (r.status === 401) throw new Unauthorized("the API token is missing or wrong");
  return r;
}

async function getJSON(path) {
  const r = await call("GET", path);
  if (!r.ok) throw new Error(path + ": HTTP " + r.status);
  return r.json();
}

function errorText(data, status) {
  // The API answers {"error": "..."} or, OpenAI-style, {"error": {"message": "..."}}.
  const e = data && data.error;
  if (typeof e === "string") return e;
  if (e && typeof e.message === "string") return e.message;
  if (data && typeof data.detail === "string") return data.detail;
  return "HTTP " + status;
}

async function action(method, path, body) {
  const r = await call(method, path, body);
  let data = null;
  try { data = await r.json(); } catch (_) { /* no JSON body */ }
  if (!r.ok) throw new Error(errorText(data, r.status));
  return data;
}

// ---- small DOM helpers -----------------------------------------------------------------

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const c of cells) {
    const td = document.createElement("td");
    if (c instanceof Node) td.appendChild(c); else td.textContent = c === null || c === undefined ? "-" : String(c);
    tr.appendChild(td);
  }
  return tr;
}

function bytes(n) {
  if (typeof n !== "number") return "-";
  const u = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < u.length - 1) { n /= 1000; i++; }
  return n.toFixed(i ? 1 : 0) + " " + u[i];
}

function num(v, digits) {
  return typeof v === "number" ? v.toFixed(digits === undefined ? 1 : digits) : "-";
}

function short(id) { return typeof id === "string" && id.length > 20 ? id.slice(0, 16) + "…" : id; }

function showError(msg) {
  const e = $("error");
  e.hidden = !msg;
  e.textContent = msg || "";
}

// ---- this node -------------------------------------------------------------------------

function drawNode(st) {
  ownPeerId = st.peer_id;
  $("node-peer-id").textContent = st.peer_id;
  $("node-version").textContent = st.version + ", up " + Math.round(st.uptime_s) + " s, API " + st.api;
  const d = st.device;
  $("node-device").textContent = d ? d.kind + " " + d.name + " (" + bytes(d.memory_free) + " free of " + bytes(d.memory_total) + ")" : "- (no P2P side)";
  $("node-budget").textContent = bytes(st.memory_budget) + " (" + bytes(st.memory_used) + " in use)";
  $("node-slots").textContent = st.slots_free + " free of " + st.slots_total + ", queue " + st.queue + "/" + st.queue_limit;
  $("node-tps").textContent = num(st.aggregate_tokens_per_s) + " (all sequences, last 10 s)";
  $("node-models").textContent = (st.models || []).map((m) =>
    m.name + (m.loaded ? " (loaded)" : "") + (m.fits_budget ? "" : " (over budget)") +
    (m.tokens_per_s ? " " + num(m.tokens_per_s) + " tok/s" : "")).join(", ") || "none";
  const net = st.network || {};
  $("node-reach").textContent = net.reachability || "-";
  const res = (net.reservations || []).map((r) => short(r.relay) + " " + r.state);
  $("node-relays").textContent = res.length ? res.join(", ") + ((net.relayed_addrs || []).length ? "; relayed addresses: " + net.relayed_addrs.length : "") : "none";
  $("node-addrs").textContent = (st.listen_addrs || []).join("  ");
}

// ---- peers -----------------------------------------------------------------------------

function banOf(st, peerId) {
  const b = ((st.banned || {}).peers || []).find((x) => x.peer_id === peerId);
  return b ? "banned " + Math.round(b.remaining_s) + " s" : "";
}

function drawPeers(peers, st) {
  const body = $("peers-body");
  body.replaceChildren();
  const from = $("pull-from");
  // Rebuilt only when the peers change, so an open drop-down is not closed every second.
  const key = peers.map((p) => p.peer_id).join(" ");
  const rebuild = from.dataset.key !== key;
  const chosen = from.value;
  if (rebuild) {
    from.dataset.key = key;
    from.replaceChildren(el("option", "from any trusted peer"));
    from.firstChild.value = "";
  }
  for (const p of peers) {
    const cap = p.capacity || {};
    const here = (p.paths || {})[p.path || ""] || {};
    const rtt = here.rtt_ms !== undefined && here.rtt_ms !== null ? here.rtt_ms : p.rtt_ms;
    const tps = Object.values(cap.tokens_per_s || {});
    const idCell = el("code", p.peer_id);
    idCell.title = (p.addrs || []).join("\n");
    const trusted = el("span", p.trusted ? "yes" : "no", p.trusted ? "yes" : "no");
    const btn = el("button", p.trusted ? "Untrust" : "Trust", p.trusted ? "secondary" : "");
    btn.addEventListener("click", () => (p.trusted ? untrust(p.peer_id) : trust(p.peer_id, ["consumer", "provider", "seeder"])));
    const ban = banOf(st, p.peer_id);
    const tr = row([idCell, trusted, (p.roles || []).join(",") || "-",
      (p.path || "-") + (p.relay ? " via " + short(p.relay) : ""),
      num(rtt), tps.length ? num(Math.max(...tps)) : (here.tokens_per_s ? num(here.tokens_per_s) : "-"),
      (cap.models || []).map((m) => m.name + (m.loaded ? "*" : "")).join(", ") || "-",
      cap.slots_total !== undefined ? cap.slots_free + "/" + cap.slots_total : "-",
      (p.served || 0) + " / " + (p.failed || 0) + (p.failures ? " (" + p.failures + " in a row)" : ""),
      ban ? el("span", ban, "banned") : "-", btn]);
    tr.dataset.peerId = p.peer_id;
    body.appendChild(tr);
    if (rebuild) {
      const o = el("option", "from " + short(p.peer_id));
      o.value = p.peer_id;
      from.appendChild(o);
    }
  }
  if (rebuild) from.value = [...from.options].some((o) => o.value === chosen) ? chosen : "";
  if (!peers.length) body.appendChild(row(["no peers yet", "", "", "", "", "", "", "", "", "", ""]));
}

async function trust(peerId, roles) {
  try {
    await action("POST", "/qvac/trust", { peer_id: peerId, roles });
    showError("");
  } catch (e) { showError("trust: " + e.message); }
  refresh();
}

async function untrust(peerId) {
  try {
    await action("DELETE", "/qvac/trust/" + encodeURIComponent(peerId));
    showError("");
  } catch (e) { showError("untrust: " + e.message); }
  refresh();
}

// ---- pulls -----------------------------------------------------------------------------

function drawPulls(pulls) {
  const list = $("pulls-list");
  list.replaceChildren();
  for (const p of pulls) {
    const li = el("li");
    li.dataset.target = p.target;
    const pct = p.total ? (100 * p.completed / p.total) : 0;
    li.appendChild(el("div", (p.target || "?") + ": " + p.status +
      (p.total ? " " + bytes(p.completed) + " of " + bytes(p.total) + " (" + pct.toFixed(1) + "%), " +
        bytes(p.rate) + "/s from " + p.sources + " peer(s)" : "")));
    const bar = el("progress");
    bar.max = p.total || 1;
    bar.value = p.completed || 0;
    li.appendChild(bar);
    list.appendChild(li);
  }
  if (!pulls.length) list.appendChild(el("li", "no pull in progress", "muted"));
}

async function startPull(model, from) {
  // The pull lasts while someone reads its stream (as with `qvacd models pull`): read it
  // to the end here; the list above shows progress from /qvac/pulls.
  const out = $("pull-result");
  out.textContent = "pulling " + model + "…";
  try {
    const body = { model, stream: true };
    if (from) body.from = from;
    const r = await call("POST", "/api/pull", body);
    if (!r.ok) {
      let data = null;
      try { data = await r.json(); } catch (_) { /* not JSON */ }
      throw new Error(errorText(data, r.status));
    }
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "", last = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, i).trim();
        buf = buf.slice(i + 1);
        if (line) last = JSON.parse(line);
      }
    }
    if (last && last.error) throw new Error(last.error);
    out.textContent = "pulled " + model + (last && last.status ? ": " + last.status : "");
  } catch (e) {
    out.textContent = "pull of " + model + " failed: " + e.message;
  }
  refresh();
}

// ---- requests and the chart ------------------------------------------------------------

function drawRequests(act) {
  const body = $("requests-body");
  body.replaceChildren();
  const all = [...act.in_flight, ...act.recent];
  for (const r of all) {
    const by = (r.served_by || []).map((p) => (p === ownPeerId ? "this node" : short(p))).join(" → ");
    const tr = row([r.id, r.outcome + (r.error ? ": " + r.error : ""), r.model, r.endpoint,
      by || "-", r.tokens, num(r.tokens_per_s), num(r.elapsed_s)]);
    tr.className = r.outcome;
    body.appendChild(tr);
  }
  if (!all.length) body.appendChild(row(["", "no requests yet", "", "", "", "", "", ""]));
  drawChart(act.history.points);
}

function drawChart(points) {
  const svg = $("chart");
  const NS = "http://www.w3.org/2000/svg";
  const W = 600, H = 160, PAD = 18, SPAN = 300;
  svg.replaceChildren();
  const now = points.length ? points[points.length - 1][0] : Date.now() / 1000;
  let max = 1;
  for (const p of points) max = Math.max(max, p[1], p[2]);
  max = Math.ceil(max * 1.1);
  const x = (t) => W - (now - t) / SPAN * W;
  const y = (v) => H - PAD - v / max * (H - 2 * PAD);
  for (const v of [0, max / 2, max]) {
    const line = document.createElementNS(NS, "line");
    line.setAttribute("x1", 0); line.setAttribute("x2", W);
    line.setAttribute("y1", y(v)); line.setAttribute("y2", y(v));
    line.setAttribute("class", "grid");
    svg.appendChild(line);
    const t = document.createElementNS(NS, "text");
    t.setAttribute("x", 2); t.setAttribute("y", y(v) - 2);
    t.textContent = v.toFixed(0) + " tok/s";
    svg.appendChild(t);
  }
  for (const [i, cls] of [[2, "engine"], [1, "delivered"]]) {
    const pl = document.createElementNS(NS, "polyline");
    pl.setAttribute("class", cls);
    pl.setAttribute("points", points.filter((p) => now - p[0] <= SPAN)
      .map((p) => x(p[0]).toFixed(1) + "," + y(p[i]).toFixed(1)).join(" "));
    svg.appendChild(pl);
  }
}

// ---- pairing (where the daemon has the routes) -----------------------------------------

async function probePairing() {
  // GET on a POST-only route answers 405 where it exists and 404 where it does not;
  // asking this way starts no pairing.
  try {
    const r = await call("GET", "/qvac/pair");
    $("pair-box").hidden = r.status === 404;
    pairKnown = true;
  } catch (e) {
    if (e instanceof Unauthorized) throw e;
  }
}

function showPairAnswer(data) {
  const out = $("pair-result");
  out.replaceChildren();
  if (data && data.code) {
    out.appendChild(el("span", "code: "));
    out.appendChild(el("code", data.code));
  }
  for (const k of ["state", "link", "message", "peer_id", "roles", "expires_in_s", "failed_attempts", "last_failure"]) {
    if (data && data[k] !== undefined && data[k] !== null) {
      out.appendChild(el("div", k.replace(/_/g, " ") + ": " + (Array.isArray(data[k]) ? data[k].join(",") : data[k]), "small"));
    }
  }
}

async function pair(path, body) {
  const out = $("pair-result");
  out.textContent = path.endsWith("join") ? "joining…" : "asking for a code…";
  try {
    const r = await call("POST", path, body);
    let data = null;
    try { data = await r.json(); } catch (_) { /* not JSON */ }
    if (r.status === 404 && !(data && data.error)) {
      // The router's own 404 (no JSON error): this daemon has no pairing routes. A 404
      // with an error is the pairing's answer (e.g. no such offer for that code).
      $("pair-box").hidden = true;
      showError("this daemon has no pairing routes");
      return;
    }
    if (!r.ok) throw new Error(errorText(data, r.status));
    showPairAnswer(data);
    if (data && data.offer !== undefined && data.state === "open") await followOffer(data.offer);
  } catch (e) {
    out.textContent = "pairing failed: " + e.message;
  }
}

async function followOffer(offer) {
  // The offer's state (open, paired, expired...) as it changes; each wait is bounded
  // by the daemon (<= 30 s), and the offer itself expires in minutes.
  for (let i = 0; i < 100; i++) {
    const r = await call("GET", "/qvac/pair/" + encodeURIComponent(offer) + "?wait=25");
    if (!r.ok) return;
    const view = await r.json();
    showPairAnswer(view);
    if (view.state !== "open") { refresh(); return; }
  }
}

// ---- the loop --------------------------------------------------------------------------

function askForToken(why) {
  $("main").hidden = true;
  $("token-box").hidden = false;
  $("conn").textContent = why;
}

async function refresh() {
  try {
    const [st, peers, act, pulls] = await Promise.all([
      getJSON("/qvac/status"), getJSON("/qvac/peers"), getJSON("/qvac/activity"), getJSON("/qvac/pulls")]);
    $("token-box").hidden = true;
    $("main").hidden = false;
    drawNode(st);
    drawPeers(peers.peers, st);
    drawRequests(act);
    drawPulls(pulls.pulls);
    if (!pairKnown) await probePairing();
    $("conn").textContent = "live, updated " + new Date().toLocaleTimeString();
    document.body.dataset.ready = "1";
  } catch (e) {
    if (e instanceof Unauthorized) {
      const had = sessionStorage.getItem(TOKEN_KEY);
      sessionStorage.removeItem(TOKEN_KEY);
      askForToken(had ? "that API token was refused; enter it again" : "this daemon needs its API token");
    } else {
      $("conn").textContent = "cannot reach the daemon: " + e.message + " (retrying)";
    }
  }
}

async function loop() {
  for (;;) {
    await refresh();
    await new Promise((r) => setTimeout(r, POLL_MS));
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token-input").value.trim());
    $("token-input").value = "";
    refresh();
  });
  $("trust-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const roles = [...document.querySelectorAll("#trust-form input[name=role]:checked")].map((i) => i.value);
    trust($("trust-peer").value.trim(), roles);
  });
  $("pull-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    startPull($("pull-model").value.trim(), $("pull-from").value);
  });
  $("pair-show-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const roles = $("pair-roles").value.split(/[\s,]+/).filter(Boolean);
    pair("/qvac/pair", { roles, minutes: Number($("pair-minutes").value) || 5 });
  });
  $("pair-join-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    pair("/qvac/pair/join", { code: $("pair-code").value.trim() });
  });
  loop();
});

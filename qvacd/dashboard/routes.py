"""The dashboard's HTTP routes: the page at `/`, its two static files, and the JSON and
actions it needs that the rest of the API lacks.

    GET  /                       the page (static HTML, no data, no secret in it)
    GET  /dashboard/app.js|.css  its script and style
    GET  /qvac/activity          requests in flight and recent, tokens/s history
    GET  /qvac/pulls             model pulls in progress (the puller's downloads)
    POST /qvac/trust             {"peer_id", "roles": [...], "note"?}: trust a peer
    DELETE /qvac/trust/{peer}    [?roles=a,b]: untrust it (those roles, or all)

The page and its static files are the only routes the token guard lets through
without the token (PUBLIC_PATHS): they hold no data, and the page must load to ask
for the token; everything it then fetches needs it. Trust changes call the same
TrustStore methods as `qvacd trust add/rm`, on the daemon's own store, which writes
trust.json under its file lock, so the CLI and the page never lose each other's edit.

Actions refuse cross-site requests: a JSON content type is required (a browser
cannot send one cross-origin without a CORS preflight, which this API never grants),
an Origin header must match the Host, and without a token the Host must be a
loopback name (a DNS-rebinding page would otherwise be "same origin").
"""

from __future__ import annotations

import ipaddress
import json
from importlib import resources
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

if TYPE_CHECKING:
    from qvacd.served_node import ServedNode

STATIC = {  # URL path -> (file in this package's static/, media type)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/dashboard/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/dashboard/app.css": ("app.css", "text/css; charset=utf-8"),
}
PUBLIC_PATHS = frozenset(STATIC)
_HEADERS = {
    # The page runs only its own script and talks only to this daemon.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self';"
                               " connect-src 'self'; img-src 'self' data:;"
                               " frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
    "Referrer-Policy": "no-referrer",
}
MAX_BODY = 64 * 1024


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _static_bytes(name: str) -> bytes:
    return resources.files("qvacd.dashboard").joinpath("static", name).read_bytes()


def _is_loopback_host(host: str) -> bool:
    hostname = host if host.endswith("]") else host.rsplit(":", 1)[0]
    if hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname.strip("[]")).is_loopback
    except ValueError:
        return False


def _cross_site(request: Request, token_set: bool, *, json_body: bool = True) -> str | None:
    """Why this state-changing request looks cross-site, or None if it is the page's."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if json_body and ctype != "application/json":
        return "send the body as JSON with 'Content-Type: application/json'"
    host = request.headers.get("host", "")
    origin = request.headers.get("origin")
    if origin is not None and origin not in (f"http://{host}", f"https://{host}"):
        return f"cross-origin request from {origin[:100]} refused; use the dashboard at" \
               f" http://{host}/"
    if not token_set and not _is_loopback_host(host):
        return f"Host {host[:100]!r} is not a loopback name; open the dashboard at" \
               " http://127.0.0.1:<port>/ (or set --api-token)"
    return None


async def _json_body(request: Request) -> dict[str, Any] | JSONResponse:
    body = await request.body()
    if len(body) > MAX_BODY:
        return _error(413, f"request body over {MAX_BODY} bytes")
    try:
        data = json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError) as e:
        return _error(400, f"request body is not valid JSON ({e})")
    if not isinstance(data, dict):
        return _error(400, "request body must be a JSON object")
    return data


def dashboard_routes(node: ServedNode) -> list[Route]:
    from peers.trust import ROLES, TrustError, parse_peer_id, parse_roles

    token_set = bool(node.config.api_token)
    cache: dict[str, bytes] = {}

    async def static(request: Request) -> Response:
        name, media = STATIC[request.url.path]
        if name not in cache:  # read once: the files ship inside the package
            cache[name] = _static_bytes(name)
        return Response(cache[name], media_type=media, headers=_HEADERS)

    async def activity(request: Request) -> Response:
        return JSONResponse(node.recorder.snapshot())

    async def pulls(request: Request) -> Response:
        puller = node.puller
        return JSONResponse({"pulls": puller.active() if puller is not None else [],
                             "available": puller is not None})

    async def trust_add(request: Request) -> Response:
        if (why := _cross_site(request, token_set)) is not None:
            return _error(403, why)
        body = await _json_body(request)
        if isinstance(body, JSONResponse):
            return body
        peer, roles, note = body.get("peer_id"), body.get("roles"), body.get("note")
        if not isinstance(peer, str) or not peer.strip():
            return _error(400, "'peer_id' is required: the peer id to trust (12D3KooW...)")
        if not isinstance(roles, (list, str)) or isinstance(roles, list) and \
                not all(isinstance(r, str) for r in roles):
            return _error(400, f"'roles' must be a list of roles from {', '.join(ROLES)}")
        if note is not None and (not isinstance(note, str) or len(note) > 200):
            return _error(400, "'note' must be a string of up to 200 characters")
        try:
            pid = parse_peer_id(peer.strip())
            parse_roles(roles)
        except ValueError as e:
            return _error(400, str(e))
        if pid == node.node_id:
            return _error(400, f"{pid} is this node's own peer id; trust the other device's id")
        try:
            before = node.trust.get(pid)
            entry = node.trust.add(pid, roles, note=note)
        except TrustError as e:  # the trust file itself is unusable: it says how to fix it
            return _error(500, str(e))
        return JSONResponse({"peer_id": pid, "roles": sorted(entry.roles), "note": entry.note,
                             "updated": before is not None})

    async def trust_remove(request: Request) -> Response:
        # A DELETE needs a CORS preflight cross-origin anyway; Origin and Host still count.
        if (why := _cross_site(request, token_set, json_body=False)) is not None:
            return _error(403, why)
        peer = request.path_params["peer_id"]
        roles_q = request.query_params.get("roles")
        try:
            pid = parse_peer_id(peer)
            drop = parse_roles(roles_q) if roles_q else None
        except ValueError as e:
            return _error(400, str(e))
        try:
            before = node.trust.get(pid)
            if before is None:
                return _error(404, f"{pid} is not in the trust file {node.trust.path}; peers"
                              " admitted by a mesh certificate are removed with"
                              " `qvacd mesh revoke`")
            if drop is not None and not drop & before.roles:
                return _error(400, f"{pid} does not have role(s) {','.join(sorted(drop))};"
                              f" it has {','.join(sorted(before.roles))}")
            node.trust.remove(pid, drop)
            after = node.trust.get(pid)
        except TrustError as e:
            return _error(500, str(e))
        return JSONResponse({"peer_id": pid, "roles": sorted(after.roles) if after else [],
                             "removed": after is None})

    return [
        *[Route(path, static, methods=["GET", "HEAD"]) for path in STATIC],
        Route("/qvac/activity", activity, methods=["GET"]),
        Route("/qvac/pulls", pulls, methods=["GET"]),
        Route("/qvac/trust", trust_add, methods=["POST"]),
        Route("/qvac/trust/{peer_id}", trust_remove, methods=["DELETE"]),
    ]


__all__ = ["PUBLIC_PATHS", "dashboard_routes"]

"""HTTP routes for pairing (qvacd/pairing.py), used by `qvacd pair` and the dashboard.

    POST   /qvac/pair          {roles?, minutes?} -> an open offer: {offer, code, link, ...}
    GET    /qvac/pair          every offer here (codes only of open ones) and the counts
    GET    /qvac/pair/{offer}  one offer; ?wait=S holds the answer until it changes (<= 30 s)
    DELETE /qvac/pair/{offer}  cancel an open offer
    POST   /qvac/pair/join     {code} (a code or a link) -> {peer_id, roles}

A failed pairing answers with {"error": {"message": <one line>, "type": <kind>}} and a
status per kind (403 wrong code, 404 no such offer, 410 expired or used, 429 busy, 502
unreachable, 400 bad input). They sit behind the same bearer-token check as every
route (api.py wraps the whole app); they never import the CLI.
"""

from __future__ import annotations

from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .pairing import DEFAULT_MINUTES, Offer, PairingError

_STATUS = {"wrong_code": 403, "not_found": 404, "expired": 410, "used": 410, "dead": 410,
           "busy": 429, "unreachable": 502, "bad_input": 400, "failed": 502}
MAX_BODY = 16 * 1024
MAX_WAIT_S = 30.0


class Pairing(Protocol):
    """What the routes need of qvacd.pairing.PairingService."""

    offers: dict[int, Offer]

    def create_offer(self, roles: Any = None, minutes: float = DEFAULT_MINUTES) -> Offer: ...
    def cancel_offer(self, number: int) -> Offer | None: ...
    def view(self, offer: Offer) -> dict[str, Any]: ...
    def status(self) -> dict[str, Any]: ...
    async def wait_change(self, offer: Offer, timeout: float) -> None: ...
    async def join(self, text: str) -> dict[str, Any]: ...


class PairingNode(Protocol):
    @property
    def pairing(self) -> Pairing | None: ...


def _error(status: int, message: str, kind: str = "bad_input") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


def _failure(e: PairingError) -> JSONResponse:
    return _error(_STATUS.get(e.kind, 400), e.message, e.kind)


async def _body(request: Request) -> dict[str, Any] | JSONResponse:
    import json

    raw = await request.body()
    if len(raw) > MAX_BODY:
        return _error(413, f"request body over {MAX_BODY} bytes")
    try:
        data = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError):
        return _error(400, "request body is not valid JSON")
    if not isinstance(data, dict):
        return _error(400, "request body must be a JSON object")
    return data


def pair_routes(node: PairingNode) -> list[Route]:
    def service() -> Pairing | JSONResponse:
        if node.pairing is None:
            return _error(503, "pairing needs the P2P side; start qvacd without --no-p2p",
                          "unavailable")
        return node.pairing

    def offer_of(pairing: Pairing, request: Request) -> Offer | JSONResponse:
        raw = request.path_params["offer"]
        offer = pairing.offers.get(int(raw)) if raw.isdigit() and len(raw) < 4 else None
        if offer is None:
            return _error(404, f"no pairing offer {raw[:8]!r} here; `qvacd pair` makes one",
                          "not_found")
        return offer

    async def create(request: Request) -> Response:
        pairing = service()
        if isinstance(pairing, JSONResponse):
            return pairing
        body = await _body(request)
        if isinstance(body, JSONResponse):
            return body
        roles = body.get("roles")
        if roles is not None and not isinstance(roles, (str, list)):
            return _error(400, "'roles' must be a list of roles or a comma-separated string")
        if isinstance(roles, list) and not all(isinstance(r, str) for r in roles):
            return _error(400, "'roles' must hold strings: consumer, provider, seeder")
        minutes = body.get("minutes", DEFAULT_MINUTES)
        if isinstance(minutes, bool) or not isinstance(minutes, (int, float)):
            return _error(400, "'minutes' must be a number")
        try:
            offer = pairing.create_offer(roles, float(minutes))
        except PairingError as e:
            return _failure(e)
        return JSONResponse(pairing.view(offer))

    async def list_offers(request: Request) -> Response:
        pairing = service()
        if isinstance(pairing, JSONResponse):
            return pairing
        return JSONResponse(pairing.status())

    async def show(request: Request) -> Response:
        pairing = service()
        if isinstance(pairing, JSONResponse):
            return pairing
        offer = offer_of(pairing, request)
        if isinstance(offer, JSONResponse):
            return offer
        try:
            wait = min(MAX_WAIT_S, max(0.0, float(request.query_params.get("wait", "0"))))
        except ValueError:
            return _error(400, "'wait' must be a number of seconds")
        seen = (offer.state, offer.failed)
        if wait and offer.state == "open":
            await pairing.wait_change(offer, wait)
        view = pairing.view(offer)
        view["changed"] = (offer.state, offer.failed) != seen
        return JSONResponse(view)

    async def cancel(request: Request) -> Response:
        pairing = service()
        if isinstance(pairing, JSONResponse):
            return pairing
        offer = offer_of(pairing, request)
        if isinstance(offer, JSONResponse):
            return offer
        pairing.cancel_offer(offer.code.offer)
        return JSONResponse(pairing.view(offer))

    async def join(request: Request) -> Response:
        pairing = service()
        if isinstance(pairing, JSONResponse):
            return pairing
        body = await _body(request)
        if isinstance(body, JSONResponse):
            return body
        code = body.get("code")
        if not isinstance(code, str) or not code.strip():
            return _error(400, "'code' is required: the code or link `qvacd pair` shows on"
                          " the other device")
        try:
            return JSONResponse(await pairing.join(code))
        except PairingError as e:
            return _failure(e)

    return [
        Route("/qvac/pair", create, methods=["POST"]),
        Route("/qvac/pair", list_offers, methods=["GET"]),
        Route("/qvac/pair/join", join, methods=["POST"]),
        Route("/qvac/pair/{offer}", show, methods=["GET"]),
        Route("/qvac/pair/{offer}", cancel, methods=["DELETE"]),
    ]

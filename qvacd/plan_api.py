"""`GET /qvac/plan?model=NAME`: how this node would split a model across trusted workers.

The plan is shown before anything loads (`qvacd plan MODEL` prints it): which layers stay
here, which go to which worker, and the memory each part needs. A model that fits no
split is a 503 whose message names every device's free memory and the model's needs;
a model this node does not hold is a 404; a node without the P2P side has no workers (503).
"""

from __future__ import annotations

from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from models.engine import EngineError

_STATUS = {"NOT_FOUND": 404, "UNAVAILABLE": 503, "BAD_REQUEST": 400}


class Planner(Protocol):
    def plan_dict(self, model: str) -> dict[str, Any]: ...


class PlannedNode(Protocol):
    @property
    def split(self) -> Planner | None: ...


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "plan"}}, status_code=status)


def plan_routes(node: PlannedNode) -> list[Route]:
    async def qvac_plan(request: Request) -> Response:
        model = request.query_params.get("model", "")
        if not model:
            return _error(400, "name the model: GET /qvac/plan?model=NAME")
        if node.split is None:
            return _error(503, "this node runs without the P2P side (--no-p2p): no workers"
                          " to split a model across")
        try:
            return JSONResponse(node.split.plan_dict(model))
        except EngineError as e:
            return _error(_STATUS.get(e.code, 503), e.message)

    return [Route("/qvac/plan", qvac_plan, methods=["GET"])]

"""The dashboard at `/`: one static page (static/index.html, app.js, app.css) served by
the daemon as package data, so there is nothing to build or download at run time; the
routes it needs beyond the API (routes.py); and the recorder of this node's requests
and tokens/s that it shows (recorder.py).

The page polls the JSON routes once a second: /qvac/status, /qvac/peers,
/qvac/activity, /qvac/pulls. Its actions are POST /qvac/trust, DELETE /qvac/trust/{id},
POST /api/pull, and the pairing routes (POST /qvac/pair, /qvac/pair/join) where the
daemon has them.
"""

from .recorder import ActivityRecorder, RequestRecord
from .routes import PUBLIC_PATHS, dashboard_routes

__all__ = ["PUBLIC_PATHS", "ActivityRecorder", "RequestRecord", "dashboard_routes"]

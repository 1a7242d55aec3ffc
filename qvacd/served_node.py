"""What the HTTP routes need of the daemon: the seam between qvacd/node.py and every
route module (api.py, models_api.py, embeddings_api.py, dashboard/routes.py).

Its own module so that the route modules and the node meet here, not through each other:
api.py registers the other route modules, so none of them may import api.py for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from models.store import ModelEntry, ModelStore
    from peers.trust import TrustStore

    from .config import Config
    from .dashboard.recorder import ActivityRecorder
    from .local_engine import LocalEngine
    from .metrics import Metrics
    from .pull_api import ModelPuller
    from .remote_embed import RemoteEmbedder
    from .router import Router


class ServedNode(Protocol):
    """What the HTTP API needs of the daemon (qvacd.node.Node)."""

    @property
    def engine(self) -> LocalEngine: ...

    @property
    def store(self) -> ModelStore: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def router(self) -> Router: ...

    @property
    def puller(self) -> ModelPuller | None:
        """None on a node without the P2P side (--no-p2p)."""
        ...

    @property
    def remote_embed(self) -> RemoteEmbedder | None:
        """Embeddings from peers; None on a node without the P2P side (--no-p2p)."""
        ...

    @property
    def config(self) -> Config: ...

    @property
    def recorder(self) -> ActivityRecorder: ...

    @property
    def node_id(self) -> str: ...

    @property
    def trust(self) -> TrustStore: ...

    def available_models(self) -> list[ModelEntry]: ...

    def status(self) -> dict[str, Any]: ...

    def peers_snapshot(self) -> list[dict[str, Any]]: ...

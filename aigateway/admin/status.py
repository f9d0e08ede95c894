# -*- test-case-name: tests.test_admin -*-
"""
C{GET /}, C{GET /status} and C{GET /metrics}: what an operator or a
monitoring system asks of a node.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from klein import Klein
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.web.iweb import IRequest

from .._version import __version__
from ..balancer import registry as algorithms
from .app import endpoint


def register(
    app: Klein,
    node_id: str,
    metrics: CollectorRegistry,
    status: Callable[[], Any],
) -> None:
    """
    Add the node endpoints to C{app}.

    @param status: returns a L{Deferred} or value with the C{/status} body.
    """

    @app.route("/", methods=["GET"])
    @endpoint
    async def root(request: IRequest) -> Any:
        return {
            "tagline": "Welcome to aigateway",
            "version": __version__,
            "node_id": node_id,
            "configuration": {"balancers": list(algorithms.names())},
        }

    @app.route("/status", methods=["GET"])
    @endpoint
    async def node_status(request: IRequest) -> Any:
        return await status()

    @app.route("/metrics", methods=["GET"])
    def prometheus(request: IRequest) -> bytes:
        # prometheus_client's own MetricsResource renders on the thread pool
        # and imports the global reactor; rendering here is a few ms at most.
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(metrics)

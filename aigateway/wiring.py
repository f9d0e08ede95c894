# -*- test-case-name: tests.test_service -*-
"""
Assembling one node from its parts.

Kept apart from L{aigateway.service} so the order of construction (health
before runtime, runtime before the resources that read it) is in one place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from klein import Klein
from prometheus_client import CollectorRegistry
from twisted.internet.defer import Deferred

from .admin import services, status, upstreams
from .admin.app import handle_routing_errors
from .admin.entities import Entities
from .balancer import registry as algorithms
from .health.hook import build_health
from .proxy.resource import ProxyResource
from .runtime import Runtime


def build_balancer(upstream: Any, targets: Any, health: Any) -> Any:
    return algorithms.lookup(upstream.algorithm).build(
        upstream, [t for t in targets if not t.backup], health
    )


@attrs.define
class Parts:
    """
    The pieces of a node that the service starts and stops.
    """

    runtime: Runtime
    entities: Entities
    proxy_resource: Any
    admin_resource: Any
    metrics: CollectorRegistry
    load_declarative: Callable[[str], Deferred[None]]
    stop: Callable[[], None]


def build(reactor: Any, node: Any) -> Parts:
    """
    Build the runtime, proxy resource and Admin API of C{node}.
    """
    settings = node.settings
    metrics = CollectorRegistry(auto_describe=True)
    health = build_health(reactor, metrics)
    runtime = Runtime(health, build_balancer)
    entities = Entities(node.store, runtime, reactor)
    proxy = ProxyResource(
        runtime,
        node.agents,
        reactor,
        latency_headers=settings.latency_headers,
        trust_forwarded_for=settings.trust_forwarded_for,
    )
    app = Klein()
    upstreams.register(app, entities, health, node.node_id)
    services.register(app, entities)

    async def node_status() -> Any:
        reachable = await node.store.ping()
        return {
            "node_id": node.node_id,
            "uptime": reactor.seconds() - node.started_at,
            "configuration_version": runtime.snapshot.version,
            "database": {"reachable": reachable},
        }

    status.register(app, node.node_id, metrics, node_status)
    handle_routing_errors(app)

    def load_declarative(path: str) -> Deferred[None]:
        raise NotImplementedError("declarative configuration is not built yet")

    return Parts(
        runtime=runtime,
        entities=entities,
        proxy_resource=proxy,
        admin_resource=app.resource(),
        metrics=metrics,
        load_declarative=load_declarative,
        stop=health.stop,
    )

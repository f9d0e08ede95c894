# -*- test-case-name: tests.test_admin,tests.test_proxy -*-
"""
Assembling one node from its parts.

Kept apart from L{aigateway.service} so the order of construction (health
before runtime, runtime before the resources that read it) is in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import attrs
from klein import Klein
from prometheus_client import CollectorRegistry
from twisted.internet.defer import TimeoutError

from . import declarative
from .accesslog import AccessLog
from .admin import certificates, services, status, upstreams
from .admin import declarative as config
from .admin.app import handle_routing_errors
from .admin.declarative import apply_document
from .admin.entities import Entities
from .admin.site import FreshResource
from .balancer.backup import build_balancer
from .feed import Outage
from .health.hook import build_health
from .health.manager import Probed
from .inflight import InFlight
from .metrics import Metrics, StateCollector, live
from .proxy.resource import ProxyResource
from .recorder import Recorder
from .runtime import Runtime


@attrs.define
class Parts:
    """
    The pieces of a node that the service starts and stops.
    """

    runtime: Runtime
    entities: Entities
    proxy_resource: Any
    admin_resource: Any
    metrics: Metrics
    outage: Outage
    load_declarative: Callable[[str], Coroutine[Any, Any, None]]
    stop: Callable[[], None]


def build(reactor: Any, node: Any) -> Parts:
    """
    Build the runtime, proxy resource and Admin API of C{node}.
    """
    settings = node.settings
    registry = CollectorRegistry(auto_describe=True)
    metrics = Metrics(registry)
    health = build_health(reactor)
    runtime = Runtime(health, build_balancer)
    entities = Entities(node.store, runtime, reactor)
    # The store's outages, logged once whether the change feed or an admin
    # call meets them.
    outage = entities.outage
    access_log = (
        AccessLog(reactor, settings.access_log) if settings.access_log else None
    )
    proxy = ProxyResource(
        runtime,
        node.agents,
        reactor,
        Recorder(reactor, metrics if settings.metrics else None, access_log),
        latency_headers=settings.latency_headers,
        trust_forwarded_for=settings.trust_forwarded_for,
    )

    def connections() -> dict[str, int]:
        pooled = node.agents.pool._connections.values()
        return {
            "client_open": node.open_connections,
            "upstream_pooled": sum(len(c) for c in pooled),
        }

    registry.register(
        StateCollector(
            metrics,
            lambda: runtime.snapshot,
            health,
            connections,
            lambda: not outage.failing,
        )
    )
    runtime.observe(lambda snapshot: metrics.forget(live(snapshot)))

    def probed(event: Any) -> None:
        if isinstance(event, Probed):
            outcome = event.outcome
            result = str(outcome.code) if outcome.kind == "status" else outcome.kind
            metrics.target(event.upstream, event.target).probes[result] += 1

    health.add_observer(probed)
    app = Klein()
    upstreams.register(app, entities, health, node.node_id)
    services.register(app, entities)
    certificates.register(app, entities)

    # A status probe waits at most a second on the database, and probes
    # that come while one ping is out share it.
    ping = InFlight(node.store.ping)

    async def node_status() -> Any:
        try:
            reachable = await ping().addTimeout(1.0, reactor)
        except TimeoutError:
            reachable = False
        return {
            "node_id": node.node_id,
            "uptime": round(reactor.seconds() - node.started_at, 3),
            "configuration_version": runtime.snapshot.version,
            "database": {"reachable": reachable},
            "connections": connections(),
            # Counted by the proxy itself: the metrics' per-target series
            # go with a deleted target while its requests still run, and
            # are not kept at all with --no-metrics.
            "inflight_requests": node.requests_in_flight,
        }

    status.register(app, node.node_id, registry, node_status)
    config.register(app, entities, reactor)
    handle_routing_errors(app)

    async def load_declarative(path: str) -> None:
        with open(path, encoding="utf-8") as f:
            document = declarative.parse(f.read())
        # Not bounded as an admin write is: a slow store (a big document
        # on a remote database) delays the start, and giving up would not
        # stop the replacement from landing.
        await apply_document(entities, reactor, document, bounded=False)

    def stop() -> None:
        health.stop()
        if access_log is not None:
            access_log.close()

    return Parts(
        runtime=runtime,
        entities=entities,
        proxy_resource=proxy,
        admin_resource=FreshResource(app.resource(), entities.refresh, reactor),
        metrics=metrics,
        outage=outage,
        load_declarative=load_declarative,
        stop=stop,
    )

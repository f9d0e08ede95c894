# -*- test-case-name: tests.test_metrics -*-
"""
The gateway's Prometheus metrics, in one place.

Names and labels follow Kong's Prometheus plugin (with an C{aigateway_}
prefix), so existing dashboards port by renaming.  Every label value comes
from configuration (service, route, upstream and target names) or from a
small fixed set (status codes, states, token types); none takes raw client
input.  Model names come from the target's answer and are capped at
L{MAX_MODELS} distinct values.

Per-target series are remembered so that deleting a target removes them;
health and in-flight gauges are read from live state at scrape time by a
collector, so they never show a target that no longer exists.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import suppress
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .addresses import format_target
from .config import ConfigSnapshot
from .model import Route, Service, Target

# Milliseconds, from sub-millisecond gateway overhead to minute-long streams.
BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)
MAX_MODELS = 100
HEALTH_STATES = ("healthy", "unhealthy", "healthchecks_off", "dns_error")

TargetKey = tuple[str, str]
Owner = tuple[str, ...]


class Metrics:
    """
    The metric objects, and the bookkeeping that keeps their label sets
    bounded.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        # Kong's plugin has no *_created series; they double every counter.
        disable_created_metrics()
        self.registry = registry

        def counter(name: str, doc: str, labels: list[str]) -> Counter:
            return Counter(name, doc, labels, registry=registry)

        def histogram(name: str, doc: str, labels: list[str]) -> Histogram:
            return Histogram(name, doc, labels, buckets=BUCKETS, registry=registry)

        self.requests = counter(
            "aigateway_http_requests",
            "Requests answered by the proxy, by service, route and status code.",
            ["service", "route", "code"],
        )
        self.target_requests = counter(
            "aigateway_upstream_target_requests",
            "Attempts sent to each target, by the status it answered "
            "('error' for a connection failure, 'timeout').",
            ["upstream", "target", "code"],
        )
        self.request_latency = histogram(
            "aigateway_request_latency_ms",
            "Time from the request's arrival to its last byte sent, in ms.",
            ["service", "route"],
        )
        self.upstream_latency = histogram(
            "aigateway_upstream_latency_ms",
            "Time from sending to a target to its first response byte, in ms.",
            ["service", "route", "upstream", "target"],
        )
        self.proxy_latency = histogram(
            "aigateway_proxy_latency_ms",
            "Time spent in the gateway before the request was sent on, in ms.",
            ["service", "route"],
        )
        self.bandwidth = counter(
            "aigateway_bandwidth_bytes",
            "Body bytes received from clients (ingress) and sent to them (egress).",
            ["service", "route", "direction"],
        )
        self.probes = counter(
            "aigateway_health_probes",
            "Active health probes, by result.",
            ["upstream", "target", "result"],
        )
        self.retries = counter(
            "aigateway_proxy_retries",
            "Attempts beyond the first, by upstream.",
            ["upstream"],
        )
        self.llm_requests = counter(
            "aigateway_ai_llm_requests",
            "Answers that reported token usage, by model.",
            ["upstream", "target", "model"],
        )
        self.llm_tokens = counter(
            "aigateway_ai_llm_tokens",
            "Tokens reported in OpenAI-style usage objects.",
            ["upstream", "target", "model", "token_type"],
        )
        self._series: dict[Owner, set[tuple[Any, tuple[str, ...]]]] = defaultdict(set)
        self._models: set[str] = set()
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self.inflight: dict[TargetKey, int] = defaultdict(int)

    def for_target(self, metric: Any, upstream: str, target: str, *labels: str) -> Any:
        """
        C{metric.labels(...)} for a per-target series, remembered so the
        series can be removed with its target.

        @param labels: all label values, in the metric's order.
        """
        return self._owned(metric, labels, ("target", upstream, target))

    def for_route_and_target(
        self, metric: Any, service: str, route: str, upstream: str, target: str
    ) -> Any:
        """
        C{metric.labels(service, route, upstream, target)}, removed with
        either its route or its target.
        """
        return self._owned(
            metric,
            (service, route, upstream, target),
            ("route", service, route),
            ("target", upstream, target),
        )

    def for_route(self, metric: Any, service: str, route: str, *labels: str) -> Any:
        """
        C{metric.labels(...)} for a per-route series, removed with its route
        (or when the route or its service is renamed).
        """
        return self._owned(metric, labels, ("route", service, route))

    def for_upstream(self, metric: Any, upstream: str, *labels: str) -> Any:
        """
        C{metric.labels(...)} for a per-upstream series.
        """
        return self._owned(metric, labels, ("upstream", upstream))

    def _owned(self, metric: Any, labels: tuple[str, ...], *owners: Owner) -> Any:
        # Children are cached: prometheus_client's labels() validates and
        # joins the labels on every call, which cost ~5% of a request.
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            for owner in owners:
                self._series[owner].add(key)
            child = self._children[key] = metric.labels(*labels)
        return child

    def model_label(self, model: Any) -> str:
        """
        A bounded label for a model name.
        """
        if not isinstance(model, str) or not model:
            return "unknown"
        model = model[:64]
        if model in self._models:
            return model
        if len(self._models) >= MAX_MODELS:
            return "other"
        self._models.add(model)
        return model

    def forget(self, keep: set[Owner]) -> None:
        """
        Remove the series of every target, route and upstream not in
        C{keep} (see L{live}).
        """
        for key in [k for k in self._series if k not in keep]:
            for metric, labels in self._series.pop(key):
                if self._children.pop((metric, labels), None) is not None:
                    with suppress(KeyError):
                        metric.remove(*labels)
        for key in [k for k in self.inflight if ("target", *k) not in keep]:
            del self.inflight[key]


def live(snapshot: ConfigSnapshot) -> set[Owner]:
    """
    The owners of series that C{snapshot} still configures: every target
    (direct services' hosts as targets of upstream C{""}), every route by
    its service and route labels, every upstream.
    """
    owners: set[Owner] = set()
    for upstream in snapshot.upstreams.values():
        owners.add(("upstream", upstream.name))
        for target in snapshot.targets.get(upstream.id, ()):
            owners.add(("target", upstream.name, target.key))
    for service in snapshot.services.values():
        if service.host not in snapshot.upstreams:
            owners.add(("target", "", format_target(service.host, service.port)))
    for route in snapshot.routes:
        owner = snapshot.services.get(route.service_id)
        if owner is not None:
            owners.add(("route", *labels(owner, route)))
    return owners


def labels(service: Service, route: Route) -> tuple[str, str]:
    """
    The C{service} and C{route} label values: names, or ids when unnamed.
    """
    return service.name or service.id, route.name or route.id


class StateCollector(Collector):
    """
    Gauges read from live state at scrape time: target health, in-flight
    attempts and open connections.
    """

    def __init__(
        self,
        metrics: Metrics,
        snapshot: Callable[[], ConfigSnapshot],
        health: Any,
        connections: Callable[[], dict[str, int]],
    ) -> None:
        self._metrics = metrics
        self._snapshot = snapshot
        self._health = health
        self._connections = connections

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snapshot = self._snapshot()
        health = GaugeMetricFamily(
            "aigateway_upstream_target_health",
            "Health of each target on this node: 1 for its current state.",
            labels=["upstream", "target", "state"],
        )
        inflight = GaugeMetricFamily(
            "aigateway_inflight_requests",
            "Attempts in flight to each target, streams until their last byte.",
            labels=["upstream", "target"],
        )
        for upstream in snapshot.upstreams.values():
            for target in snapshot.targets.get(upstream.id, ()):
                if target.weight == 0:
                    continue
                current = self._state(target)
                for state in HEALTH_STATES:
                    health.add_metric(
                        [upstream.name, target.key, state],
                        1.0 if state == current else 0.0,
                    )
                inflight.add_metric(
                    [upstream.name, target.key],
                    self._metrics.inflight.get((upstream.name, target.key), 0),
                )
        yield health
        yield inflight
        connections = GaugeMetricFamily(
            "aigateway_connections",
            "Client connections open to the proxy, and idle upstream connections pooled.",
            labels=["state"],
        )
        for state, value in self._connections().items():
            connections.add_metric([state], value)
        yield connections

    def _state(self, target: Target) -> str:
        return str(self._health.describe(target)["health"]).lower()

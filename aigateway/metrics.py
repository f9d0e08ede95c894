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

from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .addresses import format_target
from .config import ConfigSnapshot
from .model import Route, Service, Target

# Milliseconds, from sub-millisecond gateway overhead to minute-long streams.
BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)
_LE = [floatToGoString(bound) for bound in BUCKETS] + ["+Inf"]
MAX_MODELS = 100
# (Route, target) pairs remembered for the hot path before starting afresh.
MAX_ATTEMPT_SERIES = 4096
HEALTH_STATES = ("healthy", "unhealthy", "healthchecks_off", "dns_error", "dns_pending")
# The token_type label values, in the order TargetSeries.tokens keeps them.
TOKEN_TYPES = ("prompt", "completion", "total")

TargetKey = tuple[str, str]
Owner = tuple[str, ...]


class Histogram:
    """
    Observations in L{BUCKETS}, counted per bucket (not cumulatively: one
    increment per observation) and summed.
    """

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(BUCKETS, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        total = 0
        out = []
        for le, count in zip(_LE, self.counts, strict=True):
            total += count
            out.append((le, float(total)))
        return out


class RouteSeries:
    """
    The series of one route: requests by status code, request and proxy
    latency, body bytes in and out.
    """

    __slots__ = ("codes", "latency", "proxy", "ingress", "egress")

    def __init__(self) -> None:
        self.codes: dict[int, int] = defaultdict(int)
        self.latency = Histogram()
        self.proxy = Histogram()
        self.ingress = 0
        self.egress = 0


class TargetSeries:
    """
    The series of one target: attempts by result, probes by result, and
    the token usage its answers reported, by model.
    """

    __slots__ = ("codes", "probes", "llm", "tokens", "inflight")

    def __init__(self) -> None:
        self.codes: dict[str, int] = defaultdict(int)
        self.probes: dict[str, int] = defaultdict(int)
        self.llm: dict[str, int] = defaultdict(int)
        # Per model: prompt, completion and total tokens.
        self.tokens: dict[str, list[int]] = {}
        self.inflight = 0


class AttemptSeries:
    """
    Everything one attempt on a target for a route counts into, found with
    one lookup instead of one per series (L{Metrics.attempt}).

    @ivar route: the route's series.
    @ivar target: the target's series.
    @ivar upstream: the upstream's label.
    """

    __slots__ = ("_pins", "_latency", "_make_latency", "route", "target", "upstream")

    def __init__(
        self,
        pins: tuple[object, object],
        route: RouteSeries,
        target: TargetSeries,
        make_latency: Callable[[], Histogram],
        upstream: str,
    ) -> None:
        # The route and target objects this was made for: they keep the ids
        # of the lookup key from being reused while this is remembered.
        self._pins = pins
        self.route = route
        self.target = target
        self.upstream = upstream
        # Made at the first first byte: a target that never answered has no
        # latency series, not an empty one.
        self._latency: Histogram | None = None
        self._make_latency = make_latency

    def made_for(self, route: object, target: object) -> bool:
        """
        Whether these are the series of C{route} and C{target}.
        """
        pins = self._pins
        return pins[0] is route and pins[1] is target

    def first_byte(self, ms: float) -> None:
        """
        The target's first response byte came C{ms} after the request.
        """
        latency = self._latency
        if latency is None:
            latency = self._latency = self._make_latency()
        latency.observe(ms)


class Metrics:
    """
    The gateway's request metrics, kept as plain numbers and turned into
    Prometheus families when scraped.

    prometheus_client's own C{Counter} and C{Histogram} take a lock and
    validate on every increment (about 1.5 us each, eleven of them per
    proxied request); the proxy runs on the reactor thread only, so plain
    integers do.  The exposition (names, labels, types, buckets) is the one
    those classes would give.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.routes: dict[tuple[str, str], RouteSeries] = {}
        self.targets: dict[TargetKey, TargetSeries] = {}
        self.upstream_latency: dict[tuple[str, str, str, str], Histogram] = {}
        self.retries: dict[str, int] = defaultdict(int)
        #: Requests the gateway answered without a route (see
        #: L{aigateway.recorder.Recorder.unrouted}), exposed under empty
        #: service and route labels; no configuration change forgets them.
        self.unrouted = RouteSeries()
        self._models: set[str] = set()
        # The series each (route, target) pair counts into, by the objects'
        # ids: for the proxy's hot path (L{attempt}); emptied by L{forget}.
        self._attempts: dict[tuple[int, int], AttemptSeries] = {}
        # The owners the configuration has (see L{live}), from the last
        # L{forget}: series for anything else are not kept (None: all).
        self._live: set[Owner] | None = None
        registry.register(_RequestCollector(self))

    def attempt(
        self, service: Service, route: Route, upstream: str, target: Target
    ) -> AttemptSeries:
        """
        The series an attempt on C{target} (of C{upstream}, C{""} for a
        service's host) for C{route} of C{service} counts into.

        A configuration's route and target objects live until it is
        replaced, and L{forget} runs then, so these are looked up by
        identity: hashing the objects' values or building their labels on
        every request cost more than the counting itself.
        """
        key = (id(route), id(target))
        series = self._attempts.get(key)
        if series is None or not series.made_for(route, target):
            names = labels(service, route)
            key_of_target = target.key
            if len(self._attempts) >= MAX_ATTEMPT_SERIES:
                self._attempts.clear()
            series = self._attempts[key] = AttemptSeries(
                (route, target),
                self.live_route(*names),
                self._live_target(upstream, key_of_target),
                lambda: self._live_latency(*names, upstream, key_of_target),
                upstream,
            )
        return series

    def _is_live(self, owner: Owner) -> bool:
        return self._live is None or owner in self._live

    def live_route(self, service: str, route: str) -> RouteSeries:
        """
        The series of a route (L{route}), or, for a route the configuration
        no longer has (an exchange that began before it was deleted), series
        that are not kept: a deleted route's series do not come back.
        """
        if self._is_live(("route", service, route)):
            return self.route(service, route)
        return RouteSeries()

    def _live_target(self, upstream: str, target: str) -> TargetSeries:
        if self._is_live(("target", upstream, target)):
            return self.target(upstream, target)
        return TargetSeries()

    def _live_latency(
        self, service: str, route: str, upstream: str, target: str
    ) -> Histogram:
        if self._is_live(("route", service, route)) and self._is_live(
            ("target", upstream, target)
        ):
            return self.latency_to(service, route, upstream, target)
        return Histogram()

    def inflight(self, upstream: str, target: str) -> int:
        """
        The attempts in flight to C{target} of C{upstream}.
        """
        series = self.targets.get((upstream, target))
        return 0 if series is None else series.inflight

    def route(self, service: str, route: str) -> RouteSeries:
        """
        The series of the route labelled C{service}, C{route}.
        """
        series = self.routes.get((service, route))
        if series is None:
            series = self.routes[(service, route)] = RouteSeries()
        return series

    def target(self, upstream: str, target: str) -> TargetSeries:
        """
        The series of C{target} of C{upstream} (C{""} for a service's host).
        """
        series = self.targets.get((upstream, target))
        if series is None:
            series = self.targets[(upstream, target)] = TargetSeries()
        return series

    def latency_to(
        self, service: str, route: str, upstream: str, target: str
    ) -> Histogram:
        """
        The first-byte latency of C{target} for the route's requests.
        """
        key = (service, route, upstream, target)
        histogram = self.upstream_latency.get(key)
        if histogram is None:
            histogram = self.upstream_latency[key] = Histogram()
        return histogram

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
        self._attempts.clear()
        self._live = keep
        for key in [k for k in self.routes if ("route", *k) not in keep]:
            del self.routes[key]
        for key in [k for k in self.targets if ("target", *k) not in keep]:
            del self.targets[key]
        for both in [
            k
            for k in self.upstream_latency
            if ("route", *k[:2]) not in keep or ("target", *k[2:]) not in keep
        ]:
            del self.upstream_latency[both]
        for upstream in [u for u in self.retries if ("upstream", u) not in keep]:
            del self.retries[upstream]


class _RequestCollector(Collector):
    """
    Turns L{Metrics}' numbers into families at scrape time.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Any]:
        m = self._metrics
        routes = sorted(m.routes.items())
        if m.unrouted.codes:
            # (A configured route's labels are never empty: a name or an id.)
            routes.insert(0, (("", ""), m.unrouted))
        targets = sorted(m.targets.items())
        yield _counter(
            "aigateway_http_requests",
            "Requests answered by the proxy, by service, route and status code.",
            ["service", "route", "code"],
            (
                ([*key, str(code)], count)
                for key, series in routes
                for code, count in sorted(series.codes.items())
            ),
        )
        yield _counter(
            "aigateway_upstream_target_requests",
            "Attempts sent to each target, by the status it answered "
            "('error' for a connection failure, 'timeout').",
            ["upstream", "target", "code"],
            (
                ([*key, code], count)
                for key, series in targets
                for code, count in sorted(series.codes.items())
            ),
        )
        yield _histogram(
            "aigateway_request_latency_ms",
            "Time from the request's arrival to its last byte sent, in ms.",
            ["service", "route"],
            ((list(key), series.latency) for key, series in routes),
        )
        yield _histogram(
            "aigateway_upstream_latency_ms",
            "Time from sending to a target to its first response byte, in ms.",
            ["service", "route", "upstream", "target"],
            ((list(key), h) for key, h in sorted(m.upstream_latency.items())),
        )
        yield _histogram(
            "aigateway_proxy_latency_ms",
            "Time spent in the gateway before the request was sent on, in ms.",
            ["service", "route"],
            ((list(key), series.proxy) for key, series in routes),
        )
        yield _counter(
            "aigateway_bandwidth_bytes",
            "Body bytes received from clients (ingress) and sent to them (egress).",
            ["service", "route", "direction"],
            (
                ([*key, direction], count)
                for key, series in routes
                for direction, count in (
                    ("ingress", series.ingress),
                    ("egress", series.egress),
                )
            ),
        )
        yield _counter(
            "aigateway_health_probes",
            "Active health probes, by result.",
            ["upstream", "target", "result"],
            (
                ([*key, result], count)
                for key, series in targets
                for result, count in sorted(series.probes.items())
            ),
        )
        yield _counter(
            "aigateway_proxy_retries",
            "Attempts beyond the first, by upstream.",
            ["upstream"],
            (([upstream], count) for upstream, count in sorted(m.retries.items())),
        )
        yield _counter(
            "aigateway_ai_llm_requests",
            "Answers that reported token usage, by model.",
            ["upstream", "target", "model"],
            (
                ([*key, model], count)
                for key, series in targets
                for model, count in sorted(series.llm.items())
            ),
        )
        yield _counter(
            "aigateway_ai_llm_tokens",
            "Tokens reported in OpenAI-style usage objects.",
            ["upstream", "target", "model", "token_type"],
            (
                ([*key, model, kind], count)
                for key, series in targets
                for model, counts in sorted(series.tokens.items())
                for kind, count in zip(TOKEN_TYPES, counts, strict=True)
            ),
        )


def _counter(
    name: str, doc: str, labels: list[str], samples: Iterable[tuple[list[str], float]]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=labels)
    for values, count in samples:
        family.add_metric(values, count)
    return family


def _histogram(
    name: str,
    doc: str,
    labels: list[str],
    series: Iterable[tuple[list[str], Histogram]],
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=labels)
    for values, histogram in series:
        family.add_metric(values, histogram.cumulative(), histogram.sum)
    return family


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
    attempts, open connections, and the configuration this node serves.
    """

    def __init__(
        self,
        metrics: Metrics,
        snapshot: Callable[[], ConfigSnapshot],
        health: Any,
        connections: Callable[[], dict[str, int]],
        store_reachable: Callable[[], bool] = lambda: True,
    ) -> None:
        """
        @param store_reachable: whether the last look at the configuration
            store succeeded.
        """
        self._metrics = metrics
        self._snapshot = snapshot
        self._health = health
        self._connections = connections
        self._store_reachable = store_reachable

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
                    self._metrics.inflight(upstream.name, target.key),
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
        # Nodes sharing a database serve the same configuration when their
        # versions agree; Kong names its reachability gauge alike.
        yield GaugeMetricFamily(
            "aigateway_configuration_version",
            "Version of the configuration this node serves (the database's "
            "counter of changes).",
            value=snapshot.version,
        )
        yield GaugeMetricFamily(
            "aigateway_datastore_reachable",
            "1 while the configuration store answers this node, 0 during an outage.",
            value=1.0 if self._store_reachable() else 0.0,
        )

    def _state(self, target: Target) -> str:
        return str(self._health.describe(target)["health"]).lower()

# -*- test-case-name: tests.test_metrics -*-
"""
Turning finished exchanges into metrics and access log lines.

This runs when an attempt or a request is over, never before the response
is written, so its cost never delays the bytes a client is waiting for.
"""

from __future__ import annotations

from typing import Any

from .accesslog import AccessLog, Record
from .metrics import Metrics, labels
from .model import Target
from .proxy.forward import Exchange, ExchangeObserver


def _names(exchange: Exchange) -> tuple[str, str]:
    return labels(exchange.service, exchange.route)


def _upstream_name(exchange: Exchange) -> str:
    return exchange.upstream.name if exchange.upstream is not None else ""


class Recorder(ExchangeObserver):
    """
    Counts attempts and requests, and logs each request.

    Either part can be off (C{--no-metrics}, no C{--access-log}), so their
    cost can be measured.
    """

    def __init__(
        self, clock: Any, metrics: Metrics | None, access_log: AccessLog | None
    ) -> None:
        self._clock = clock
        self._metrics = metrics
        self._log = access_log

    def attempt_started(self, exchange: Exchange, target: Target) -> None:
        metrics = self._metrics
        if metrics is None:
            return
        upstream = _upstream_name(exchange)
        metrics.inflight[(upstream, target.key)] += 1
        if exchange.attempts > 1:
            metrics.retries[upstream] += 1

    def attempt_ended(
        self, exchange: Exchange, target: Target, code: str, first_byte: float | None
    ) -> None:
        metrics = self._metrics
        if metrics is None:
            return
        upstream = _upstream_name(exchange)
        key = (upstream, target.key)
        metrics.inflight[key] = max(0, metrics.inflight[key] - 1)
        metrics.target(upstream, target.key).codes[code] += 1
        if first_byte is not None:
            service, route = _names(exchange)
            metrics.latency_to(service, route, upstream, target.key).observe(
                first_byte * 1000
            )

    def done(self, exchange: Exchange) -> None:
        service, route = _names(exchange)
        elapsed = self._clock.seconds() - exchange.started
        upstream = _upstream_name(exchange)
        if self._metrics is not None:
            self._count(exchange, service, route, upstream, elapsed)
        if self._log is not None:
            self._log.write(self._record(exchange, service, route, upstream, elapsed))

    def _count(
        self,
        exchange: Exchange,
        service: str,
        route: str,
        upstream: str,
        elapsed: float,
    ) -> None:
        metrics = self._metrics
        assert metrics is not None
        series = metrics.route(service, route)
        series.codes[exchange.status] += 1
        series.latency.observe(elapsed * 1000)
        if exchange.proxy_latency is not None:
            series.proxy.observe(exchange.proxy_latency * 1000)
        series.ingress += len(exchange.body)
        series.egress += exchange.bytes_out
        usage = exchange.usage
        target = exchange.target
        if usage is not None and target is not None:
            model = metrics.model_label(usage.model)
            per_target = metrics.target(upstream, target.key)
            per_target.llm[model] += 1
            tokens = per_target.tokens
            tokens[(model, "prompt")] += usage.prompt
            tokens[(model, "completion")] += usage.completion
            tokens[(model, "total")] += usage.total

    def _record(
        self,
        exchange: Exchange,
        service: str,
        route: str,
        upstream: str,
        elapsed: float,
    ) -> Record:
        target = exchange.target
        return (
            exchange.started,
            exchange.request_id,
            exchange.context.client_ip,
            exchange.request.method,
            exchange.context.path,
            route,
            service,
            upstream,
            target.key if target is not None else None,
            exchange.status,
            exchange.attempts,
            tuple(exchange.tried),
            len(exchange.body),
            exchange.bytes_out,
            elapsed,
            exchange.upstream_latency,
            exchange.proxy_latency,
            exchange.usage,
            exchange.error,
            exchange.gone,
        )

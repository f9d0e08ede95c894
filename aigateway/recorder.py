# -*- test-case-name: tests.test_metrics -*-
"""
Turning finished exchanges into metrics and access log lines.

This runs when an attempt or a request is over, never before the response
is written, so its cost never delays the bytes a client is waiting for.
"""

from __future__ import annotations

from typing import Any

from .accesslog import AccessLog, Record
from .metrics import AttemptSeries, Metrics, labels
from .model import Target
from .proxy.forward import Exchange, ExchangeObserver
from .proxy.server import ProxyRequest


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
        series = exchange.observed = self._series(exchange, target)
        series.target.inflight += 1
        if exchange.attempts > 1:
            metrics.retries[series.upstream] += 1

    def attempt_ended(
        self, exchange: Exchange, target: Target, code: str, first_byte: float | None
    ) -> None:
        if self._metrics is None:
            return
        series = self._series(exchange, target)
        per_target = series.target
        per_target.inflight = max(0, per_target.inflight - 1)
        per_target.codes[code] += 1
        if first_byte is not None:
            series.first_byte(first_byte * 1000)

    def _series(self, exchange: Exchange, target: Target) -> AttemptSeries:
        # Those of the attempt that started last, if it was on this target.
        series: AttemptSeries | None = exchange.observed
        if series is None or not series.made_for(exchange.route, target):
            assert self._metrics is not None
            series = self._metrics.attempt(
                exchange.service, exchange.route, _upstream_name(exchange), target
            )
        return series

    def done(self, exchange: Exchange) -> None:
        elapsed = self._clock.seconds() - exchange.started
        if self._metrics is not None:
            self._count(exchange, elapsed)
        if self._log is not None:
            self._log.write(self._record(exchange, elapsed))

    def _count(self, exchange: Exchange, elapsed: float) -> None:
        metrics = self._metrics
        assert metrics is not None
        target = exchange.target
        attempt: AttemptSeries | None = (
            None if target is None else self._series(exchange, target)
        )
        series = (
            metrics.live_route(*_names(exchange)) if attempt is None else attempt.route
        )
        series.codes[exchange.status] += 1
        series.latency.observe(elapsed * 1000)
        if exchange.proxy_latency is not None:
            series.proxy.observe(exchange.proxy_latency * 1000)
        series.ingress += exchange.bytes_in
        series.egress += exchange.bytes_out
        usage = exchange.usage
        if usage is not None and attempt is not None:
            model = metrics.model_label(usage.model)
            per_target = attempt.target
            per_target.llm[model] += 1
            counts = per_target.tokens.get(model)
            if counts is None:
                counts = per_target.tokens[model] = [0, 0, 0]
            counts[0] += usage.prompt
            counts[1] += usage.completion
            counts[2] += usage.total

    def unrouted(
        self,
        request: ProxyRequest,
        request_id: str,
        client_ip: str,
        path: str,
        status: int,
        message: str,
        started: float,
    ) -> None:
        """
        The gateway answered C{request} itself with C{status}: no route
        matched it (404), or its route is for https only (426).

        Such requests are counted under empty service and route labels
        (as Kong counts requests no route matched) and logged with no
        upstream or target: a scanner's probes add no series per path or
        host.  The gateway's own error body is not counted as egress, as
        for a routed request answered with a gateway error.
        """
        elapsed = self._clock.seconds() - started
        metrics = self._metrics
        if metrics is not None:
            series = metrics.unrouted
            series.codes[status] += 1
            series.latency.observe(elapsed * 1000)
            series.ingress += len(request.body)
        if self._log is not None:
            self._log.write(
                (
                    started,
                    request_id,
                    client_ip,
                    request.method,
                    path,
                    "",
                    "",
                    "",
                    None,
                    status,
                    0,
                    (),
                    len(request.body),
                    0,
                    elapsed,
                    None,
                    None,
                    None,
                    message,
                    False,
                )
            )

    def _record(self, exchange: Exchange, elapsed: float) -> Record:
        target = exchange.target
        service, route = _names(exchange)
        return (
            exchange.started,
            exchange.request_id,
            exchange.context.client_ip,
            exchange.request.method,
            exchange.context.path,
            route,
            service,
            _upstream_name(exchange),
            target.key if target is not None else None,
            exchange.status,
            exchange.attempts,
            tuple(exchange.tried),
            exchange.bytes_in,
            exchange.bytes_out,
            elapsed,
            exchange.upstream_latency,
            exchange.proxy_latency,
            exchange.usage,
            exchange.error,
            exchange.gone,
        )

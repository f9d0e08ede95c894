# -*- test-case-name: tests.test_proxy -*-
"""
The proxy's twisted.web resource: a leaf that routes each request and
hands it to an L{Exchange}.  L{aigateway.proxy.server} serves it.

This is the hot path.  It reads the runtime's compiled configuration with
one attribute access and never touches the store.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from .._version import __version__
from ..balancer.context import PickContext
from ..runtime import Runtime
from .client import Agents
from .forward import Exchange, ExchangeObserver, Hooks
from .relay import write_error
from .router import join_path, normalize_path
from .server import ProxyRequest

NO_ROUTE = "no Route matched with those values"
USE_HTTPS = "Please use HTTPS protocol"
VIA = b"1.1 aigateway/" + __version__.encode("ascii")


def _model_of(body: bytes) -> Callable[[], str | None]:
    """
    The JSON body's C{model}, parsed only when a route asks for it.
    """
    cache: list[str | None] = []

    def model() -> str | None:
        if not cache:
            value = None
            try:
                parsed = json.loads(body or b"null")
            except ValueError:
                parsed = None
            if isinstance(parsed, dict) and isinstance(parsed.get("model"), str):
                value = parsed["model"]
            cache.append(value)
        return cache[0]

    return model


def _no_model() -> None:
    """
    No route matches on models: the body is never looked at.
    """


# The methods' names as the router takes them, decoded once each (bounded:
# the parser refuses methods that are not tokens, but any token is one).
_METHOD_NAMES: dict[bytes, str] = {}


def _method_name(method: bytes) -> str:
    name = _METHOD_NAMES.get(method)
    if name is None:
        name = method.decode("latin-1")
        if len(_METHOD_NAMES) < 64:
            _METHOD_NAMES[method] = name
    return name


class ProxyResource(Resource):
    """
    Routes every request to a service and forwards it.
    """

    isLeaf = True

    def __init__(
        self,
        runtime: Runtime,
        agents: Agents,
        clock: Any,
        observer: ExchangeObserver | None = None,
        latency_headers: bool = True,
        trust_forwarded_for: bool = False,
    ) -> None:
        super().__init__()
        self._runtime = runtime
        self._clock = clock
        self._latency_headers = latency_headers
        self._trust_xff = trust_forwarded_for
        # A random prefix per process and a counter: unique across nodes and
        # restarts without a getrandom system call per request.
        prefix = os.urandom(6).hex()
        self._request_ids = (f"{prefix}{n:012x}" for n in itertools.count()).__next__
        observer = observer or ExchangeObserver()
        self._hooks = Hooks(
            agents=agents,
            clock=clock,
            health=runtime.health,
            decorate=self._decorate,
            observer=observer,
        )
        # Requests that match no route (or a route's protocol) never become
        # exchanges: the observer hears of them apart.
        self._unrouted = observer.unrouted

    def render(self, request: ProxyRequest) -> Any:
        started = self._clock.seconds()
        request_id = self._request_ids()
        request.responseHeaders._rawHeaders[b"X-Request-Id"] = [request_id.encode()]
        body = request.body
        compiled = self._runtime.current
        hosts = request.requestHeaders._rawHeaders.get(b"Host")
        host = hosts[-1].decode("latin-1").lower() if hosts else ""
        if host.startswith("["):
            host = host[: host.find("]") + 1]
        else:
            host = host.partition(":")[0]
        path = request.path.decode("latin-1")
        if "/." in path or "%2" in path:
            path = normalize_path(path)
        router = compiled.router
        match = router.match(
            host,
            _method_name(request.method),
            path,
            _model_of(body) if router.uses_models else _no_model,
        )
        if match is None:
            write_error(request, 404, NO_ROUTE, request_id)
            self._refused(request, request_id, path, 404, NO_ROUTE, started)
            return NOT_DONE_YET
        if match.route.https_only and not request.isSecure():
            # Kong's answer to a plain request on a route for https only.
            raw = request.responseHeaders._rawHeaders
            raw[b"Connection"] = [b"Upgrade"]
            raw[b"Upgrade"] = [b"TLS/1.2, HTTP/1.1"]
            write_error(request, 426, USE_HTTPS, request_id)
            self._refused(request, request_id, path, 426, USE_HTTPS, started)
            return NOT_DONE_YET
        service = match.service
        upstream = compiled.snapshot.upstreams.get(service.host)
        balancer = None if upstream is None else compiled.balancers[upstream.id]
        uri = request.uri
        query = uri.partition(b"?")[2]
        forward_path = join_path(service.path, match.path).encode("latin-1")
        if query:
            forward_path += b"?" + query
        peer = request.peer
        context = PickContext(
            headers=request.requestHeaders,
            client_ip=self._client_ip(request, peer),
            peer=peer,
            path=path,
            query=query,
            uri_captures=match.captures,
        )
        Exchange(
            self._hooks,
            request,
            match.route,
            service,
            upstream,
            balancer,
            context,
            forward_path,
            body,
            request_id,
            started,
        ).start()
        return NOT_DONE_YET

    def _refused(
        self,
        request: ProxyRequest,
        request_id: str,
        path: str,
        status: int,
        message: str,
        started: float,
    ) -> None:
        # Answered by the gateway itself, never an exchange: the observer is
        # told here, after the answer is written, so that a scanner's 404s
        # are counted and logged like any other request.
        self._unrouted(
            request,
            request_id,
            self._client_ip(request, request.peer),
            path,
            status,
            message,
            started,
        )

    def _client_ip(self, request: ProxyRequest, peer: str) -> str:
        if self._trust_xff:
            forwarded = request.getHeader(b"x-forwarded-for")
            if forwarded:
                return forwarded.split(b",")[0].strip().decode("latin-1")
        return peer

    def _decorate(self, exchange: Exchange, request: ProxyRequest) -> None:
        # Values the gateway makes itself: set in canonical form directly,
        # without setRawHeaders' checks for line breaks.
        raw = request.responseHeaders._rawHeaders
        via = raw.get(b"Via")
        # Appended to the target's own (RFC 9110 7.6.3), not in its place.
        raw[b"Via"] = [VIA] if via is None else [*via, VIA]
        if exchange.context.set_cookie is not None:
            name, value, path = exchange.context.set_cookie
            request.addCookie(name, value, path=path)
        if self._latency_headers:
            if exchange.upstream_latency is not None:
                raw[b"X-Upstream-Latency"] = [
                    b"%d" % (exchange.upstream_latency * 1000)
                ]
            if exchange.proxy_latency is not None:
                raw[b"X-Proxy-Latency"] = [b"%d" % (exchange.proxy_latency * 1000)]

# -*- test-case-name: tests.test_proxy -*-
"""
The proxy listener: a twisted.web L{Site} whose one leaf resource routes
each request and hands it to an L{Exchange}.

This is the hot path.  It reads the runtime's compiled configuration with
one attribute access and never touches the store.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable
from typing import Any

from twisted.python.failure import Failure
from twisted.web.http import datetimeToString
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from .._version import __version__
from ..balancer.context import PickContext
from ..runtime import Runtime
from .client import Agents
from .forward import Exchange, ExchangeObserver, Hooks
from .relay import write_error
from .router import join_path

NO_ROUTE = "no Route matched with those values"
VIA = b"1.1 aigateway/" + __version__.encode("ascii")


SERVER = b"aigateway/" + __version__.encode("ascii")
_dates: dict[int, bytes] = {}


def _http_date(now: float) -> bytes:
    """
    The C{Date} header for C{now}, formatted once per second.
    """
    second = int(now)
    date = _dates.get(second)
    if date is None:
        _dates.clear()
        date = _dates[second] = datetimeToString(second)
    return date


_TOO_LARGE = json.dumps({"message": "Request size limit exceeded"}).encode()


class GatewayRequest(Request):
    """
    A request whose body is bounded: a client cannot make the gateway
    buffer more than the site's C{max_body} bytes.

    The limit is enforced as the body arrives (as soon as a declared
    C{Content-Length} is seen, or when a chunked body passes it): the
    client gets a 413 and the connection is closed, instead of the gateway
    reading and discarding a body it will never forward.
    """

    _received = 0
    _refused = False

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self._limit():
            self._refuse()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self._limit():
            self._refuse()
            return
        super().handleContentChunk(data)

    def process(self) -> None:
        """
        Hand the request straight to the site's resource.

        The proxy's resource is a leaf at the root, so twisted.web's own
        C{process} (unquoting every path segment into C{postpath}, resource
        traversal, an encoder lookup, formatting a C{Date} from scratch) is
        work done for nothing on every request.
        """
        site = self.channel.site  # type: ignore[attr-defined]
        self.site = site
        raw = self.responseHeaders._rawHeaders
        raw[b"Server"] = [SERVER]
        raw[b"Date"] = [_http_date(site.reactor_seconds())]
        self.prepath = []
        self.postpath = []
        try:
            self.render(site.resource)
        except BaseException:
            self.processingFailed(Failure())

    def _limit(self) -> int:
        return int(self.channel.site.max_body)  # type: ignore[attr-defined]

    def _refuse(self) -> None:
        self._refused = True
        transport = self.channel.transport if self.channel is not None else None
        if transport is None:
            return
        transport.write(
            b"HTTP/1.1 413 Payload Too Large\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (len(_TOO_LARGE), _TOO_LARGE)
        )
        transport.loseConnection()


class QuietSite(Site):
    """
    A site without twisted.web's per-request C{Site.log}, which costs about
    as much as the rest of a simple proxied request; the gateway writes its
    own access log from the exchange instead.
    """

    def __init__(self, resource: Resource, **kwargs: Any) -> None:
        # Bodies are read as bytes (the proxy forwards them, the Admin API
        # parses them itself); parsing form posts into request.args through
        # the email package cost ~10% of a proxied request.
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(resource, **kwargs)

    def log(self, request: Any) -> None:
        pass


class GatewaySite(QuietSite):
    """
    The proxy's site: bounded request bodies, no twisted.web access log.
    """

    requestFactory = GatewayRequest
    open_connections = 0

    def __init__(
        self, resource: Resource, max_body: int, clock: Any, **kwargs: Any
    ) -> None:
        super().__init__(resource, **kwargs)
        self.max_body = max_body
        self.reactor_seconds = clock.seconds

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        if protocol is None:
            return None
        self.open_connections += 1
        made, lost = protocol.makeConnection, protocol.connectionLost

        def make_connection(transport: Any) -> None:
            # Without TCP_NODELAY, small server-sent-event chunks can wait
            # for the client's delayed ACK.
            set_nodelay = getattr(transport, "setTcpNoDelay", None)
            if set_nodelay is not None:
                set_nodelay(True)
            # twisted.web asks the transport for its own address on every
            # request (a getsockname system call); it never changes.
            get_host = getattr(transport, "getHost", None)
            if get_host is not None:
                host = get_host()
                transport.getHost = lambda: host
            made(transport)

        def connection_lost(reason: Any) -> None:
            self.open_connections -= 1
            lost(reason)

        protocol.makeConnection = make_connection
        protocol.connectionLost = connection_lost
        return protocol


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
        self._hooks = Hooks(
            agents=agents,
            clock=clock,
            health=runtime.health,
            decorate=self._decorate,
            observer=observer or ExchangeObserver(),
        )

    def render(self, request: Request) -> Any:
        started = self._clock.seconds()
        request_id = self._request_ids()
        request.responseHeaders.setRawHeaders(b"x-request-id", [request_id.encode()])
        content = request.content
        assert content is not None  # twisted.web sets it before render
        content.seek(0)
        body = content.read()
        compiled = self._runtime.current
        host = (request.getHeader(b"host") or b"").decode("latin-1").lower()
        if host.startswith("["):
            host = host[: host.find("]") + 1]
        else:
            host = host.partition(":")[0]
        path = request.path.decode("latin-1")
        router = compiled.router
        match = router.match(
            host,
            request.method.decode("latin-1"),
            path,
            _model_of(body) if router.uses_models else lambda: None,
        )
        if match is None:
            write_error(request, 404, NO_ROUTE, request_id)
            return NOT_DONE_YET
        service = match.service
        upstream = compiled.snapshot.upstreams.get(service.host)
        balancer = None if upstream is None else compiled.balancers[upstream.id]
        uri = request.uri
        query = uri.partition(b"?")[2]
        forward_path = join_path(service.path, match.path).encode("latin-1")
        if query:
            forward_path += b"?" + query
        peer = getattr(request.getClientAddress(), "host", "") or ""
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

    def _client_ip(self, request: Request, peer: str) -> str:
        if self._trust_xff:
            forwarded = request.getHeader(b"x-forwarded-for")
            if forwarded:
                return forwarded.split(b",")[0].strip().decode("latin-1")
        return peer

    def _decorate(self, exchange: Exchange, request: Request) -> None:
        headers = request.responseHeaders
        headers.setRawHeaders(b"via", [VIA])
        if exchange.context.set_cookie is not None:
            name, value, path = exchange.context.set_cookie
            request.addCookie(name, value, path=path)
        if self._latency_headers:
            if exchange.upstream_latency is not None:
                headers.setRawHeaders(
                    b"x-upstream-latency", [b"%d" % (exchange.upstream_latency * 1000)]
                )
            if exchange.proxy_latency is not None:
                headers.setRawHeaders(
                    b"x-proxy-latency", [b"%d" % (exchange.proxy_latency * 1000)]
                )

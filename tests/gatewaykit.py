"""
Real parts for end-to-end tests: a gateway on loopback ports, an Admin API
client, and target servers written for the tests.
"""

from __future__ import annotations

import gc
import json
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlencode

import attrs
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from aigateway.service import GatewayService, Settings


def sleep(seconds: float) -> Deferred[None]:
    """
    Wait on the real reactor.
    """
    return deferLater(reactor, seconds, lambda: None)


@attrs.define
class Reply:
    """
    An HTTP answer, read whole.
    """

    code: int
    headers: Any
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """
    An HTTP client for one base URL, with its own connection pool.
    """

    def __init__(self, base: str) -> None:
        self.base = base
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 64
        self._treq = HTTPClient(Agent(reactor, pool=self.pool))

    async def request(
        self,
        method: str,
        path: str,
        form: dict[str, Any] | list[tuple[str, str]] | None = None,
        json_body: Any = None,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        hdrs = {k: [v] for k, v in (headers or {}).items()}
        data: Any = body
        if form is not None:
            data = urlencode(form, doseq=True).encode()
            hdrs.setdefault("Content-Type", ["application/x-www-form-urlencoded"])
        elif json_body is not None:
            data = json.dumps(json_body).encode()
            hdrs.setdefault("Content-Type", ["application/json"])
        response = await self._treq.request(
            method, self.base + path, data=data, headers=hdrs
        )
        content = await response.content()
        return Reply(response.code, response.headers, content)

    async def get(self, path: str, **kw: Any) -> Reply:
        return await self.request("GET", path, **kw)

    async def post(self, path: str, **kw: Any) -> Reply:
        return await self.request("POST", path, **kw)

    async def patch(self, path: str, **kw: Any) -> Reply:
        return await self.request("PATCH", path, **kw)

    async def put(self, path: str, **kw: Any) -> Reply:
        return await self.request("PUT", path, **kw)

    async def delete(self, path: str, **kw: Any) -> Reply:
        return await self.request("DELETE", path, **kw)

    async def close(self) -> None:
        await self.pool.closeCachedConnections()


class Gateway:
    """
    A gateway node on ephemeral loopback ports, with clients for both.
    """

    def __init__(
        self,
        database: str,
        proxy_spec: str = "tcp:0:interface=127.0.0.1",
        **settings: Any,
    ) -> None:
        self.database = database
        self.proxy_spec = proxy_spec
        self.settings = settings
        self.service: GatewayService | None = None

    async def start(self) -> Gateway:
        settings = Settings(
            proxy=self.proxy_spec,
            admin="tcp:0:interface=127.0.0.1",
            database=self.database,
            **self.settings,
        )
        self.service = GatewayService(reactor, settings)
        self.service.startService()
        await self.service.ready
        assert self.service.proxy_port and self.service.admin_port
        self.proxy_url = f"http://127.0.0.1:{self.service.proxy_port.getHost().port}"
        self.admin_url = f"http://127.0.0.1:{self.service.admin_port.getHost().port}"
        self.admin = Client(self.admin_url)
        self.proxy = Client(self.proxy_url)
        return self

    async def stop(self) -> None:
        if self.service is not None:
            await self.admin.close()
            await self.proxy.close()
            await self.service.stopService()
            self.service = None

    async def configure(
        self, upstream: str, targets: dict[str, int], **fields: Any
    ) -> None:
        """
        Create an upstream with targets (C{host:port} to weight), a service
        on it and a route on C{/}.
        """
        reply = await self.admin.post("/upstreams", form={"name": upstream, **fields})
        assert reply.code == 201, reply.body
        for target, weight in targets.items():
            reply = await self.admin.post(
                f"/upstreams/{upstream}/targets",
                form={"target": target, "weight": weight},
            )
            assert reply.code == 201, reply.body
        reply = await self.admin.post(
            "/services", form={"name": upstream, "host": upstream}
        )
        assert reply.code == 201, reply.body
        reply = await self.admin.post(
            f"/services/{upstream}/routes", form={"paths[]": "/", "strip_path": "false"}
        )
        assert reply.code == 201, reply.body


class TargetResource(Resource):
    """
    A target server for tests: answers with its name, counts hits, and can
    be told to fail, hang or stream.

    @ivar hits: requests received, by path.
    @ivar status: the status to answer with.
    @ivar delay: seconds to wait before answering.
    @ivar requests: every request's method, path, headers and body.
    """

    isLeaf = True

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.hits: Counter[str] = Counter()
        self.status = 200
        self.delay = 0.0
        self.headers: dict[bytes, bytes] = {}
        self.body: bytes | None = None
        self.requests: list[dict[str, Any]] = []

    def render(self, request: Any) -> Any:
        path = request.path.decode()
        self.hits[path] += 1
        request.content.seek(0)
        self.requests.append(
            {
                "method": request.method,
                "uri": request.uri,
                "headers": request.requestHeaders,
                "body": request.content.read(),
            }
        )
        request.setResponseCode(self.status)
        for name, value in self.headers.items():
            request.setHeader(name, value)
        body = self.body if self.body is not None else self.name.encode()
        if self.delay:
            call = reactor.callLater(self.delay, _finish, request, body)
            request.notifyFinish().addErrback(lambda _: call.active() and call.cancel())
            return NOT_DONE_YET
        if b"content-type" not in {k.lower() for k in self.headers}:
            request.setHeader(b"content-type", b"text/plain")
        return body


def _finish(request: Any, body: bytes) -> None:
    request.write(body)
    request.finish()


class SSEResource(Resource):
    """
    An OpenAI-style streaming target: C{count} events, C{interval} apart.

    @ivar sent: the reactor time each event was written.
    @ivar break_after: close the connection abruptly after this many events.
    """

    isLeaf = True

    def __init__(self, count: int = 10, interval: float = 0.1) -> None:
        super().__init__()
        self.count = count
        self.interval = interval
        self.sent: list[float] = []
        self.break_after: int | None = None
        self.usage: dict[str, int] | None = None
        self.connections: list[Any] = []

    def render(self, request: Any) -> Any:
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache")
        self.connections.append(request)

        def send(n: int) -> None:
            if request.finished or request._disconnected:
                return
            if self.break_after is not None and n == self.break_after:
                request.channel.transport.abortConnection()
                return
            if n == self.count:
                if self.usage is not None:
                    final = {
                        "model": "stream-model",
                        "choices": [],
                        "usage": self.usage,
                    }
                    request.write(b"data: " + json.dumps(final).encode() + b"\n\n")
                request.write(b"data: [DONE]\n\n")
                request.finish()
                return
            chunk = {"choices": [{"delta": {"content": f"token{n}"}}]}
            request.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            self.sent.append(reactor.seconds())
            reactor.callLater(self.interval, send, n + 1)

        send(0)
        return NOT_DONE_YET


def listen(resource: Resource, port: int = 0) -> Any:
    """
    Serve C{resource} on 127.0.0.1; returns the listening port.
    """
    return reactor.listenTCP(port, Site(resource), interface="127.0.0.1")


def address(port: Any) -> str:
    """
    The C{host:port} target string of a listening port.
    """
    return f"127.0.0.1:{port.getHost().port}"


async def direct_route(
    gateway: Gateway, servers: list[Any], resource: Resource, **route: str
) -> None:
    """
    Serve C{resource} on a loopback port (closed with C{servers}) and send
    the requests C{route} (a route's form) matches to it, through a
    service C{s} whose host is that port: no upstream in between.
    """
    port = listen(resource)
    servers.append(port)
    host, number = address(port).split(":")
    admin = gateway.admin
    service = {"name": "s", "host": host, "port": number}
    assert (await admin.post("/services", form=service)).code == 201
    assert (await admin.post("/services/s/routes", form=route)).code == 201


# Helpers for the balancing and health end-to-end tests (appended).


class HoldingTarget(TargetResource):
    """
    A target that can hold its answers until told to let them go, and
    that records the order of arrivals across targets.

    @ivar holding: while true, requests are kept in C{held} unanswered.
    @ivar arrivals: a list shared by several targets; each request appends
        the target's name to it on arrival.
    @ivar statuses: per-path status overrides (e.g. C{{"/health": 500}}).
    """

    def __init__(self, name: str, arrivals: list[str] | None = None) -> None:
        super().__init__(name)
        self.holding = False
        self.held: list[Any] = []
        self.arrivals = arrivals if arrivals is not None else []
        self.statuses: dict[str, int] = {}

    def render(self, request: Any) -> Any:
        self.arrivals.append(self.name)
        path = request.path.decode()
        if path in self.statuses:
            self.hits[path] += 1
            request.setResponseCode(self.statuses[path])
            return self.name.encode()
        if not self.holding:
            return super().render(request)
        self.hits[path] += 1
        self.held.append(request)
        request.notifyFinish().addErrback(lambda _: None)
        return NOT_DONE_YET

    def release(self) -> None:
        """
        Answer every held request and stop holding.
        """
        self.holding = False
        held, self.held = self.held, []
        for request in held:
            if not request.finished and not request._disconnected:
                request.setResponseCode(self.status)
                request.write(self.name.encode())
                request.finish()


class TrackingSite(Site):
    """
    A site that keeps its open connections, so a test can kill a target
    the way a crashed process dies: no listener and no open connection.
    """

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource)
        self.protocols: set[Any] = set()

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        self.protocols.add(protocol)
        lost = protocol.connectionLost

        def connection_lost(reason: Any) -> None:
            self.protocols.discard(protocol)
            lost(reason)

        protocol.connectionLost = connection_lost
        return protocol

    def log(self, request: Any) -> None:
        pass


def listen_killable(resource: Resource, port: int = 0) -> Any:
    """
    Like L{listen}, on a L{TrackingSite}, so L{kill} can close it whole.
    """
    return reactor.listenTCP(port, TrackingSite(resource), interface="127.0.0.1")


def hold_targets(
    servers: list[Any],
    names: Any,
    arrivals: list[str] | None = None,
    killable: bool = False,
) -> tuple[dict[str, HoldingTarget], dict[str, Any]]:
    """
    A L{HoldingTarget} per name, listening (and added to C{servers}, to be
    closed after the test); returns C{(resources, ports)} keyed by name.
    """
    resources = {name: HoldingTarget(name, arrivals) for name in names}
    serve = listen_killable if killable else listen
    ports = {name: serve(r) for name, r in resources.items()}
    servers.extend(ports.values())
    return resources, ports


async def kill(port: Any, servers: list[Any] | None = None) -> None:
    """
    Stop listening on C{port} and abort its open connections: the target
    now refuses connections, and pooled ones to it are gone.  C{port} is
    taken out of C{servers} (the fixture's list), as it is closed already.
    """
    if servers is not None and port in servers:
        servers.remove(port)
    await port.stopListening()
    for protocol in list(port.factory.protocols):
        transport = getattr(protocol, "transport", None) or getattr(
            getattr(protocol, "_channel", None), "transport", None
        )
        if transport is not None:
            transport.abortConnection()


async def bounded(count: int, concurrency: int, call: Any) -> list[Any]:
    """
    Run C{await call(i)} for i in range(count), at most C{concurrency} at a
    time; returns the results in order.
    """
    from twisted.internet.defer import gatherResults

    results: list[Any] = [None] * count
    indexes = iter(range(count))

    async def worker() -> None:
        for i in indexes:
            results[i] = await call(i)

    await gatherResults(
        [Deferred.fromCoroutine(worker()) for _ in range(min(count, concurrency))]
    )
    return results


async def scrape(
    gateway: Gateway,
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """
    C{GET /metrics} parsed by prometheus_client, as C{{(sample name, sorted
    labels): value}}.
    """
    from prometheus_client.parser import text_string_to_metric_families

    reply = await gateway.admin.get("/metrics")
    assert reply.code == 200
    samples = {}
    for family in text_string_to_metric_families(reply.body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def sample(samples: dict[Any, float], name: str, **labels: str) -> float:
    """
    One sample's value from L{scrape}'s result (0 when absent).
    """
    return samples.get((name, tuple(sorted(labels.items()))), 0)


async def health_of(gateway: Gateway, upstream: str) -> dict[str, str]:
    """
    C{GET /upstreams/{upstream}/health} as C{{target: health}}.
    """
    reply = await gateway.admin.get(f"/upstreams/{upstream}/health")
    assert reply.code == 200, reply.body
    return {row["target"]: row["health"] for row in reply.json["data"]}


async def wait_for(check: Any, bound: float, step: float = 0.1) -> float:
    """
    Poll C{await check()} every C{step} seconds until it is true; returns
    the seconds it took, or raises C{AssertionError} after C{bound}.
    """
    start = reactor.seconds()
    while True:
        if await check():
            return reactor.seconds() - start
        if reactor.seconds() - start > bound:
            raise AssertionError(f"not within {bound} s")
        await sleep(step)


class _Raw(Protocol):
    """
    Reads a whole HTTP exchange as raw bytes, until the server closes.
    """

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.data = b""
        self.closed: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason) -> None:
        self.closed.callback(self.data)


async def raw_request(port: int, request: bytes) -> bytes:
    protocol = _Raw(request)
    factory = ClientFactory.forProtocol(lambda: protocol)
    reactor.connectTCP("127.0.0.1", port, factory)
    return await protocol.closed


class AigatewayGarbage:
    """
    What a block leaves for the garbage collector, of aigateway's own
    objects: C{with AigatewayGarbage() as garbage: ...}, then
    C{garbage.found} counts them by class name (the block may await).
    """

    def __init__(self) -> None:
        self.found: Counter[str] = Counter()

    def __enter__(self) -> AigatewayGarbage:
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            gc.collect()
            self.found.update(
                type(obj).__qualname__
                for obj in gc.garbage
                if type(obj).__module__.startswith("aigateway.")
            )
        finally:
            gc.set_debug(0)
            gc.garbage.clear()


@contextmanager
def log_events(namespace: str | None = None) -> Iterator[list[dict]]:
    """
    The events logged while the block runs: those of C{namespace} (a
    module's logger, C{"aigateway.feed"}), or every one.
    """
    events: list[dict] = []

    def observe(event: dict) -> None:
        if namespace is None or event.get("log_namespace") == namespace:
            events.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observe)

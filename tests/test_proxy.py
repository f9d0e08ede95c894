"""
The proxy end to end: real gateway, real target servers, real sockets.
"""

from __future__ import annotations

import json
import socket
from collections import Counter
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.protocol import Factory, Protocol
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from .gatewaykit import (
    AigatewayGarbage,
    SSEResource,
    TargetResource,
    address,
    listen,
    raw_request,
    sample,
    scrape,
    sleep,
)


async def add_service(gateway, name: str, url: str, **fields: str) -> None:
    """
    A service for C{url} with C{fields}, and a route to it on C{/name}.
    """
    reply = await gateway.admin.post(
        "/services", form={"name": name, "url": url, **fields}
    )
    assert reply.code == 201, reply.body
    reply = await gateway.admin.post(
        f"/services/{name}/routes", form={"paths[]": f"/{name}"}
    )
    assert reply.code == 201, reply.body


async def spread(gateway, count: int, concurrency: int = 20) -> Counter[bytes]:
    """
    Send C{count} requests through the proxy, C{concurrency} at a time,
    and count the answers by body (each target answers with its name).
    """
    seen: Counter[bytes] = Counter()

    async def worker(n: int) -> None:
        for _ in range(n):
            reply = await gateway.proxy.get("/v1/chat")
            assert reply.code == 200, reply.body
            seen[reply.body] += 1

    per = count // concurrency
    await gatherResults(
        [Deferred.fromCoroutine(worker(per)) for _ in range(concurrency)]
    )
    return seen


@pytest_twisted.ensureDeferred
async def test_weighted_round_robin_spread(gateway, servers):
    """
    Weights 100/100/200 over 4,000 requests: each target's share is within
    2% of its weight share; a weight-0 target is never picked; a weight
    changed by POST applies at once.
    """
    resources = {name: TargetResource(name) for name in ("a", "b", "c", "zero")}
    ports = {name: listen(r) for name, r in resources.items()}
    servers.extend(ports.values())
    weights = {"a": 100, "b": 100, "c": 200, "zero": 0}
    await gateway.configure("llm", {address(ports[n]): w for n, w in weights.items()})
    seen = await spread(gateway, 4000)
    assert sum(seen.values()) == 4000
    assert seen[b"zero"] == 0
    for name, share in (("a", 0.25), ("b", 0.25), ("c", 0.5)):
        assert abs(seen[name.encode()] / 4000 - share) <= 0.02, seen

    reply = await gateway.admin.post(
        "/upstreams/llm/targets", form={"target": address(ports["c"]), "weight": "0"}
    )
    assert reply.code == 200
    assert reply.json["weight"] == 0
    seen = await spread(gateway, 400)
    assert seen[b"c"] == 0 and seen[b"zero"] == 0
    assert abs(seen[b"a"] - seen[b"b"]) <= 2


@pytest_twisted.ensureDeferred
async def test_sse_streams_as_events_arrive(gateway, servers):
    """
    The client receives the first event before the target has sent the
    last one: nothing is buffered whole.
    """
    sse = SSEResource(count=10, interval=0.1)
    servers.append(port := listen(sse))
    await gateway.configure("stream", {address(port): 100})

    received: list[tuple[float, bytes]] = []
    done = _Collector(received)
    pool = HTTPConnectionPool(reactor, persistent=False)
    response = await Agent(reactor, pool=pool).request(
        b"GET", gateway.proxy_url.encode() + b"/v1/chat/completions"
    )
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type") == [b"text/event-stream"]
    response.deliverBody(done)
    await done.finished
    assert len(sse.sent) == 10
    first_arrival = received[0][0]
    assert first_arrival < sse.sent[-1], (first_arrival, sse.sent)
    body = b"".join(chunk for _, chunk in received)
    assert body.count(b"data: ") == 11
    assert body.endswith(b"data: [DONE]\n\n")


class _Collector(Protocol):
    def __init__(self, into):
        self.into = into
        self.finished = Deferred()

    def dataReceived(self, data):
        self.into.append((reactor.seconds(), data))

    def connectionLost(self, reason):
        self.finished.callback(None)


@pytest_twisted.ensureDeferred
async def test_request_forwarding(gateway, servers):
    """
    Method, body, query and headers reach the target; hop-by-hop headers
    do not; X-Forwarded-* and Host are set; the answer carries Via, the
    latency headers and a request id.
    """
    target = TargetResource("t")
    servers.append(port := listen(target))
    await gateway.admin.post(
        "/upstreams", form={"name": "up", "host_header": "api.example.com"}
    )
    await gateway.admin.post("/upstreams/up/targets", form={"target": address(port)})
    await gateway.admin.post(
        "/services", form={"name": "svc", "host": "up", "path": "/base"}
    )
    reply = await gateway.admin.post(
        "/services/svc/routes",
        form={"paths[]": "/openai", "methods[]": ["POST", "GET"]},
    )
    assert reply.code == 201
    body = json.dumps({"model": "gpt-4o", "messages": []}).encode()
    reply = await gateway.proxy.post(
        "/openai/v1/chat?x=1",
        body=body,
        headers={
            "Content-Type": "application/json",
            "Connection": "keep-alive, X-Secret-Hop",
            "X-Secret-Hop": "1",
            "Authorization": "Bearer client",
        },
    )
    assert reply.code == 200, reply.body
    seen = target.requests[-1]
    assert seen["method"] == b"POST"
    assert seen["uri"] == b"/base/v1/chat?x=1"
    assert seen["body"] == body
    headers = seen["headers"]
    # As Kong: the upstream's host_header, with the target's port when it is
    # not the scheme's default.
    assert headers.getRawHeaders(b"host") == [
        b"api.example.com:%d" % port.getHost().port
    ]
    assert headers.getRawHeaders(b"x-secret-hop") is None
    assert headers.getRawHeaders(b"authorization") == [b"Bearer client"]
    assert headers.getRawHeaders(b"x-forwarded-for") == [b"127.0.0.1"]
    assert headers.getRawHeaders(b"x-forwarded-proto") == [b"http"]
    assert headers.getRawHeaders(b"x-forwarded-host") == [b"127.0.0.1"]
    assert reply.headers.getRawHeaders(b"via") == [b"1.1 aigateway/0.1.0"]
    assert reply.headers.getRawHeaders(b"x-request-id")
    assert reply.headers.getRawHeaders(b"x-upstream-latency")
    assert reply.headers.getRawHeaders(b"x-proxy-latency")

    reply = await gateway.proxy.request("DELETE", "/openai/v1/chat")
    assert reply.code == 404
    assert reply.json["message"] == "no Route matched with those values"


@pytest_twisted.ensureDeferred
async def test_gateway_errors(gateway, servers):
    """
    502 when every attempt fails, 503 when no target can be picked, 504
    when the target does not answer within the service's read timeout.
    """
    # A port that was just closed refuses connections.
    closed = listen(TargetResource("gone"))
    dead = address(closed)
    await closed.stopListening()
    await gateway.configure("dead", {dead: 100})
    reply = await gateway.proxy.get("/")
    assert reply.code == 502
    assert (
        reply.json["message"]
        == "An invalid response was received from the upstream server"
    )
    assert (
        reply.json["request_id"]
        == reply.headers.getRawHeaders(b"x-request-id")[0].decode()
    )

    await gateway.admin.patch("/upstreams/dead/targets/" + dead, form={"weight": "0"})
    reply = await gateway.proxy.get("/")
    assert reply.code == 503
    assert reply.json["message"] == "failure to get a peer from the ring-balancer"

    slow = TargetResource("slow")
    slow.delay = 5
    servers.append(port := listen(slow))
    await gateway.admin.post("/upstreams/dead/targets", form={"target": address(port)})
    await gateway.admin.patch(
        "/services/dead", form={"read_timeout": "300", "retries": "0"}
    )
    reply = await gateway.proxy.get("/")
    assert reply.code == 504
    assert reply.json["message"] == "The upstream server is timing out"


@pytest_twisted.ensureDeferred
async def test_direct_service_host(gateway, servers):
    """
    A service whose host is not an upstream goes straight to that host.
    """
    target = TargetResource("direct")
    servers.append(port := listen(target))
    reply = await gateway.admin.post(
        "/services",
        form={"name": "d", "url": f"http://127.0.0.1:{port.getHost().port}/x"},
    )
    assert reply.code == 201, reply.body
    assert reply.json["path"] == "/x"
    await gateway.admin.post("/services/d/routes", form={"paths[]": "/direct"})
    reply = await gateway.proxy.get("/direct/y")
    assert reply.code == 200
    assert reply.body == b"direct"
    assert target.requests[-1]["uri"] == b"/x/y"


@pytest_twisted.ensureDeferred
async def test_client_disconnect_cancels_upstream(gateway, servers):
    """
    A client that goes away mid-stream closes the target connection too.
    """
    sse = SSEResource(count=50, interval=0.05)
    servers.append(port := listen(sse))
    await gateway.configure("stream", {address(port): 100})
    pool = HTTPConnectionPool(reactor, persistent=False)
    response = await Agent(reactor, pool=pool).request(
        b"GET", gateway.proxy_url.encode() + b"/v1/chat/completions"
    )
    collected: list = []
    collector = _Collector(collected)
    response.deliverBody(collector)
    await sleep(0.3)
    collector.transport.stopProducing()
    await collector.finished
    await sleep(0.3)
    upstream_request = sse.connections[-1]
    assert upstream_request._disconnected
    assert len(sse.sent) < 50


@pytest_twisted.ensureDeferred
async def test_oversized_body_rejected(tmp_path, servers):
    """
    A body over --max-body gets a 413 and never reaches a target.
    """
    from .gatewaykit import Gateway

    node = await Gateway(str(tmp_path / "g.db"), max_body=1000).start()
    try:
        target = TargetResource("t")
        servers.append(port := listen(target))
        await node.configure("up", {address(port): 100})
        reply = await node.proxy.post("/", body=b"x" * 5000)
        assert reply.code == 413
        assert not target.requests
        reply = await node.proxy.post("/", body=b"x" * 500)
        assert reply.code == 200
        # A chunked body is cut off as soon as it passes the limit.
        port = node.service.proxy_port.getHost().port
        chunk = b"%x\r\n%s\r\n" % (600, b"y" * 600)
        raw = await raw_request(
            port,
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + chunk * 3,
        )
        assert raw.startswith(b"HTTP/1.1 413 ")
        assert raw.endswith(b'{"message": "Request size limit exceeded"}')
        assert len(target.requests) == 1
    finally:
        await node.stop()


class _Flood(Resource):
    """
    Writes C{size} bytes as fast as its transport takes them.
    """

    isLeaf = True

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.transports: list = []

    def render(self, request):
        self.transports.append(request.channel.transport)
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"content-length", b"%d" % self.size)
        block = b"x" * 65536
        for _ in range(self.size // len(block)):
            request.write(block)
        request.finish()
        return NOT_DONE_YET


def _buffered(transport) -> int:
    return len(transport.dataBuffer) + transport._tempDataLen


@pytest_twisted.ensureDeferred
async def test_slow_client_pauses_the_target(gateway, servers):
    """
    Backpressure: while the client does not read, the gateway stops reading
    from the target, so the answer waits in the target's buffers, not in the
    gateway's memory; once the client reads again, every byte arrives.
    """
    size = 32 * 1024 * 1024
    flood = _Flood(size)
    servers.append(port := listen(flood))
    await gateway.configure("bulk", {address(port): 100})
    pool = HTTPConnectionPool(reactor, persistent=False)
    response = await Agent(reactor, pool=pool).request(
        b"GET", gateway.proxy_url.encode() + b"/big"
    )
    received: list = []
    collector = _Collector(received)
    response.deliverBody(collector)
    collector.transport.pauseProducing()
    await sleep(1.0)
    # Most of the answer still waits at the target: the gateway stopped
    # reading instead of buffering it.
    target_side = _buffered(flood.transports[-1])
    assert target_side > size // 2, target_side
    collector.transport.resumeProducing()
    await collector.finished
    assert sum(len(chunk) for _, chunk in received) == size


@pytest_twisted.ensureDeferred
async def test_hosts_and_preserve_host(gateway, servers):
    """
    Routes match on the Host header (wildcards included, port ignored), and
    preserve_host sends the client's Host to the target.
    """
    a, b = TargetResource("a"), TargetResource("b")
    servers.extend([port_a := listen(a), port_b := listen(b)])
    admin = gateway.admin
    await admin.post(
        "/services", form={"name": "a", "url": f"http://{address(port_a)}"}
    )
    await admin.post(
        "/services", form={"name": "b", "url": f"http://{address(port_b)}"}
    )
    reply = await admin.post(
        "/services/a/routes",
        form={"hosts[]": "*.example.com", "preserve_host": "true", "paths[]": "/"},
    )
    assert reply.code == 201, reply.body
    await admin.post("/services/b/routes", form={"paths[]": "/"})
    reply = await gateway.proxy.get("/x", headers={"Host": "api.example.com:8000"})
    assert reply.body == b"a"
    assert a.requests[-1]["headers"].getRawHeaders(b"host") == [b"api.example.com:8000"]
    reply = await gateway.proxy.get("/x", headers={"Host": "other.org"})
    assert reply.body == b"b"
    assert b.requests[-1]["headers"].getRawHeaders(b"host") == [
        address(port_b).encode()
    ]


@pytest_twisted.ensureDeferred
async def test_exchanges_leave_no_cyclic_garbage(gateway, servers):
    """
    Every object of a finished exchange (JSON answers with usage, a 404, a
    stream) is freed by reference counting: a reference cycle would leave
    them for the garbage collector, whose passes cost the proxy about 20%
    of its CPU and doubled its p99 latency under load.
    """
    target = TargetResource("json")
    # The target closes each connection after its answer: closed target
    # connections must go too.
    target.headers = {b"content-type": b"application/json", b"connection": b"close"}
    target.body = json.dumps(
        {"model": "m", "usage": {"prompt_tokens": 1, "completion_tokens": 2}}
    ).encode()
    sse = SSEResource(count=3, interval=0.01)
    sse.usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    json_port, sse_port = listen(target), listen(sse)
    servers.extend([json_port, sse_port])
    admin = gateway.admin
    for name, port, path in (("llm", json_port, "/v1"), ("stream", sse_port, "/sse")):
        assert (await admin.post("/upstreams", form={"name": name})).code == 201
        reply = await admin.post(
            f"/upstreams/{name}/targets", form={"target": address(port)}
        )
        assert reply.code == 201
        form = {"name": name, "host": name}
        assert (await admin.post("/services", form=form)).code == 201
        form = {"paths[]": path, "strip_path": "false"}
        assert (await admin.post(f"/services/{name}/routes", form=form)).code == 201
    await gateway.proxy.get("/v1/chat")  # warm the pools and caches
    with AigatewayGarbage() as garbage:
        for _ in range(20):
            assert (await gateway.proxy.post("/v1/chat", body=b"{}")).code == 200
        assert (await gateway.proxy.get("/nowhere")).code == 404
        raw = await raw_request(
            gateway.service.proxy_port.getHost().port,
            b"GET /v1/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        assert raw.startswith(b"HTTP/1.1 200 ")
        stream = await gateway.proxy.get("/sse/x")
        assert stream.code == 200 and b"[DONE]" in stream.body
        await sleep(0.05)
    ours = garbage.found
    # Twisted's endpoints keep a cycle per connection attempt (a wrapping
    # factory and its Deferred), which holds the factory of each new target
    # connection: per connection opened, never per request.
    ours.pop("_Connector", None)
    assert not ours


class _SlowReader(Protocol):
    """
    A target that reads a request body C{window} seconds out of every
    C{period} (never, when C{window} is 0), then answers 200.
    """

    def __init__(self, window: float, period: float) -> None:
        self.window = window
        self.period = period
        self.received = 0
        self.expected: int | None = None
        self._head = b""
        self._call: Any = None

    def connectionMade(self) -> None:
        self.transport.pauseProducing()
        if self.window:
            self._call = reactor.callLater(self.period, self._open)

    def _open(self) -> None:
        self.transport.resumeProducing()
        self._call = reactor.callLater(self.window, self._close)

    def _close(self) -> None:
        self.transport.pauseProducing()
        self._call = reactor.callLater(self.period, self._open)

    def dataReceived(self, data: bytes) -> None:
        if self.expected is None:
            self._head += data
            head, found, rest = self._head.partition(b"\r\n\r\n")
            if not found:
                return
            length = [
                line.split(b":", 1)[1]
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ]
            self.expected = int(length[0])
            data = rest
        self.received += len(data)
        if self.received >= self.expected:
            if self._call is not None and self._call.active():
                self._call.cancel()
            self.transport.resumeProducing()
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    def connectionLost(self, reason: Any) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()


@pytest_twisted.ensureDeferred
async def test_write_timeout(tmp_path, servers):
    """
    A target that takes none of a request for the service's
    C{write_timeout} fails it with a 504 long before the read timeout; one
    that keeps taking some, more slowly than C{write_timeout} in all, gets
    the whole request.
    """
    from twisted.internet.protocol import Factory

    from .gatewaykit import Gateway

    node = await Gateway(str(tmp_path / "g.db"), max_body=64 * 1024 * 1024).start()
    try:
        readers: list[_SlowReader] = []
        stalled = reactor.listenTCP(
            0, Factory.forProtocol(lambda: _SlowReader(0, 0)), interface="127.0.0.1"
        )

        def slow() -> _SlowReader:
            readers.append(_SlowReader(window=0.005, period=0.15))
            return readers[-1]

        trickle = reactor.listenTCP(0, Factory.forProtocol(slow), interface="127.0.0.1")
        servers.extend([stalled, trickle])
        # Bigger than what loopback socket buffers absorb, so the rest waits
        # in the gateway until the target reads.
        body = b"x" * (40 * 1024 * 1024)
        for name, port in (("stalled", stalled), ("trickle", trickle)):
            await node.configure(
                name,
                {address(port): 100},
            )
            reply = await node.admin.patch(
                f"/services/{name}",
                form={"write_timeout": "400", "read_timeout": "20000", "retries": "0"},
            )
            assert reply.code == 200, reply.body
            reply = await node.admin.patch(
                f"/routes/{(await node.admin.get(f'/services/{name}/routes')).json['data'][0]['id']}",
                form={"paths[]": f"/{name}"},
            )
            assert reply.code == 200, reply.body

        started = reactor.seconds()
        reply = await node.proxy.post("/stalled", body=body)
        assert reply.code == 504, reply.body
        assert reactor.seconds() - started < 10

        started = reactor.seconds()
        reply = await node.proxy.post("/trickle", body=body)
        assert reply.code == 200, reply.body
        assert reply.body == b"ok"
        assert readers and readers[0].received == len(body)
        # It took longer in all than write_timeout: only progress counted.
        assert reactor.seconds() - started > 0.4
    finally:
        await node.stop()


class _RaisingFor:
    """
    Target endpoints that fail at once, before any connection attempt,
    for one port: a failure the lean agent reports while it is still
    being called.
    """

    def __init__(self, port: int, endpoints: Any) -> None:
        self._port = port
        self._endpoints = endpoints
        self.refused = 0

    def endpointForURI(self, uri: Any) -> Any:
        if uri.port == self._port:
            self.refused += 1
            raise RuntimeError("no endpoint for this target")
        return self._endpoints.endpointForURI(uri)


class _Hangs(Protocol):
    def connectionMade(self) -> None:
        self.transport.write(b"GET /v1/chat HTTP/1.1\r\nHost: x\r\n\r\n")


@pytest_twisted.ensureDeferred
async def test_retry_after_immediate_failure_still_cancellable(gateway, servers):
    """
    An attempt that fails while it is being sent is retried on another
    target, and that retry is the one a client leaving cancels: the
    held target's connection is closed.
    """
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    from aigateway.proxy.client import TargetEndpoints
    from aigateway.proxy.lean import LeanAgent

    from .gatewaykit import HoldingTarget

    held = HoldingTarget("held")
    held.holding = True
    servers.append(held_port := listen(held))
    servers.append(broken_port := listen(TargetResource("broken")))
    await gateway.configure("up", {address(broken_port): 65535, address(held_port): 1})
    agents = gateway.service.agents
    endpoints = _RaisingFor(broken_port.getHost().port, TargetEndpoints(reactor, 60.0))
    agents._agents[(60.0, 60.0)] = LeanAgent(reactor, agents.pool, endpoints, 60.0)
    client = await connectProtocol(
        TCP4ClientEndpoint(
            reactor, "127.0.0.1", gateway.service.proxy_port.getHost().port
        ),
        _Hangs(),
    )
    for _ in range(100):
        if held.held:
            break
        await sleep(0.02)
    assert endpoints.refused == 1
    (request,) = held.held
    assert not request._disconnected
    client.transport.abortConnection()
    for _ in range(100):
        if request._disconnected:
            break
        await sleep(0.02)
    assert request._disconnected


class _Big(Resource):
    isLeaf = True

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def render(self, request: Any) -> bytes:
        return b"b" * self.size


class _Reader(Protocol):
    """
    Sends one request and collects the answer, reading only when told.
    """

    def __init__(self) -> None:
        self.data = b""
        self.ended: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.pauseProducing()
        self.transport.write(
            b"GET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any) -> None:
        self.ended.callback(None)


@pytest_twisted.ensureDeferred
async def test_slow_client_is_not_the_targets_timeout(gateway, servers):
    """
    A client that stops reading for longer than the service's read_timeout
    pauses the target, which is then not silent: the answer is not cut,
    and no passive timeout is counted against the target.
    """
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    size = 16 * 1024 * 1024
    servers.append(port := listen(_Big(size)))
    await gateway.configure("big", {address(port): 100})
    await gateway.admin.patch("/services/big", form={"read_timeout": "300"})
    await gateway.admin.patch(
        "/upstreams/big", form={"healthchecks.passive.unhealthy.timeouts": "1"}
    )
    reader = await connectProtocol(
        TCP4ClientEndpoint(
            reactor, "127.0.0.1", gateway.service.proxy_port.getHost().port
        ),
        _Reader(),
    )
    await sleep(1.0)
    reader.transport.resumeProducing()
    await reader.ended
    head, _, body = reader.data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert len(body) == size
    (health,) = (await gateway.admin.get("/upstreams/big/health")).json["data"]
    assert health["counters"]["timeouts"] == 0
    assert health["health"] == "HEALTHY"


@pytest_twisted.ensureDeferred
async def test_read_timeout_starts_once_the_request_is_sent(tmp_path, servers):
    """
    A body that takes the target longer than the service's read_timeout to
    read (but keeps moving, within write_timeout) is not cut by the read
    timeout: the target's time to answer starts once it has it all.
    """
    from twisted.internet.protocol import Factory

    from .gatewaykit import Gateway

    node = await Gateway(str(tmp_path / "g.db"), max_body=64 * 1024 * 1024).start()
    try:
        readers: list[_SlowReader] = []

        def slow_then_fast() -> _SlowReader:
            # Reads a little every 0.15 s for 1.2 s, then all of it at once.
            reader = _SlowReader(window=0.002, period=0.15)
            readers.append(reader)

            def fast() -> None:
                if reader._call is not None and reader._call.active():
                    reader._call.cancel()
                reader.transport.resumeProducing()

            reactor.callLater(1.2, fast)
            return reader

        port = reactor.listenTCP(
            0, Factory.forProtocol(slow_then_fast), interface="127.0.0.1"
        )
        servers.append(port)
        await node.configure("slow", {address(port): 100})
        reply = await node.admin.patch(
            "/services/slow",
            form={"write_timeout": "2000", "read_timeout": "400", "retries": "0"},
        )
        assert reply.code == 200, reply.body
        # Bigger than what loopback socket buffers absorb: the rest waits in
        # the gateway while the target reads slowly.
        body = b"x" * (40 * 1024 * 1024)
        started = reactor.seconds()
        reply = await node.proxy.post("/", body=body)
        assert reply.code == 200, reply.body
        assert readers and readers[0].received == len(body)
        # The upload outlasted read_timeout twice over at least.
        assert reactor.seconds() - started > 0.8
    finally:
        await node.stop()


@pytest_twisted.ensureDeferred
async def test_a_bug_handling_an_answer_ends_the_exchange(gateway, servers):
    """
    If the gateway's own handling of a target's answer raises, the failure
    is logged and the client gets a 502 at once instead of waiting with
    nothing to time it out; the next request is served as usual.
    """
    target = TargetResource("t")
    servers.append(port := listen(target))
    await gateway.configure("up", {address(port): 100})
    health = gateway.service.runtime.health
    real = health.report_status
    calls: list[int] = []

    def broken(*args: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        real(*args)

    from twisted.logger import globalLogPublisher

    logged: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(logged.append)
    health.report_status = broken
    try:
        reply = await gateway.proxy.get("/x")
        assert reply.code == 502, reply.body
        assert b"invalid response" in reply.body
        assert (await gateway.proxy.get("/x")).code == 200
    finally:
        del health.report_status
        globalLogPublisher.removeObserver(logged.append)
    assert len(calls) == 2
    failures = [e["log_failure"] for e in logged if "log_failure" in e]
    assert len(failures) == 1 and failures[0].check(RuntimeError)


@pytest_twisted.ensureDeferred
async def test_read_timeouts_of_requests_sharing_a_connection(gateway, servers):
    """
    Requests that follow one another on a client connection share its
    timer, and each still gets its own service's read_timeout: a longer
    one is not cut short by the timer a shorter one set before it, and a
    shorter one is not left waiting for the time a longer one set.
    """

    async def service(name: str, delay: float, read_timeout: int) -> None:
        target = TargetResource(name)
        target.delay = delay
        servers.append(port := listen(target))
        await add_service(
            gateway,
            name,
            f"http://127.0.0.1:{port.getHost().port}",
            read_timeout=str(read_timeout),
            retries="0",
        )

    await service("quick", 0, 300)
    await service("patient", 0.8, 3000)
    await service("hanging", 5, 300)
    assert (await gateway.proxy.get("/quick")).body == b"quick"
    # The connection's timer is set to fire 0.3 s after that request: it
    # fires while this one waits, which must go on waiting.
    assert (await gateway.proxy.get("/patient")).body == b"patient"
    # Now it is set 3 s out; this request's 0.3 s must move it sooner.
    began = reactor.seconds()
    reply = await gateway.proxy.get("/hanging")
    assert reply.code == 504
    assert reactor.seconds() - began < 2
    status = (await gateway.admin.get("/status")).json
    assert status["connections"]["client_open"] == 1  # all on one connection


@pytest_twisted.ensureDeferred
async def test_https_target_that_never_handshakes_is_a_timeout(gateway, servers):
    """
    A service on https whose target accepts TCP and never answers the TLS
    handshake gets a 504 within its connect_timeout, not its read_timeout.
    """
    silent = Factory.forProtocol(Protocol)  # accepts, then says nothing
    servers.append(mute := reactor.listenTCP(0, silent, interface="127.0.0.1"))
    await add_service(
        gateway,
        "tls",
        f"https://127.0.0.1:{mute.getHost().port}",
        connect_timeout="300",
        read_timeout="30000",
        retries="0",
    )
    began = reactor.seconds()
    reply = await gateway.proxy.get("/tls")
    assert reply.code == 504
    assert reply.json["message"] == "The upstream server is timing out"
    assert reactor.seconds() - began < 5


@pytest_twisted.ensureDeferred
async def test_a_connect_timeout_is_a_timeout(gateway):
    """
    A target whose listen queue is full (connections are never accepted)
    times out the connect: a 504, counted as a timeout, like nginx.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    filling = []
    try:
        for _ in range(4):  # fill the queue: later connects are not answered
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            filling.append(filler)
        await add_service(
            gateway,
            "full",
            f"http://127.0.0.1:{port}",
            connect_timeout="300",
            retries="0",
        )
        reply = await gateway.proxy.get("/full")
        assert reply.code == 504
        assert reply.json["message"] == "The upstream server is timing out"
        samples = await scrape(gateway)
        assert (
            sample(
                samples,
                "aigateway_upstream_target_requests_total",
                upstream="",
                target=f"127.0.0.1:{port}",
                code="timeout",
            )
            == 1
        )
    finally:
        for filler in filling:
            filler.close()
        listener.close()

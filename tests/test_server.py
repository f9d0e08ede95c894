"""
The proxy's HTTP/1.1 server channel, on a real loopback listener, spoken to
with raw bytes: framing both ways, keep-alive and pipelining, refusals of
malformed or oversized requests, timeouts and clients that go away.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from aigateway.proxy._parser import BadRequest, RequestParser
from aigateway.proxy._transport import send
from aigateway.proxy.server import LentTimer, ProxyFactory, ProxyRequest

from .gatewaykit import raw_request, sleep, wait_for


class Echo(Resource):
    """
    Answers with what it was asked, as JSON; C{/late} answers 50 ms later,
    C{/stream} writes three pieces without a length, C{/empty} is a 204,
    C{/boom} raises, C{/hold} never answers (but records the client
    leaving).
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict[str, Any]] = []
        self.gone: list[bytes] = []

    def render(self, request: ProxyRequest) -> Any:  # type: ignore[override]
        record = {
            "method": request.method.decode(),
            "uri": request.uri.decode(),
            "path": request.path.decode(),
            "body": request.body.decode("latin-1"),
            "secure": request.isSecure(),
            "host": (request.getHeader(b"host") or b"").decode(),
        }
        self.seen.append(record)
        path = request.path
        if path == b"/boom":
            raise RuntimeError("boom")
        if path == b"/empty":
            request.setResponseCode(204)
            return b""
        if path == b"/hold":
            request.notifyFinish().addErrback(lambda _: self.gone.append(path))
            return NOT_DONE_YET
        if path == b"/stream":
            for piece in (b"one", b"two", b"three"):
                request.write(piece)
            request.finish()
            return NOT_DONE_YET
        body = json.dumps(record).encode()
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-length", b"%d" % len(body))
        if path == b"/late":
            reactor.callLater(0.05, lambda: (request.write(body), request.finish()))
            return NOT_DONE_YET
        return body


class BodyReader(Protocol):
    """
    Collects a response body; C{done} fires with it.
    """

    def __init__(self) -> None:
        self.body = bytearray()
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.body.extend(data)

    def connectionLost(self, reason: Any) -> None:
        self.done.callback(bytes(self.body))


class Conversation(Protocol):
    """
    A client connection that collects what the server sends.
    """

    def __init__(self) -> None:
        self.data = b""
        self.closed: Deferred[None] = Deferred()
        self.is_closed = False

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any) -> None:
        self.is_closed = True
        self.closed.callback(None)

    async def until(self, count: bytes, times: int = 1, bound: float = 5.0) -> None:
        async def enough() -> bool:
            return self.data.count(count) >= times or self.is_closed

        await wait_for(enough, bound, 0.01)


async def connect(port: int) -> Conversation:
    protocol = Conversation()
    connected: Deferred[Any] = Deferred()

    class Once(ClientFactory):
        def buildProtocol(self, addr: Any) -> Conversation:
            connected.callback(None)
            return protocol

    reactor.connectTCP("127.0.0.1", port, Once())
    await connected
    await sleep(0.01)
    return protocol


@pytest.fixture
def served() -> Any:
    """
    An L{Echo} behind a L{ProxyFactory} (1 kB body limit), on a real port.
    """
    resource = Echo()
    factory = ProxyFactory(resource, 1024, reactor)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    yield resource, port.getHost().port, factory
    port.stopListening()


@pytest.fixture
def clocked() -> Any:
    """
    An L{Echo} behind a L{ProxyFactory} whose timers run on a L{Clock}
    (10 s idle timeout), on a real port: C{(clock, factory, port number)}.
    """
    clock = Clock()
    factory = ProxyFactory(Echo(), 1024, clock, idle_timeout=10)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    yield clock, factory, port.getHost().port
    port.stopListening()


def responses(data: bytes) -> list[tuple[bytes, bytes]]:
    """
    Split raw bytes into (head, rest) at each status line.
    """
    parts = data.split(b"HTTP/1.1 ")[1:]
    return [tuple(part.split(b"\r\n\r\n", 1)) for part in parts]  # type: ignore[misc]


@pytest_twisted.ensureDeferred
async def test_keep_alive_serves_several_requests_on_one_connection(served):
    resource, port, _ = served
    client = await connect(port)
    for n in range(3):
        client.transport.write(b"GET /a?n=%d HTTP/1.1\r\nHost: x\r\n\r\n" % n)
        await client.until(b"HTTP/1.1 200 OK", n + 1)
    assert not client.is_closed
    assert [seen["uri"] for seen in resource.seen] == ["/a?n=0", "/a?n=1", "/a?n=2"]
    assert resource.seen[0]["path"] == "/a" and resource.seen[0]["host"] == "x"
    heads = [head for head, _ in responses(client.data)]
    assert all(b"Content-Length: " in head for head in heads)
    assert all(b"Server: aigateway/" in head and b"Date: " in head for head in heads)
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_pipelined_requests_are_answered_in_order(served):
    """
    The second request arrives before the first is answered (C{/late}):
    it waits, and the answers come in request order.
    """
    resource, port, _ = served
    client = await connect(port)
    client.transport.write(
        b"GET /late HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /now HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"
        b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    await client.closed
    bodies = [json.loads(rest)["uri"] for _, rest in responses(client.data)]
    assert bodies == ["/late", "/now", "/last"]
    assert resource.seen[1]["body"] == "hi"
    assert b"Connection: close" in responses(client.data)[2][0]


@pytest_twisted.ensureDeferred
async def test_absolute_form_routes_on_its_path(served):
    resource, port, _ = served
    raw = await raw_request(
        port,
        b"GET http://example.com/v1/x?y=1 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    )
    assert raw.startswith(b"HTTP/1.1 200 OK")
    assert resource.seen[0]["path"] == "/v1/x"
    assert resource.seen[0]["uri"] == "http://example.com/v1/x?y=1"
    # Its authority wins over the Host header.
    raw = await raw_request(
        port,
        b"GET http://api.test:8080 HTTP/1.1\r\nHost: other\r\nConnection: close\r\n\r\n",
    )
    assert raw.startswith(b"HTTP/1.1 200 OK")
    assert (
        resource.seen[1]["path"] == "/" and resource.seen[1]["host"] == "api.test:8080"
    )
    # No path before the query: the authority stops at the "?".
    raw = await raw_request(
        port,
        b"GET http://api.test?y=1 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    )
    assert raw.startswith(b"HTTP/1.1 200 OK")
    assert resource.seen[2]["host"] == "api.test" and resource.seen[2]["path"] == "/"


@pytest_twisted.ensureDeferred
async def test_chunked_request_body_is_decoded(served):
    resource, port, _ = served
    raw = await raw_request(
        port,
        b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n"
        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\n",
    )
    assert raw.startswith(b"HTTP/1.1 200 OK")
    assert resource.seen[0]["body"] == "hello world"


@pytest_twisted.ensureDeferred
async def test_response_framing_without_a_length(served):
    """
    An HTTP/1.1 client gets a chunked answer and keeps its connection; an
    HTTP/1.0 client gets the body until the close.
    """
    _, port, _ = served
    client = await connect(port)
    client.transport.write(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
    await client.until(b"0\r\n\r\n")
    head, rest = responses(client.data)[0]
    assert b"Transfer-Encoding: chunked" in head
    assert rest == b"3\r\none\r\n3\r\ntwo\r\n5\r\nthree\r\n0\r\n\r\n"
    assert not client.is_closed
    client.transport.loseConnection()

    raw = await raw_request(port, b"GET /stream HTTP/1.0\r\n\r\n")
    head, rest = raw.split(b"\r\n\r\n", 1)
    assert b"Connection: close" in head and b"chunked" not in head
    assert rest == b"onetwothree"


@pytest_twisted.ensureDeferred
async def test_http_1_0_keep_alive_when_asked(served):
    _, port, _ = served
    client = await connect(port)
    for _ in range(2):
        client.transport.write(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    await client.until(b"HTTP/1.1 200", 2)
    assert not client.is_closed
    assert all(b"Connection: keep-alive" in h for h, _ in responses(client.data))
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_no_body_for_head_and_204(served):
    _, port, _ = served
    client = await connect(port)
    client.transport.write(
        b"HEAD /a HTTP/1.1\r\nHost: x\r\n\r\nGET /empty HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    await client.closed
    (head1, rest1), (head2, rest2), (head3, rest3) = responses(client.data)
    assert head1.startswith(b"200 OK") and b"Content-Length: " in head1
    assert rest1 == b""
    assert head2.startswith(b"204 No Content") and rest2 == b""
    assert b"Content-Length" not in head2 and b"chunked" not in head2
    assert json.loads(rest3)["path"] == "/a"


@pytest_twisted.ensureDeferred
async def test_expect_100_continue(served):
    resource, port, _ = served
    client = await connect(port)
    client.transport.write(
        b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
        b"Expect: 100-continue\r\n\r\n"
    )
    await client.until(b"100 Continue")
    assert client.data == b"HTTP/1.1 100 Continue\r\n\r\n"
    client.transport.write(b"body")
    await client.until(b"200 OK")
    assert resource.seen[0]["body"] == "body"
    client.transport.loseConnection()


@pytest.mark.parametrize(
    "request_bytes,status",
    [
        (b"GARBAGE\r\n\r\n", b"400"),
        (b"GET /a HTTP/2.0\r\n\r\n", b"505"),
        (b"G(T /a HTTP/1.1\r\n\r\n", b"400"),
        (b"GET a HTTP/1.1\r\n\r\n", b"400"),
        (b"GET /a HTTP/1.1\r\nHost: x\r\nNo colon\r\n\r\n", b"400"),
        (b"GET /a HTTP/1.1\r\nHost: x\r\nBad Name: x\r\n\r\n", b"400"),
        (b"GET /a HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", b"400"),
        (b"GET /a HTTP/1.1\r\nHost: x\r\nX: a\nY: b\r\n\r\n", b"400"),
        (b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: x\r\n\r\n", b"400"),
        (
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"400",
        ),
        (b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", b"501"),
        (
            b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Length: 3\r\n\r\n0\r\n\r\n",
            b"501",
        ),
        (
            b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"400",
        ),
        (b"GET /a HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 70000 + b"\r\n\r\n", b"431"),
        (b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 1025\r\n\r\n", b"413"),
        (
            b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"200\r\n"
            + b"a" * 512
            + b"\r\n"
            + b"201\r\n"
            + b"a" * 513
            + b"\r\n",
            b"413",
        ),
        (b"GET /a\rb HTTP/1.1\r\nHost: x\r\n\r\n", b"400"),
        (b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nX-A: 1\r\r\n\r\n", b"400"),
        (b"GET /a HTTP/1.1\r\nX-A: 1\r\n\r\n", b"400"),
        (b"GET http://example.com/a HTTP/1.1\r\n\r\n", b"400"),
        (b"OPTIONS * HTTP/1.1\r\n\r\n", b"400"),
        (
            b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
            b"0\r\n\r\n",
            b"501",
        ),
        (
            b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"501",
        ),
        (b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", b"400"),
        (b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: a\x01b\r\n\r\n", b"400"),
        (b"GET /a HTTP/1.1\r\nHost: a b/c@d\r\n\r\n", b"400"),
        # Lines ending in bare LFs: refused at once, not after a timeout.
        (b"GET /a HTTP/1.1\nHost: x\n\n", b"400"),
    ],
    ids=[
        "garbage",
        "http-2",
        "bad-method",
        "bad-target",
        "no-colon",
        "bad-header-name",
        "two-hosts",
        "bare-lf",
        "bad-length",
        "conflicting-lengths",
        "gzip-coding",
        "chunked-and-length",
        "bad-chunk-size",
        "head-too-large",
        "body-too-large",
        "chunked-too-large",
        "bare-cr-in-request-line",
        "bare-cr-after-a-remembered-line",
        "http-1.1-without-host",
        "http-1.1-absolute-form-without-host",
        "http-1.1-asterisk-without-host",
        "gzip-then-chunked",
        "chunked-twice",
        "nul-in-value",
        "control-in-value",
        "invalid-host",
        "bare-lf-lines",
    ],
)
@pytest_twisted.ensureDeferred
async def test_refusals_answer_json_and_close(served, request_bytes, status):
    """
    Each malformed or oversized request gets its status with a JSON body,
    and the connection is closed (whatever follows cannot be framed); the
    resource never sees it.
    """
    resource, port, _ = served
    raw = await raw_request(
        port, request_bytes + b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    head, body = raw.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 " + status), raw[:200]
    assert b"Connection: close" in head
    assert "message" in json.loads(body)
    assert resource.seen == []


@pytest_twisted.ensureDeferred
async def test_a_failing_resource_gets_a_500_and_the_server_goes_on(served):
    _, port, _ = served
    raw = await raw_request(port, b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 500 ")
    raw = await raw_request(
        port, b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert raw.startswith(b"HTTP/1.1 200 OK")


@pytest_twisted.ensureDeferred
async def test_client_leaving_is_told_to_the_request(served):
    resource, port, factory = served
    client = await connect(port)
    client.transport.write(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")

    async def seen() -> bool:
        return bool(resource.seen)

    await wait_for(seen, 5, 0.01)
    assert factory.open_connections == 1
    client.transport.loseConnection()

    async def gone() -> bool:
        return resource.gone == [b"/hold"]

    await wait_for(gone, 5, 0.01)
    assert factory.open_connections == 0


@pytest_twisted.ensureDeferred
async def test_idle_and_slow_clients_are_timed_out(clocked):
    """
    With a 10 s idle timeout: a keep-alive connection left idle is closed
    silently; a client that stops in the middle of its request head gets a
    408; a connection whose response is in progress is left alone.
    """
    clock, factory, number = clocked
    idle = await connect(number)
    idle.transport.write(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    await idle.until(b"200 OK")
    slow = await connect(number)
    slow.transport.write(b"GET /a HTTP/1.1\r\nHost:")
    busy = await connect(number)
    busy.transport.write(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
    await sleep(0.05)
    clock.advance(5)
    await sleep(0.05)
    assert not (idle.is_closed or slow.is_closed or busy.is_closed)
    clock.advance(10)
    await idle.closed
    await slow.closed
    assert idle.data.count(b"HTTP/1.1") == 1
    assert slow.data.startswith(b"HTTP/1.1 408 ")
    await sleep(0.05)
    assert not busy.is_closed
    busy.transport.loseConnection()
    await busy.closed


@pytest_twisted.ensureDeferred
async def test_send_writes_through_and_queues_the_rest():
    """
    L{send} on a real connection whose peer does not read: what the kernel
    does not take is queued, and every byte arrives, in order, once the
    peer reads.
    """
    received = bytearray()
    done: Deferred[None] = Deferred()
    server: list[Any] = []

    class Sink(Protocol):
        def connectionMade(self) -> None:
            server.append(self.transport)
            self.transport.pauseProducing()

        def dataReceived(self, data: bytes) -> None:
            received.extend(data)
            if len(received) >= total:
                done.callback(None)

    class Source(Protocol):
        pass

    payload = bytes(range(256)) * 4096  # 1 MB
    total = 3 * len(payload) + 5
    factory = ClientFactory.forProtocol(Sink)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    source = Source()
    connected: Deferred[Any] = Deferred()

    class Once(ClientFactory):
        def buildProtocol(self, addr: Any) -> Source:
            reactor.callLater(0, connected.callback, None)
            return source

    reactor.connectTCP("127.0.0.1", port.getHost().port, Once())
    await connected
    transport = source.transport
    transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    send(transport, payload)
    assert transport.dataBuffer or transport._tempDataBuffer  # some was queued
    send(transport, b"-mid-")  # queued behind it, never sent ahead
    send(transport, payload)
    send(transport, payload)
    await sleep(0.05)
    server[0].resumeProducing()
    await done
    assert bytes(received) == payload + b"-mid-" + payload + payload
    transport.loseConnection()
    await port.stopListening()


class ParserTests(SynchronousTestCase):
    """
    L{RequestParser} on its own, fed byte by byte and whole.
    """

    def parse(self, data: bytes, step: int) -> tuple[list[Any], bytes, bytes]:
        heads: list[Any] = []
        body: list[bytes] = []
        parser = RequestParser(heads.append, body.append)
        parser.expect()
        for i in range(0, len(data), step):
            parser.feed(data[i : i + step])
            if parser.complete:
                rest = parser.leftover + data[i + step :]
                return heads, b"".join(body), rest
        raise AssertionError("incomplete")

    def test_split_anywhere(self) -> None:
        data = (
            b"\r\nPOST /p?q=1 HTTP/1.1\r\nHost: h\r\nX-A: 1\r\nX-A: 2\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nNEXT"
        )
        for step in (1, 2, 7, len(data)):
            heads, body, rest = self.parse(data, step)
            head = heads[0]
            assert (head.method, head.uri, head.version) == (
                b"POST",
                b"/p?q=1",
                b"HTTP/1.1",
            )
            assert head.headers.getRawHeaders(b"x-a") == [b"1", b"2"]
            assert not head.headers.hasHeader(b"transfer-encoding")
            assert head.length is None and head.keep_alive
            assert body == b"abc" and rest == b"NEXT", step

    def test_versions_and_persistence(self) -> None:
        cases = {
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n": True,
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n": False,
            b"GET / HTTP/1.0\r\n\r\n": False,
            b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n": True,
        }
        for data, keep_alive in cases.items():
            heads, _, _ = self.parse(data, len(data))
            assert heads[0].keep_alive is keep_alive, data

    def test_http_1_0_no_continue_and_no_keep_alive_after_chunked(self) -> None:
        """
        HTTP/1.0 has no 100 Continue, and a Transfer-Encoding in an
        HTTP/1.0 request closes the connection after the answer.
        """
        data = (
            b"POST / HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 2\r\n"
            b"Expect: 100-continue\r\n\r\nok"
        )
        heads, _, _ = self.parse(data, len(data))
        assert not heads[0].expect_continue and heads[0].keep_alive
        data = (
            b"POST / HTTP/1.0\r\nConnection: keep-alive\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
        )
        heads, body, _ = self.parse(data, len(data))
        assert body == b"ok" and not heads[0].keep_alive
        data = data.replace(b"HTTP/1.0\r\n", b"HTTP/1.1\r\nHost: x\r\n")
        heads, body, _ = self.parse(data, len(data))
        assert body == b"ok" and heads[0].keep_alive

    def test_absolute_form(self) -> None:
        data = b"GET http://example.com/v1/x?y HTTP/1.1\r\nHost: h\r\n\r\n"
        heads, _, _ = self.parse(data, len(data))
        assert heads[0].uri == b"http://example.com/v1/x?y"

    def test_refusals_carry_a_status(self) -> None:
        parser = RequestParser(lambda head: None, lambda body: None, max_head=100)
        parser.expect()
        with self.assertRaises(BadRequest) as raised:
            parser.feed(b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 200)
        assert raised.exception.status == 431


@pytest.mark.filterwarnings("ignore::DeprecationWarning:OpenSSL.*")
@pytest_twisted.ensureDeferred
async def test_serves_over_tls():
    """
    Over a TLS listener the channel writes through TLS (not the plain TCP
    write-through) and the request says it is secure; keep-alive holds.
    """
    from twisted.internet import ssl

    from aigateway.proxy._connection import LeanPool
    from aigateway.proxy.client import TargetEndpoints
    from aigateway.proxy.lean import LeanAgent

    from .tlskit import certificate

    cert, key = certificate("127.0.0.1")
    options = ssl.PrivateCertificate.loadPEM(cert + key).options()
    resource = Echo()
    factory = ProxyFactory(resource, 1024, reactor)
    port = reactor.listenSSL(0, factory, options, interface="127.0.0.1")
    endpoints = TargetEndpoints(reactor, 5, trust_root=ssl.Certificate.loadPEM(cert))
    pool = LeanPool(reactor)
    agent = LeanAgent(reactor, pool, endpoints)
    url = f"https://127.0.0.1:{port.getHost().port}/tls".encode()
    try:
        for _ in range(2):
            response = await agent.request(b"GET", url)
            assert response.code == 200
            reader = BodyReader()
            response.deliverBody(reader)
            body = await reader.done
            assert json.loads(body)["secure"] is True
        assert factory.open_connections == 1
    finally:
        await pool.closeCachedConnections()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_dripping_head_and_a_client_that_never_reads_are_cut_off(clocked):
    """
    A request head sent a line at a time still gets its 408 once
    C{idle_timeout} has passed since its first byte; a connection closing
    after its answer, whose client reads none of the rest, is aborted once
    C{close_grace} has passed since it last took any (the connection is
    looked at every quarter of it).
    """
    clock, factory, number = clocked
    drip = await connect(number)
    drip.transport.write(b"GET /a HTTP/1.1\r\nHost: x\r\n")
    for n in range(4):
        await sleep(0.02)
        clock.advance(2)
        drip.transport.write(b"X-%d: y\r\n" % n)
    await sleep(0.02)
    assert not drip.is_closed
    clock.advance(3)  # 11 s since the first byte, 3 s since the last
    await drip.closed
    assert drip.data.startswith(b"HTTP/1.1 408 ")

    # An 8 MB answer and a close, to a client that stops reading.
    big = _Fixed.body
    factory.resource = _Fixed()
    # (Longer than close_grace, so that what aborts it is the closing.)
    factory.idle_timeout = 100
    stuck = await connect(number)
    stuck.transport.pauseProducing()
    stuck.transport.write(b"GET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    await sleep(0.2)
    assert factory.open_connections == 1
    clock.advance(factory.close_grace - 1)
    await sleep(0.05)
    assert factory.open_connections == 1
    # That look saw what the kernel took after the close: from it, a whole
    # grace with nothing taken, looked at every quarter.
    for _ in range(3):
        clock.advance(factory.close_grace / 4)
        await sleep(0.02)
        assert factory.open_connections == 1
    clock.advance(factory.close_grace / 4)
    await sleep(0.05)
    assert factory.open_connections == 0
    stuck.transport.resumeProducing()  # now it sees the abort
    await stuck.closed
    assert len(stuck.data) < len(big)


async def _stalled_on_endless(clocked: Any, size: int) -> tuple[Any, Any, list[Any]]:
    """
    A client that is not reading, sent C{size} bytes of an answer that is
    never finished: C{(client, its channel, what the request heard of the
    client going away)}.
    """
    _, factory, number = clocked
    gone: list[Any] = []

    class Endless(Resource):
        isLeaf = True

        def render(self, request: Any) -> Any:
            request.write(b"z" * size)
            request.when_gone(gone.append)
            return NOT_DONE_YET

    factory.resource = Endless()
    client = await connect(number)
    client.transport.pauseProducing()
    client.transport.write(b"GET /endless HTTP/1.1\r\nHost: x\r\n\r\n")
    await sleep(0.2)
    channel = next(iter(factory._channels))
    assert channel.write_paused
    return client, channel, gone


@pytest_twisted.ensureDeferred
async def test_a_client_that_takes_nothing_of_a_response_is_dropped(clocked):
    """
    A client that takes none of a response still being written, for
    C{idle_timeout}, is dropped (nginx's C{send_timeout}), and the request
    hears it went away; until then it is kept, however long the response.
    """
    clock, factory, _ = clocked
    _, _, gone = await _stalled_on_endless(clocked, 4 * 1024 * 1024)
    for _ in range(18):  # to 9 s, in steps shorter than the sweeper's period
        clock.advance(0.5)
    await sleep(0.05)
    assert factory.open_connections == 1 and not gone
    # Dropped within a sweeper period (2.5 s) of idle_timeout after the
    # last bytes left: the kernel may still move some to the client's
    # side just after the pause.
    for _ in range(9):  # to 13.5 s
        clock.advance(0.5)
    await sleep(0.05)
    assert factory.open_connections == 0
    assert len(gone) == 1


@pytest_twisted.ensureDeferred
async def test_a_slow_client_that_keeps_reading_is_kept(clocked):
    """
    A client that takes some of the response at every step, however
    little, is slow, not gone: it is kept past C{idle_timeout}, though its
    write buffer never empties (so the channel stays paused).
    """
    clock, _, _ = clocked
    slow, channel, gone = await _stalled_on_endless(clocked, 64 * 1024 * 1024)
    for _ in range(30):  # 15 s of the clock, some bytes taken at each step
        before = len(slow.data)
        slow.transport.resumeProducing()
        for _ in range(200):
            await sleep(0.002)
            if len(slow.data) - before >= 64 * 1024:
                break
        slow.transport.pauseProducing()
        assert len(slow.data) > before
        clock.advance(0.5)
        await sleep(0.01)
    assert channel.write_paused
    assert not slow.is_closed and not gone
    slow.transport.abortConnection()


async def _read_slowly(
    clocked: Any, request: bytes, steps: int, small_buffer: bool
) -> tuple[int, bool]:
    """
    A raw client that sends C{request}, then takes 16 kB of the answer per
    half second of the clock for C{steps} steps: C{(bytes taken, whether
    the gateway closed on it)}.  With C{small_buffer} the gateway's side
    of the connection gets a small kernel send buffer.
    """
    clock, factory, number = clocked
    if small_buffer:
        build = factory.buildProtocol

        def small(addr: Any) -> Any:
            channel = build(addr)
            made = channel.connectionMade

            def connection_made() -> None:
                channel.transport.socket.setsockopt(
                    socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024
                )
                made()

            channel.connectionMade = connection_made
            return channel

        factory.buildProtocol = small
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    client.connect(("127.0.0.1", number))
    client.setblocking(False)
    client.sendall(request)
    await sleep(0.2)
    taken, closed = 0, False
    try:
        for _ in range(steps):
            step = 0
            for _ in range(50):
                try:
                    data = client.recv(min(4096, 16 * 1024 - step))
                except BlockingIOError:
                    await sleep(0.002)
                    continue
                except ConnectionResetError:
                    data = b""
                if not data:
                    closed = True
                    break
                step += len(data)
                if step >= 16 * 1024:
                    break
            taken += step
            if closed:
                break
            clock.advance(0.5)
            await sleep(0.01)
    finally:
        client.close()
    return taken, closed


class _Fixed(Resource):
    """
    An 8 MB answer with its length, written and finished at once.
    """

    isLeaf = True
    body = b"z" * (8 * 1024 * 1024)

    def render(self, request: Any) -> bytes:
        request.setHeader(b"content-length", b"%d" % len(self.body))
        return self.body


@pytest.mark.parametrize("small_buffer", [False, True])
@pytest_twisted.ensureDeferred
async def test_slow_readers_are_kept_whatever_the_kernel_buffers(clocked, small_buffer):
    """
    A client taking 16 kB every half second (for twice C{idle_timeout}) is
    kept, whether the unsent bytes wait in Twisted's queue or in a large
    kernel send buffer (which takes more only once half of it has gone),
    and whether the answer is still being written or already finished.
    """
    _, factory, _ = clocked
    gone: list[Any] = []

    class Endless(Resource):
        isLeaf = True

        def render(self, request: Any) -> Any:
            request.write(b"z" * (16 * 1024 * 1024))
            request.when_gone(gone.append)
            return NOT_DONE_YET

    factory.resource = Endless()
    request = b"GET /e HTTP/1.1\r\nHost: x\r\n\r\n"
    taken, closed = await _read_slowly(clocked, request, 40, small_buffer)
    assert not closed and not gone, taken
    factory.resource = _Fixed()
    taken, closed = await _read_slowly(clocked, request, 40, small_buffer)
    assert not closed, taken


class LentTimerTests(SynchronousTestCase):
    """
    L{LentTimer}: one call for a connection's requests in turn.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.timer = LentTimer(self.clock)
        self.called: list[str] = []

    def lend(self, name: str, delay: float) -> None:
        self.timer.lend(name, lambda: self.called.append(name), delay)

    def test_fires_for_its_borrower(self) -> None:
        self.lend("a", 5)
        self.clock.advance(4.9)
        assert self.called == []
        self.clock.advance(0.1)
        assert self.called == ["a"] and self.clock.getDelayedCalls() == []

    def test_released_fires_for_nobody(self) -> None:
        self.lend("a", 5)
        self.timer.release("a")
        self.clock.advance(5)
        assert self.called == []

    def test_a_new_borrower_takes_it_over(self) -> None:
        self.lend("a", 5)
        self.timer.release("a")
        self.lend("b", 5)
        self.timer.release("a")  # (a is done with it already: b keeps it)
        self.clock.advance(5)
        assert self.called == ["b"]

    def test_sooner_moves_it_later_does_not(self) -> None:
        self.lend("a", 5)
        self.lend("b", 2)
        self.clock.advance(2)
        assert self.called == ["b"]
        self.lend("c", 5)
        self.lend("d", 30)
        (call,) = self.clock.getDelayedCalls()
        assert call.getTime() == 7  # set by c: d is called early, at 7
        self.clock.advance(5)
        assert self.called == ["b", "d"]

    def test_stop_cancels(self) -> None:
        self.lend("a", 5)
        self.timer.release("a")
        self.timer.stop()
        assert self.clock.getDelayedCalls() == []
        self.clock.advance(5)
        assert self.called == []

    def test_stopped_while_lent_fires_for_its_borrower(self) -> None:
        """
        A connection gone while an exchange still waits on its target (its
        client was answered already): the exchange keeps its timeout, and
        the call goes once the exchange lets go.
        """
        self.lend("a", 5)
        self.timer.stop()
        self.clock.advance(5)
        assert self.called == ["a"]
        self.lend("a", 5)  # (called early, it borrows again)
        self.timer.release("a")
        assert self.clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_a_slow_client_draining_a_closing_answer_is_kept(clocked):
    """
    A connection closing after its answer is aborted after C{close_grace}
    only if its client took nothing in that time: one that keeps taking
    some, however slowly, gets the whole answer.
    """
    clock, factory, number = clocked
    big = _Fixed.body
    factory.resource = _Fixed()
    slow = await connect(number)
    # A small receive buffer (no autotuning), so that most of the answer
    # waits in the gateway for the client to take it.
    slow.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
    slow.transport.pauseProducing()
    slow.transport.write(b"GET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    await sleep(0.2)
    for _ in range(4):  # four graces in all, each with some taken
        slow.transport.resumeProducing()
        await sleep(0)
        slow.transport.pauseProducing()
        await sleep(0.02)
        clock.advance(factory.close_grace)
        await sleep(0.02)
        assert factory.open_connections == 1
    slow.transport.resumeProducing()
    await slow.closed
    assert slow.data.count(b"z") == len(big)

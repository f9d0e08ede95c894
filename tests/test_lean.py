"""
The lean HTTP/1.1 client against real loopback servers: twisted.web sites,
and raw TCP servers that send crafted (sometimes broken) answers.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor, ssl
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import (
    PotentialDataLoss,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface.verify import verifyObject

from aigateway.proxy._parser import BadResponse, ResponseParser
from aigateway.proxy.client import Agents, TargetEndpoints
from aigateway.proxy.lean import LeanAgent, LeanPool
from aigateway.proxy.relay import BytesProducer

from .gatewaykit import AigatewayGarbage, sleep
from .tlskit import certificate

_ENDED = Failure(ResponseDone())

# -- servers ------------------------------------------------------------


class _Echo(Resource):
    """
    Answers with the method, path and body it got, and who asked (the
    client port shows which connection carried the request).
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.ports: list[int] = []
        self.held: list[Any] = []

    def render(self, request: Any) -> bytes:
        self.ports.append(request.getClientAddress().port)
        if request.path == b"/stream":
            # Chunked: one piece now, the rest when the test says so.
            request.write(b"first")
            self.held.append(request)
            return NOT_DONE_YET
        if request.path == b"/empty":
            request.setResponseCode(204)
            return b""
        body = request.content.read()
        request.setHeader(b"x-seen", request.method + b" " + request.uri)
        return b"echo:" + body


class _Scripted(Protocol):
    """
    Reads requests (head and C{Content-Length} body) and answers each with
    the next item of the factory's script: bytes, or a callable given this
    protocol.
    """

    factory: _ScriptedFactory

    def connectionMade(self) -> None:
        self.buffer = b""
        self.factory.connections.append(self)
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            found = re.search(rb"(?i)content-length: *(\d+)", head)
            length = int(found.group(1)) if found else 0
            if len(rest) < length:
                return
            self.buffer = rest[length:]
            self.factory.requests.append(head + b"\r\n\r\n" + rest[:length])
            answer = self.factory.script.pop(0)
            if callable(answer):
                answer(self)
            else:
                self.transport.write(answer)  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = _ENDED) -> None:
        self.lost.callback(None)


class _ScriptedFactory(Factory):
    protocol = _Scripted
    noisy = False

    def __init__(self, script: list[bytes | Callable[[_Scripted], None]]) -> None:
        self.script = script
        self.requests: list[bytes] = []
        self.connections: list[_Scripted] = []


@attrs.define
class _Client:
    agent: LeanAgent
    pool: LeanPool

    def url(self, port: Any, path: str = "/") -> bytes:
        return f"http://127.0.0.1:{port.getHost().port}{path}".encode()

    def idle(self) -> int:
        return sum(len(c) for c in self.pool._connections.values())


@pytest_twisted.async_yield_fixture
async def client() -> AsyncIterator[_Client]:
    pool = LeanPool(reactor)
    yield _Client(LeanAgent(reactor, pool, TargetEndpoints(reactor, 5)), pool)
    await pool.closeCachedConnections()


@pytest_twisted.async_yield_fixture
async def echo() -> AsyncIterator[tuple[_Echo, Any]]:
    resource = _Echo()
    port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
    yield resource, port
    for request in resource.held:
        if not request.finished and not request._disconnected:
            request.finish()
    await port.stopListening()


@pytest_twisted.async_yield_fixture
async def scripted() -> AsyncIterator[Callable[..., tuple[_ScriptedFactory, Any]]]:
    ports = []

    def serve(*script: bytes | Callable[[_Scripted], None]) -> Any:
        factory = _ScriptedFactory(list(script))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        ports.append(port)
        return factory, port

    yield serve
    for port in ports:
        await port.stopListening()


class _Body(Protocol):
    """
    Collects a response body, and when it ended and why.
    """

    def __init__(self, on_data: Callable[[_Body, bytes], None] | None = None) -> None:
        self.chunks: list[bytes] = []
        self.ended: Deferred[None] = Deferred()
        self.reason: Failure | None = None
        self._on_data = on_data

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)
        if self._on_data is not None:
            self._on_data(self, data)

    def connectionLost(self, reason: Failure = _ENDED) -> None:
        # Wrapped: a Deferred called with a Failure would errback.
        self.reason = reason
        self.ended.callback(None)

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)


async def _read(response: Any) -> tuple[bytes, Failure]:
    body = _Body()
    response.deliverBody(body)
    await body.ended
    reason = body.reason
    return body.body, reason


def _answer(body: bytes, *headers: bytes, status: bytes = b"200 OK") -> bytes:
    lines = [b"HTTP/1.1 " + status, b"Content-Length: %d" % len(body), *headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


async def _failure(d: Deferred[Any]) -> Failure:
    try:
        await d
    except Exception:
        return Failure()
    raise AssertionError("no failure")


# -- keep-alive and framing ----------------------------------------------


@pytest_twisted.ensureDeferred
async def test_keep_alive_reuses_connection(client: _Client, echo: Any) -> None:
    """
    Sequential requests go over one connection, which waits in the pool
    between them; Content-Length is framing, kept out of the headers.
    """
    resource, port = echo
    for n in range(3):
        body = BytesProducer(b"hello %d" % n)
        response = await client.agent.request(
            b"POST", client.url(port, "/a?b=1"), Headers(), body
        )
        assert response.code == 200 and response.phrase == b"OK"
        assert response.length == len(b"echo:hello 0")
        assert not response.headers.hasHeader(b"content-length")
        assert response.headers.getRawHeaders(b"x-seen") == [b"POST /a?b=1"]
        data, reason = await _read(response)
        assert data == b"echo:hello %d" % n
        assert reason.check(ResponseDone)
    assert len(set(resource.ports)) == 1
    assert client.idle() == 1


@pytest_twisted.ensureDeferred
async def test_interfaces(client: _Client, echo: Any) -> None:
    _, port = echo
    assert verifyObject(IAgent, client.agent)
    response = await client.agent.request(b"GET", client.url(port))
    assert verifyObject(IResponse, response)
    await _read(response)


@pytest_twisted.ensureDeferred
async def test_chunked_delivered_as_it_arrives(client: _Client, echo: Any) -> None:
    """
    A chunked body's first piece reaches the protocol while the server has
    not yet written the rest.
    """
    resource, port = echo
    first: Deferred[None] = Deferred()
    body = _Body(lambda b, data: None if first.called else first.callback(None))
    response = await client.agent.request(b"GET", client.url(port, "/stream"))
    assert response.length is UNKNOWN_LENGTH
    response.deliverBody(body)
    await first
    assert body.body == b"first" and not body.ended.called
    held = resource.held.pop()
    held.write(b"second")
    held.finish()
    await body.ended
    reason = body.reason
    assert reason.check(ResponseDone)
    assert body.body == b"firstsecond"
    await sleep(0)
    assert client.idle() == 1


@pytest_twisted.ensureDeferred
async def test_close_delimited(client: _Client, scripted: Any) -> None:
    """
    A body without length ends with the connection: PotentialDataLoss,
    and the connection is not kept.
    """

    def answer(server: _Scripted) -> None:
        server.transport.write(b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\nsome")  # type: ignore[union-attr]
        server.transport.write(b" body")  # type: ignore[union-attr]
        server.transport.loseConnection()  # type: ignore[union-attr]

    _, port = scripted(answer)
    response = await client.agent.request(b"GET", client.url(port))
    assert response.length is UNKNOWN_LENGTH
    data, reason = await _read(response)
    assert data == b"some body" and reason.check(PotentialDataLoss)
    assert client.idle() == 0


@pytest_twisted.ensureDeferred
async def test_no_body_responses(client: _Client, echo: Any, scripted: Any) -> None:
    """
    HEAD, 204 and 304 answers have no body, whatever Content-Length says,
    and the connection carries the next request.
    """
    resource, port = echo
    response = await client.agent.request(b"HEAD", client.url(port))
    assert response.code == 200 and response.length == 0
    assert await _read(response) == (b"", _DONE_MATCH)
    response = await client.agent.request(b"GET", client.url(port, "/empty"))
    assert response.code == 204
    assert (await _read(response))[0] == b""
    response = await client.agent.request(b"GET", client.url(port))
    assert (await _read(response))[0] == b"echo:"
    assert len(set(resource.ports)) == 1

    factory, port = scripted(
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\nETag: x\r\n\r\n",
        _answer(b"next"),
    )
    response = await client.agent.request(b"GET", client.url(port))
    assert response.code == 304 and response.headers.getRawHeaders(b"etag") == [b"x"]
    assert (await _read(response))[0] == b""
    response = await client.agent.request(b"GET", client.url(port))
    assert (await _read(response))[0] == b"next"
    assert len(factory.connections) == 1


class _Done:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, Failure) and bool(other.check(ResponseDone))


_DONE_MATCH: Any = _Done()


@pytest_twisted.ensureDeferred
async def test_informational_skipped(client: _Client, scripted: Any) -> None:
    _, port = scripted(b"HTTP/1.1 100 Continue\r\n\r\n" + _answer(b"real"))
    response = await client.agent.request(b"GET", client.url(port))
    assert response.code == 200
    assert await _read(response) == (b"real", _DONE_MATCH)


@pytest.mark.parametrize(
    "answer",
    [
        _answer(b"bye", b"Connection: close"),
        b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nbye",
        _answer(b"bye") + b"HTTP/1.1 200 OK\r\n",
    ],
    ids=["connection-close", "http-1.0", "trailing-bytes"],
)
@pytest_twisted.ensureDeferred
async def test_not_reused(client: _Client, scripted: Any, answer: bytes) -> None:
    """
    C{Connection: close}, HTTP/1.0 without keep-alive, or bytes after the
    answer: the response is fine, the connection is not kept.
    """
    factory, port = scripted(answer, answer)
    for _ in range(2):
        response = await client.agent.request(b"GET", client.url(port))
        assert await _read(response) == (b"bye", _DONE_MATCH)
        await sleep(0)
        assert client.idle() == 0
    assert len(factory.connections) == 2


@pytest_twisted.ensureDeferred
async def test_http10_keep_alive(client: _Client, scripted: Any) -> None:
    answer = b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok"
    factory, port = scripted(answer, answer)
    for _ in range(2):
        response = await client.agent.request(b"GET", client.url(port))
        assert (await _read(response))[0] == b"ok"
    assert len(factory.connections) == 1


@pytest_twisted.ensureDeferred
async def test_pool_limits(client: _Client, echo: Any) -> None:
    """
    Idle connections beyond the per-key cap are closed; idle ones are
    closed after the idle timeout.
    """
    _, port = echo
    pool = LeanPool(reactor, max_idle_per_key=1, idle_timeout=0.2)
    agent = LeanAgent(reactor, pool, TargetEndpoints(reactor, 5))
    responses = [await agent.request(b"GET", client.url(port)) for _ in range(2)]
    for response in responses:
        await _read(response)
    assert sum(len(c) for c in pool._connections.values()) == 1
    await sleep(0.5)
    assert pool._connections == {}
    await pool.closeCachedConnections()


# -- failures -----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_idle_connection_closed_by_target_is_retried(
    client: _Client, scripted: Any
) -> None:
    """
    The target closes a pooled connection as the next request reaches it,
    before answering: the request is sent again on a new connection, once.
    """
    factory, port = scripted(
        _answer(b"one"),
        lambda server: server.transport.loseConnection(),  # type: ignore[union-attr]
        _answer(b"two"),
    )
    response = await client.agent.request(
        b"POST", client.url(port), None, BytesProducer(b"x")
    )
    assert (await _read(response))[0] == b"one"
    response = await client.agent.request(
        b"POST", client.url(port), None, BytesProducer(b"y")
    )
    assert (await _read(response))[0] == b"two"
    assert len(factory.connections) == 2
    assert factory.requests[1] == factory.requests[2]
    assert factory.requests[2].endswith(b"\r\n\r\ny")


@pytest_twisted.ensureDeferred
async def test_fresh_connection_closed_is_not_retried(
    client: _Client, scripted: Any
) -> None:
    factory, port = scripted(lambda server: server.transport.loseConnection())  # type: ignore[union-attr]
    failure = await _failure(client.agent.request(b"GET", client.url(port)))
    assert failure.check(ResponseNeverReceived)
    assert len(factory.connections) == 1


@pytest_twisted.ensureDeferred
async def test_connection_refused(client: _Client) -> None:
    port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    url = client.url(port)
    await port.stopListening()
    failure = await _failure(client.agent.request(b"GET", url))
    assert failure.check(ConnectionRefusedError)


@pytest_twisted.ensureDeferred
async def test_cancel_before_head_aborts(client: _Client, scripted: Any) -> None:
    """
    Cancelling while the head is awaited fails the request with
    CancelledError and drops the connection.
    """
    factory, port = scripted(lambda server: None)
    d = client.agent.request(b"GET", client.url(port))
    while not factory.requests:
        await sleep(0.01)
    d.cancel()
    assert (await _failure(d)).check(CancelledError)
    await factory.connections[0].lost
    assert client.idle() == 0


class _Receiver:
    """
    Records what L{LeanAgent.dispatch} tells its receiver.
    """

    def __init__(self) -> None:
        self.outcomes: list[Any] = []
        self.told: Deferred[None] = Deferred()

    def response_received(self, response: Any) -> None:
        self.outcomes.append(response)
        self.told.callback(None)

    def request_failed(self, failure: Failure) -> None:
        self.outcomes.append(failure)
        self.told.callback(None)


@pytest_twisted.ensureDeferred
async def test_dispatch_tells_the_receiver_once(client: _Client, echo: Any) -> None:
    """
    L{LeanAgent.dispatch} sends to an authority and path, no URI, and hands
    the response to its receiver; a late cancel changes nothing.
    """
    _, port = echo
    receiver = _Receiver()
    authority = b"127.0.0.1:%d" % port.getHost().port
    request = client.agent.dispatch(
        b"POST",
        b"http",
        authority,
        b"/d?x=1",
        Headers(),
        BytesProducer(b"hi"),
        receiver,
    )
    assert request is not None
    await receiver.told
    (response,) = receiver.outcomes
    assert response.headers.getRawHeaders(b"x-seen") == [b"POST /d?x=1"]
    assert (await _read(response))[0] == b"echo:hi"
    request.cancel()
    assert receiver.outcomes == [response]


@pytest_twisted.ensureDeferred
async def test_dispatch_cancel(client: _Client, scripted: Any) -> None:
    """
    Cancelling a dispatched request tells the receiver of a
    L{CancelledError}, once, and drops the connection.
    """
    factory, port = scripted(lambda server: None)
    receiver = _Receiver()
    authority = b"127.0.0.1:%d" % port.getHost().port
    request = client.agent.dispatch(
        b"GET", b"http", authority, b"/", None, None, receiver
    )
    assert request is not None
    while not factory.requests:
        await sleep(0.01)
    request.cancel()
    request.cancel()
    (failure,) = receiver.outcomes
    assert failure.check(CancelledError)
    await factory.connections[0].lost
    assert client.idle() == 0


class _BrokenProducer(BytesProducer):
    def startProducing(self, consumer: Any) -> Deferred[None]:
        raise RuntimeError("no body today")


def test_request_failing_at_once_leaves_no_cycle() -> None:
    """
    L{LeanAgent.request} whose connection cannot even be attempted fails
    its Deferred at once and leaves nothing for the garbage collector.
    """

    class Raising:
        def endpointForURI(self, uri: Any) -> Any:
            raise RuntimeError("no endpoint")

    agent = LeanAgent(reactor, LeanPool(reactor), Raising())  # type: ignore[arg-type]
    with AigatewayGarbage() as garbage:
        d = agent.request(b"GET", b"http://127.0.0.1:1/x")
        failures: list[Failure] = []
        d.addErrback(failures.append)
        assert failures and failures[0].check(RuntimeError)
        del d, failures
    assert not garbage.found, garbage.found


def test_dispatch_body_failure_at_once() -> None:
    """
    A body producer that fails at once fails the dispatch at once: the
    receiver is told, nothing is sent, and no request is returned.
    """
    pool = LeanPool(reactor)
    agent = LeanAgent(reactor, pool, TargetEndpoints(reactor, 5))
    receiver = _Receiver()
    producer = _BrokenProducer(b"x")
    producer.in_memory = None  # type: ignore[assignment]  # make it produce
    request = agent.dispatch(
        b"POST", b"http", b"127.0.0.1:9", b"/", None, producer, receiver
    )
    assert request is None
    (failure,) = receiver.outcomes
    assert failure.check(RequestTransmissionFailed)
    assert pool._connections == {}


class _NeverConnects:
    """
    Endpoints whose connection attempts hang until cancelled.
    """

    cancelled = False

    def endpointForURI(self, uri: Any) -> _NeverConnects:
        return self

    def connect(self, factory: Any) -> Deferred[Any]:
        return Deferred(lambda d: setattr(self, "cancelled", True))


@pytest_twisted.ensureDeferred
async def test_cancel_while_connecting() -> None:
    endpoints = _NeverConnects()
    agent = LeanAgent(reactor, LeanPool(reactor), endpoints)  # type: ignore[arg-type]
    d = agent.request(b"GET", b"http://192.0.2.1:80/")
    d.cancel()
    assert (await _failure(d)).check(CancelledError)
    assert endpoints.cancelled


@pytest_twisted.ensureDeferred
async def test_stop_producing_mid_body_aborts(client: _Client, echo: Any) -> None:
    resource, port = echo
    response = await client.agent.request(b"GET", client.url(port, "/stream"))
    body = _Body(lambda b, data: b.transport.stopProducing())  # type: ignore[union-attr]
    response.deliverBody(body)
    await body.ended
    reason = body.reason
    assert reason.check(ResponseFailed) and not reason.check(ResponseDone)
    assert body.body == b"first"
    held = resource.held[0]
    await held.notifyFinish().addErrback(lambda f: None)
    assert client.idle() == 0


@pytest_twisted.ensureDeferred
async def test_pause_and_resume(client: _Client, scripted: Any) -> None:
    """
    Pausing the body stops reading from the target until resumed.
    """
    size = 16 * 1024 * 1024
    _, port = scripted(_answer(b"x" * size))
    response = await client.agent.request(b"GET", client.url(port))
    body = _Body(lambda b, data: b.transport.pauseProducing())  # type: ignore[union-attr]
    response.deliverBody(body)
    await sleep(0.05)
    paused = len(body.chunks)
    await sleep(0.2)
    assert len(body.chunks) == paused and len(body.body) < size
    body._on_data = None
    response.resumeProducing()
    await body.ended
    reason = body.reason
    assert reason.check(ResponseDone) and len(body.body) == size


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
        _answer(b"0123456789")[:-7],
    ],
    ids=["mid-chunk", "short-length"],
)
@pytest_twisted.ensureDeferred
async def test_broken_body(client: _Client, scripted: Any, answer: bytes) -> None:
    def send(server: _Scripted) -> None:
        server.transport.write(answer)  # type: ignore[union-attr]
        server.transport.loseConnection()  # type: ignore[union-attr]

    _, port = scripted(send)
    response = await client.agent.request(b"GET", client.url(port))
    data, reason = await _read(response)
    assert reason.check(ResponseFailed) and not reason.check(PotentialDataLoss)
    assert data in (b"hel", b"012")


@pytest_twisted.ensureDeferred
async def test_malformed(client: _Client, scripted: Any) -> None:
    _, port = scripted(b"NOT HTTP\r\n\r\n")
    failure = await _failure(client.agent.request(b"GET", client.url(port)))
    assert failure.check(ResponseFailed)
    assert failure.value.reasons[0].check(BadResponse)  # type: ignore[union-attr]

    bad_chunk = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\nzz\r\n"
    )
    _, port = scripted(bad_chunk)
    response = await client.agent.request(b"GET", client.url(port))
    data, reason = await _read(response)
    assert data == b"ok" and reason.check(ResponseFailed)
    assert client.idle() == 0


# -- TLS and the Agents switch ---------------------------------------------


@pytest.mark.filterwarnings("ignore::DeprecationWarning:OpenSSL.*")
@pytest_twisted.ensureDeferred
async def test_https() -> None:
    """
    https targets go through TargetEndpoints' TLS, certificate checked,
    with keep-alive as over TCP; an untrusted certificate fails.
    """
    cert, key = certificate("127.0.0.1")
    options = ssl.PrivateCertificate.loadPEM(cert + key).options()
    resource = _Echo()
    port = reactor.listenSSL(0, Site(resource), options, interface="127.0.0.1")
    url = f"https://127.0.0.1:{port.getHost().port}/".encode()
    trusted = TargetEndpoints(reactor, 5, trust_root=ssl.Certificate.loadPEM(cert))
    pool = LeanPool(reactor)
    agent = LeanAgent(reactor, pool, trusted)
    try:
        for _ in range(2):
            response = await agent.request(b"GET", url)
            assert await _read(response) == (b"echo:", _DONE_MATCH)
        assert len(set(resource.ports)) == 1
        untrusted = LeanAgent(reactor, pool, TargetEndpoints(reactor, 5))
        await pool.closeCachedConnections()
        assert await _failure(untrusted.request(b"GET", url))
    finally:
        await pool.closeCachedConnections()
        await port.stopListening()


class _Mute(Protocol):
    """
    Accepts a connection and never says anything: no TLS handshake.
    """

    def connectionMade(self) -> None:
        self.factory.opened.append(self)  # type: ignore[attr-defined]

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.closed.append(self)  # type: ignore[attr-defined]


@contextlib.asynccontextmanager
async def _silent_https(connect_timeout: float) -> AsyncIterator[Any]:
    """
    A lean agent with C{connect_timeout} and the https URL of a server
    that never answers a handshake: C{(its factory, with the connections
    C{opened} and C{closed}, the agent, the URL)}.
    """
    factory: Any = Factory.forProtocol(_Mute)
    factory.opened, factory.closed = [], []
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    pool = LeanPool(reactor)
    agent = LeanAgent(reactor, pool, TargetEndpoints(reactor, connect_timeout))
    try:
        yield factory, agent, f"https://127.0.0.1:{port.getHost().port}/".encode()
    finally:
        await pool.closeCachedConnections()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_tls_handshake_never_answered_times_out() -> None:
    """
    An https target that accepts the connection but never answers the
    handshake fails the request within the connect timeout, with a
    timeout (as nginx's proxy_connect_timeout), and the connection is
    dropped; nothing waits for a read timeout.
    """
    async with _silent_https(0.3) as (factory, agent, url):
        began = reactor.seconds()
        failure = await _failure(agent.request(b"GET", url))
        assert failure.check(TimeoutError), failure
        assert "TLS handshake" in failure.getErrorMessage()
        assert reactor.seconds() - began < 2
        await sleep(0.1)
        assert len(factory.opened) == 1
        assert len(factory.closed) == 1


@pytest_twisted.ensureDeferred
async def test_cancelled_during_the_tls_handshake() -> None:
    """
    A request given up while its connection's handshake is pending fails
    with a cancellation, and the connection is dropped.
    """
    async with _silent_https(30) as (factory, agent, url):
        pending = agent.request(b"GET", url)
        await sleep(0.2)
        assert len(factory.opened) == 1
        pending.cancel()
        failure = await _failure(pending)
        assert failure.check(CancelledError), failure
        await sleep(0.1)
        assert len(factory.closed) == 1


def test_agents_lean_by_default() -> None:
    agents = Agents(reactor)
    assert isinstance(agents.pool, LeanPool)
    assert isinstance(agents.agent(5.0), LeanAgent)
    assert agents.agent(5.0) is agents.agent(5.0)
    assert not isinstance(Agents(reactor, lean=False).agent(5.0), LeanAgent)


# -- the parser, byte by byte ------------------------------------------------


class ParserTests(SynchronousTestCase):
    """
    L{ResponseParser} on its own.
    """

    def parse(self, data: bytes, step: int = 1, head: bool = False) -> Any:
        heads: list[Any] = []
        body: list[bytes] = []
        parser = ResponseParser(heads.append, body.append)
        parser.expect(head)
        for i in range(0, len(data), step):
            parser.feed(data[i : i + step])
        return heads, b"".join(body), parser

    def assert_refused(self, data: bytes) -> None:
        with self.assertRaises(BadResponse, msg=repr(data)):
            self.parse(data, len(data))

    def test_chunked_byte_by_byte(self) -> None:
        data = (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n"
            b"Set-Cookie: a\r\nset-cookie: b\r\n\r\n"
            b"5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\nTrailer: x\r\n\r\n"
        )
        for step in (1, 3, len(data)):
            heads, body, parser = self.parse(data, step)
            assert body == b"hello0123456789" and parser.complete
            assert heads[0].headers.getRawHeaders(b"set-cookie") == [b"a", b"b"]
            assert not heads[0].headers.hasHeader(b"transfer-encoding")
            assert heads[0].keep_alive and not parser.trailing

    def test_header_lines_remembered_within_bounds(self) -> None:
        """
        A header line seen before is read from the parser's memory of
        lines, with the same result; lines that fail are never kept, long
        lines are not kept, and the memory stops growing at its bound.
        """
        from aigateway.proxy import _parser

        answer = (
            b"HTTP/1.1 200 OK\r\nX-Twice:  same value \t\r\nContent-Length: 2\r\n"
            b"Connection: keep-alive\r\n\r\nok"
        )
        first = self.parse(answer)[0][0]
        assert b"X-Twice:  same value \t" in _parser._LINES
        again = self.parse(answer)[0][0]
        for head in (first, again):
            assert head.headers.getRawHeaders(b"x-twice") == [b"same value"]
            assert head.length == 2 and head.keep_alive
        with pytest.raises(BadResponse):
            self.parse(b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n")
        assert b"Bad Name: x" not in _parser._LINES
        long = b"X-Long: " + b"v" * _parser._MAX_LINE_KEPT
        self.parse(b"HTTP/1.1 204 No Content\r\n" + long + b"\r\n\r\n")
        assert long not in _parser._LINES
        # Credentials and lines that differ on every message are not kept.
        secret = b"Set-Cookie: session=s3cr3t"
        date = b"Date: Tue, 01 Dec 2026 23:50:01 GMT"
        head = self.parse(
            b"HTTP/1.1 204 No Content\r\n%s\r\n%s\r\n\r\n" % (secret, date)
        )
        assert head[0][0].headers.getRawHeaders(b"set-cookie") == [b"session=s3cr3t"]
        assert secret not in _parser._LINES and date not in _parser._LINES
        # Full, it starts afresh: what came last is kept, the bound holds.
        saved = dict(_parser._LINES)
        self.addCleanup(lambda: (_parser._LINES.clear(), _parser._LINES.update(saved)))
        for n in range(_parser._MAX_LINES + 10):
            self.parse(b"HTTP/1.1 204 No Content\r\nX-N: %d\r\n\r\n" % n)
        assert len(_parser._LINES) <= _parser._MAX_LINES
        assert b"X-N: %d" % (_parser._MAX_LINES + 9) in _parser._LINES

    def test_bare_cr_or_lf_refused_anywhere(self) -> None:
        """
        A CR or LF that does not end a line is refused in the status line,
        in a header line never seen, and in one that differs from a
        remembered line only by it.
        """
        ok = b"HTTP/1.1 204 No Content\r\nX-Seen: v\r\n\r\n"
        assert self.parse(ok, len(ok))[0]  # now remembered
        for data in [
            b"HTTP/1.1 204 No\rContent\r\n\r\n",
            b"HTTP/1.1 204 No\nContent\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\nX-Seen: v\r\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\nX-Seen: v\nX-Other: w\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\nX-New: \rv\r\n\r\n",
            # In an interim head, whose lines are otherwise dropped unread.
            b"HTTP/1.1 103 Early Hints\r\nLink: </a>\n\nHTTP/1.1 204 OK\r\n\r\n",
        ]:
            self.assert_refused(data)

    def test_head_request(self) -> None:
        heads, body, parser = self.parse(
            b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n", head=True
        )
        assert heads[0].length == 0 and parser.complete

    def test_refused(self) -> None:
        for data in [
            b"HTTP/2 200 OK\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nA: b\nC: d\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 0x10\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nA: b\r\n folded\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nNo colon\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1_0\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokXX",
        ]:
            self.assert_refused(data)

    def test_framing(self) -> None:
        heads, body, parser = self.parse(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok"
        )
        assert heads[0].length == 2 and body == b"ok" and parser.complete
        heads, body, parser = self.parse(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc"
        )
        assert parser.close_delimited() and not heads[0].keep_alive
        heads, _, parser = self.parse(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Length: 3\r\n\r\n0\r\n\r\n"
        )
        assert parser.complete and not heads[0].keep_alive
        heads, _, _ = self.parse(_answer(b"", b"Connection: keep-alive, Close"))
        assert not heads[0].keep_alive
        assert heads[0].headers.getRawHeaders(b"connection") == [b"keep-alive, Close"]

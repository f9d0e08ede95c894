# -*- test-case-name: tests.test_lean -*-
"""
Pooled connections to targets and the responses they carry, for
L{aigateway.proxy.lean}.

A connection carries one request at a time.  After a complete response
that allows keep-alive it goes back to its L{LeanPool}, keyed by scheme and
authority; the pool keeps a bounded number per key and closes those left
idle too long (a target such as nginx closes idle connections after 75 s
by default, so the pool lets go of them first).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, DeferredList, TimeoutError, succeed
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import IHandshakeListener, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.web.client import PotentialDataLoss, ResponseDone, ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from zope.interface import implementer

from ._parser import BadResponse, ResponseHead, ResponseParser
from ._transport import plain, queued, send

if TYPE_CHECKING:
    from .lean import LeanRequest

# Connection states.
_IDLE = 0  # in the pool
_WAITING = 1  # request written, response head not yet complete
_BODY = 2  # response head delivered, body in progress
_CLOSED = 3  # dropped: nothing it receives matters any more
_TUNNEL = 4  # switched protocols (101): bytes both ways until it closes

#: (scheme, authority), and for TLS to a name other than the authority's
#: host, without verification or against a service's own CAs, (scheme,
#: authority, (server name, verify, CA trust or None)): a connection is
#: reused only for what it was opened for.
Key = tuple[Any, ...]
"""
What pooled connections are kept by: the scheme and the authority
(C{host:port}) of the request URI.
"""
_RESPONSE_DONE = Failure(ResponseDone())
_DELIVERED = object()
_DATA_LOSS = Failure(PotentialDataLoss())


@implementer(IHandshakeListener)
class _Connection(Protocol):
    """
    One connection to a target: carries one request at a time, and goes
    back to its L{LeanPool} after each complete keep-alive response.
    """

    def __init__(self, pool: LeanPool, key: Key) -> None:
        self.pool = pool
        self.key = key
        self.state = _WAITING
        self.parser = ResponseParser(self._head, self._body)
        self.request: LeanRequest | None = None
        self.response: LeanResponse | None = None
        self.keep_alive = False
        self.reused = False
        self.paused = False
        self.idle_since = 0.0
        self._lost: list[Deferred[None]] = []
        self._write_timer: Any = None
        self._handshaken = False
        self._handshake: Deferred[None] | None = None

    def handshakeCompleted(self) -> None:
        """
        The TLS handshake is done (L{IHandshakeListener}).
        """
        self._handshaken = True
        waiting, self._handshake = self._handshake, None
        if waiting is not None:
            waiting.callback(None)

    def handshake_done(self) -> Deferred[None]:
        """
        A L{Deferred} that fires once the TLS handshake is done (at once if
        it is), fails if the connection is lost first, and drops the
        connection when cancelled.
        """
        if self._handshaken:
            return succeed(None)

        def give_up(_: Deferred[None]) -> None:
            self._handshake = None
            self.abort()

        waiting: Deferred[None] = Deferred(give_up)
        self._handshake = waiting
        return waiting

    def send(self, request: LeanRequest, data: bytes) -> None:
        """
        Write a whole request; the response goes to C{request}.
        """
        self.state = _WAITING
        self.request = request
        self.parser.expect(request.no_body)
        if not send(self.transport, data):
            timeout = request.agent.write_timeout
            if timeout:
                self._watch_write(timeout, queued(self.transport))

    def _watch_write(self, timeout: float, left: int) -> None:
        """
        Part of the request is still queued: give up if the target takes
        none of it for C{timeout} seconds (the service's C{write_timeout},
        which, as nginx's C{proxy_send_timeout}, bounds the time between
        two successive writes, not the whole transmission).
        """
        if left:
            self._write_timer = self.pool.reactor.callLater(
                timeout, self._check_write, timeout, left
            )

    def _check_write(self, timeout: float, before: int) -> None:
        self._write_timer = None
        request = self.request
        if self.state != _WAITING or request is None:
            return
        left = queued(self.transport)
        if left and left >= before:
            self.request = None
            self.abort()
            request.fail(
                Failure(
                    TimeoutError(f"the target read none of the request for {timeout} s")
                )
            )
        else:
            self._watch_write(timeout, left)

    def dataReceived(self, data: bytes) -> None:
        state = self.state
        if state == _IDLE:
            # The target spoke out of turn (say, a 408 before closing): the
            # connection cannot be trusted with another request.
            self.pool.remove(self)
            self.abort()
            return
        if state >= _CLOSED:
            if state == _TUNNEL:
                self.response.deliver(data)  # type: ignore[union-attr]
            return
        parser = self.parser
        try:
            parser.feed(data)
        except BadResponse:
            self._bad(Failure())
            return
        if parser.complete:
            state = self.state
            if state == _BODY:
                self._complete()
            elif state == _TUNNEL and parser.leftover:
                # What the target sent right after its 101, in the same read.
                leftover, parser.leftover = parser.leftover, b""
                self.response.deliver(leftover)  # type: ignore[union-attr]

    def _head(self, head: ResponseHead) -> None:
        if self._write_timer is not None:
            # Answered (early, perhaps) while the request was being sent.
            self._write_timer.cancel()
            self._write_timer = None
        request = self.request
        assert request is not None
        if head.code == 101:
            if not request.upgrade:
                # A switch nobody asked for: what follows cannot be read.
                raise BadResponse(
                    "101 Switching Protocols to a request without Upgrade"
                )
            state = _TUNNEL
        else:
            state = _BODY
        self.request = None
        response = LeanResponse(head, self)
        self.response = response
        self.keep_alive = head.keep_alive
        self.state = state
        request.succeed(response)

    def _body(self, data: bytes) -> None:
        response = self.response
        if response is not None:
            response.deliver(data)

    def _complete(self) -> None:
        response = self.response
        assert response is not None
        self.response = None
        # Back to the pool before the body's consumer hears of the end, so
        # the next request, which that may well start, can reuse it.
        if self.keep_alive and not self.parser.trailing:
            if self.paused:
                self.paused = False
                self.transport.resumeProducing()  # type: ignore[union-attr]
            self.pool.put(self)
        else:
            self.state = _CLOSED
            self.transport.loseConnection()  # type: ignore[union-attr]
        response.end(_RESPONSE_DONE)

    def _bad(self, failure: Failure) -> None:
        state = self.state
        request, response = self.request, self.response
        self.request = self.response = None
        complete = self.parser.complete
        self.abort()
        reason = Failure(ResponseFailed([failure]))
        if state == _WAITING and request is not None:
            request.fail(reason)
        elif state == _BODY and response is not None:
            # Bytes after a complete response spoil the connection, not the
            # response.
            response.end(_RESPONSE_DONE if complete else reason)

    def abort(self) -> None:
        """
        Drop the connection at once: it is in an unknown state.
        """
        self.state = _CLOSED
        self.parser.stop()
        self.transport.abortConnection()  # type: ignore[union-attr]

    def closed(self) -> Deferred[None]:
        """
        A L{Deferred} that fires when the connection is closed.
        """
        d: Deferred[None] = Deferred()
        self._lost.append(d)
        return d

    def connectionLost(self, reason: Failure = _RESPONSE_DONE) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        state = self.state
        self.state = _CLOSED
        if state == _IDLE:
            self.pool.remove(self)
        elif state == _WAITING:
            request = self.request
            self.request = None
            if request is not None:
                request.lost(self, reason)
        elif state in (_BODY, _TUNNEL):
            response = self.response
            self.response = None
            if response is not None:
                if state == _TUNNEL and reason.check(ConnectionDone):
                    # The target closed the tunnel: its usual end.
                    response.end(_RESPONSE_DONE)
                elif self.parser.close_delimited():
                    response.end(_DATA_LOSS)
                else:
                    response.end(Failure(ResponseFailed([reason])))
        waiting, self._handshake = self._handshake, None
        if waiting is not None:
            waiting.errback(reason)
        lost, self._lost = self._lost, []
        for d in lost:
            d.callback(None)
        # The parser calls back into this connection: let go of it, so a
        # closed connection is freed by reference counting.
        self.parser.stop()
        self.parser.release()


class _Connector(Factory):
    noisy = False

    def __init__(self, pool: LeanPool, key: Key) -> None:
        self._pool = pool
        self._key = key

    def buildProtocol(self, addr: Any) -> _Connection:
        return _Connection(self._pool, self._key)


@implementer(IResponse, IPushProducer)
class LeanResponse:
    """
    A response whose body is handed to the protocol given to
    L{deliverBody} as it arrives (bytes that come before that are kept).

    It is also the producer that protocol gets as its transport: pausing it
    stops reading from the target, and stopping it drops the connection.
    """

    request: Any = None
    previousResponse: IResponse | None = None

    def __init__(self, head: ResponseHead, connection: _Connection) -> None:
        self.version = head.version
        self.code = head.code
        self.phrase = head.phrase
        self.headers: Headers = head.headers
        self.length = head.length
        self._connection: _Connection | None = connection
        self._protocol: Any = None
        self._kept: list[bytes] = []
        self._ended: Failure | None = None

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response

    def deliverBody(self, protocol: Any) -> None:
        """
        Give the body to C{protocol}: C{dataReceived} as pieces arrive, then
        C{connectionLost} with L{ResponseDone}, L{PotentialDataLoss} (the
        body ended with the connection) or L{ResponseFailed}.
        """
        if self._protocol is not None:
            raise RuntimeError("the body has already been delivered")
        self._protocol = protocol
        protocol.makeConnection(self)
        kept, self._kept = self._kept, []
        for data in kept:
            protocol.dataReceived(data)
        if self._ended is not None:
            protocol.connectionLost(self._ended)

    def deliver(self, data: bytes) -> None:
        """
        A piece of the body arrived.
        """
        if self._protocol is not None:
            if self._ended is None:
                self._protocol.dataReceived(data)
        else:
            self._kept.append(data)

    def end(self, reason: Failure) -> None:
        """
        The body is over, for C{reason}; later calls are ignored.
        """
        if self._ended is not None:
            return
        self._ended = reason
        self._connection = None
        protocol = self._protocol
        if protocol is not None:
            # The protocol has this response as its transport: break the
            # cycle, so both go with reference counting rather than wait
            # for (and slow down) a garbage collection.
            self._protocol = _DELIVERED
            protocol.connectionLost(reason)

    def write(self, data: bytes) -> None:
        """
        Send C{data} to the target, once the connection is a tunnel (the
        response was a C{101 Switching Protocols}).
        """
        connection = self._connection
        if connection is not None:
            send(connection.transport, data)

    def pace(self, producer: Any) -> None:
        """
        Pause C{producer} (the client's transport) while the target takes
        what L{write} sends slower than it comes, and resume it after.
        """
        connection = self._connection
        if connection is not None:
            connection.transport.registerProducer(producer, True)  # type: ignore[union-attr]

    def close_write(self) -> None:
        """
        End what L{write} sends to the target, once all of it is written:
        a TCP FIN (TLS's close_notify), reading on until the target closes
        its side too.  An abort would reset the connection and lose what
        is still queued for the target, and so would closing a socket with
        unread bytes in it.
        """
        connection = self._connection
        if connection is None:
            return
        transport: Any = connection.transport
        # Twisted resumes a paused producer (the client's transport, see
        # pace) instead of closing once the write buffer drains.
        transport.unregisterProducer()
        if connection.paused:
            connection.paused = False
            transport.resumeProducing()
        if plain(transport):
            transport.loseWriteConnection()
        else:
            # TLS: its close_notify, then the target's is waited for (its
            # loseWriteConnection would half-close the TCP under it).
            transport.loseConnection()

    def pauseProducing(self) -> None:
        connection = self._connection
        if connection is not None and not connection.paused:
            connection.paused = True
            connection.transport.pauseProducing()  # type: ignore[union-attr]

    def resumeProducing(self) -> None:
        connection = self._connection
        if connection is not None and connection.paused:
            connection.paused = False
            connection.transport.resumeProducing()  # type: ignore[union-attr]

    def stopProducing(self) -> None:
        """
        Drop the target connection (the rest of the body will never be
        read, so it cannot carry another request) and end the body with a
        failure.
        """
        connection = self._connection
        if connection is None:
            return
        connection.response = None
        connection.abort()
        self.end(Failure(ResponseFailed([Failure(ConnectionAborted())])))


class LeanPool:
    """
    Idle keep-alive connections, per L{Key}.

    The newest idle connection is reused first, which leaves the oldest to
    reach the idle timeout when traffic drops.  One timer serves the whole
    pool (a timer per pooled connection would cost a C{callLater} and a
    cancellation on every request).

    @ivar _connections: the idle connections per key, oldest first (the
        gateway's metrics count them).
    """

    def __init__(
        self, reactor: Any, max_idle_per_key: int = 256, idle_timeout: float = 60.0
    ) -> None:
        self.reactor = reactor
        self.max_idle_per_key = max_idle_per_key
        self.idle_timeout = idle_timeout
        self._connections: dict[Key, list[_Connection]] = {}
        self._sweeper: Any = None

    def take(self, key: Key) -> _Connection | None:
        """
        An idle connection for C{key}, now busy, or L{None}.
        """
        idle = self._connections.get(key)
        if not idle:
            return None
        connection = idle.pop()
        connection.reused = True
        return connection

    def put(self, connection: _Connection) -> None:
        """
        Keep C{connection}, which has just finished a response, for reuse.
        """
        idle = self._connections.get(connection.key)
        if idle is None:
            idle = self._connections[connection.key] = []
        elif len(idle) >= self.max_idle_per_key:
            connection.state = _CLOSED
            connection.transport.loseConnection()  # type: ignore[union-attr]
            return
        connection.state = _IDLE
        connection.idle_since = self.reactor.seconds()
        idle.append(connection)
        if self._sweeper is None:
            self._sweeper = self.reactor.callLater(self.idle_timeout, self._sweep)

    def remove(self, connection: _Connection) -> None:
        """
        Forget an idle connection that closed or misbehaved.
        """
        idle = self._connections.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)

    def _sweep(self) -> None:
        self._sweeper = None
        now = self.reactor.seconds()
        deadline = now - self.idle_timeout
        oldest = None
        for key, idle in list(self._connections.items()):
            while idle and idle[0].idle_since <= deadline:
                connection = idle.pop(0)
                connection.state = _CLOSED
                connection.transport.loseConnection()  # type: ignore[union-attr]
            if not idle:
                del self._connections[key]
            elif oldest is None or idle[0].idle_since < oldest:
                oldest = idle[0].idle_since
        if oldest is not None:
            # At least a second apart, so a busy pool is swept in batches.
            delay = max(oldest + self.idle_timeout - now, 1.0)
            self._sweeper = self.reactor.callLater(delay, self._sweep)

    def closeCachedConnections(self) -> Deferred[None]:
        """
        Close every idle connection (at shutdown).

        @return: a L{Deferred} that fires once they are all closed.
        """
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        closing = []
        for idle in self._connections.values():
            for connection in idle:
                closing.append(connection.closed())
                connection.state = _CLOSED
                connection.transport.loseConnection()  # type: ignore[union-attr]
        self._connections.clear()
        return DeferredList(closing).addCallback(lambda _: None)

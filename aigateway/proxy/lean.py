# -*- test-case-name: tests.test_lean -*-
"""
A lean pooled HTTP/1.1 client for the proxy's hot path.

L{Agent} spent about 40% of the gateway's CPU per proxied request: it
parses every URI with C{urllib}, canonicalises headers again, chains half a
dozen L{Deferred}s and runs C{_newclient}'s general state machines.  The
gateway needs much less: a request whose body is already in memory, written
with one C{transport.write}; a response head parsed in one pass
(L{aigateway.proxy._parser}); the body handed on as it arrives; and
keep-alive connections kept per target.  L{LeanAgent} does only that, behind
the part of L{IAgent} and L{IResponse} that the forwarder uses, with
Twisted's own failure types, so the rest of the gateway cannot tell.

Connections come from an L{IAgentEndpointFactory} (the proxy's
L{TargetEndpoints}), so TLS, SNI, certificate checks and C{TCP_NODELAY}
are the same as with L{Agent}.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure
from twisted.web.client import URI, RequestTransmissionFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import (
    UNKNOWN_LENGTH,
    IAgent,
    IAgentEndpointFactory,
    IBodyProducer,
    IResponse,
)
from zope.interface import implementer

from ._connection import Key, LeanPool, LeanResponse, _Connection, _Connector
from ._transport import queued

__all__ = ["LeanAgent", "LeanPool", "LeanRequest", "LeanResponse", "Receiver"]

_PORTS = {b"http": 80, b"https": 443}
_EMPTY_BODY = frozenset({b"POST", b"PUT", b"PATCH"})


class Receiver(Protocol):
    """
    What hears of the outcome of a request sent with L{LeanAgent.dispatch}:
    exactly one of its methods is called, once.
    """

    def response_received(self, response: LeanResponse) -> None:
        """
        The response head arrived; its body follows through
        L{LeanResponse.deliverBody}.
        """

    def request_failed(self, failure: Failure) -> None:
        """
        No response will come: the failure says why (L{CancelledError}
        after L{LeanRequest.cancel}).
        """


class _DeferredReceiver:
    """
    Fires a L{Deferred}: the receiver behind L{LeanAgent.request}.
    """

    __slots__ = ("deferred", "request")

    def __init__(self) -> None:
        self.request: LeanRequest | None = None
        self.deferred: Deferred[LeanResponse] = Deferred(self._cancel)

    def _cancel(self, deferred: Deferred[LeanResponse]) -> None:
        if self.request is not None:
            self.request.cancel()

    def response_received(self, response: LeanResponse) -> None:
        self.request = None
        self.deferred.callback(response)

    def request_failed(self, failure: Failure) -> None:
        self.request = None
        self.deferred.errback(failure)


class LeanRequest:
    """
    One request in flight: its bytes, the L{Receiver} told of its outcome,
    and whatever it is waiting on (a connection attempt or a response).
    """

    __slots__ = (
        "agent",
        "key",
        "data",
        "no_body",
        "body",
        "receiver",
        "connecting",
        "connection",
        "retried",
        "cancelled",
        "done",
        "upgrade",
    )

    def __init__(
        self,
        agent: LeanAgent,
        key: Key,
        data: bytes,
        no_body: bool,
        body: Any,
        receiver: Receiver,
    ) -> None:
        self.agent = agent
        self.key = key
        self.data = data
        self.no_body = no_body
        self.body: _Body | None = body
        self.receiver = receiver
        self.connecting: Deferred[Any] | None = None
        self.connection: _Connection | None = None
        self.retried = False
        self.cancelled = False
        self.done = False
        #: It asks to switch protocols: a 101 may answer it.
        self.upgrade = False

    def sending(self) -> bool:
        """
        Whether part of the request is still on its way to the target
        (queued for its connection, or still to come from a body producer).
        """
        connection = self.connection
        if connection is None or self.done:
            return False
        return (self.body is not None and not self.body.done) or queued(
            connection.transport
        ) > 0

    def succeed(self, response: LeanResponse) -> None:
        """
        The response head arrived: hand it to the receiver.
        """
        if not self.done:
            self.done = True
            self.receiver.response_received(response)

    def fail(self, failure: Failure) -> None:
        """
        No response will come: tell the receiver why.
        """
        if not self.done:
            self.done = True
            self.receiver.request_failed(failure)

    def send(self, connection: _Connection) -> None:
        self.connecting = None
        self.connection = connection
        connection.send(self, self.data)
        if self.body is not None:
            self.body.attach(connection)

    def connect_failed(self, failure: Failure) -> None:
        self.connecting = None
        if not self.cancelled:
            self.fail(failure)

    def lost(self, connection: _Connection, reason: Failure) -> None:
        """
        The connection closed before the whole response head came.

        A pooled connection that the target closed while it was idle looks
        exactly like this, with nothing of a response received: the request
        is then sent once more on a new connection.  That is safe for the
        gateway, whose request bodies are in memory and which retries a
        failed attempt on another target anyway; it is not done when any
        byte of a response came, nor for a body still being produced.
        """
        self.connection = None
        if (
            connection.reused
            and not connection.parser.received
            and self.body is None
            and not self.retried
        ):
            self.retried = True
            self.agent.connect(self)
            return
        self.fail(Failure(ResponseNeverReceived([reason])))

    def cancel(self) -> None:
        """
        Give up on the response: the receiver hears of a L{CancelledError}
        (which is what L{Deferred.addTimeout} recognises, on the
        L{Deferred} of L{LeanAgent.request}).
        """
        if self.done:
            return
        self.cancelled = True
        connecting, connection = self.connecting, self.connection
        self.connecting = self.connection = None
        if connecting is not None:
            connecting.cancel()
        elif connection is not None:
            # No response head yet: the connection is mid-exchange, useless.
            connection.request = None
            connection.abort()
        self.fail(Failure(CancelledError()))


@implementer(IAgent)
class LeanAgent:
    """
    Sends requests to targets over keep-alive connections from a
    L{LeanPool}, opening them with C{endpoints}.

    @ivar write_timeout: seconds a target may go without taking any of a
        request still being sent before the request fails with
        L{TimeoutError} (L{None}: no limit).
    """

    def __init__(
        self,
        reactor: Any,
        pool: LeanPool,
        endpoints: IAgentEndpointFactory,
        write_timeout: float | None = None,
    ) -> None:
        self._reactor = reactor
        self._pool = pool
        self._endpoints = endpoints
        self.write_timeout = write_timeout

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        """
        Send a request to the C{scheme://host:port/path?query} C{uri}
        (L{IAgent}'s form of L{dispatch}).
        """
        scheme, _, rest = uri.partition(b"://")
        slash = rest.find(b"/")
        if slash < 0:
            authority, path = rest, b"/"
        else:
            authority, path = rest[:slash], rest[slash:]
        receiver = _DeferredReceiver()
        request = self.dispatch(
            method, scheme, authority, path, headers, bodyProducer, receiver
        )
        if request is not None and not request.done:
            # (One that failed at once is over: keeping it would make a
            # cycle with the receiver it points at.)
            receiver.request = request
        return receiver.deferred  # type: ignore[return-value]

    def dispatch(
        self,
        method: bytes,
        scheme: bytes,
        authority: bytes,
        path: bytes,
        headers: Headers | None,
        bodyProducer: IBodyProducer | None,
        receiver: Receiver,
        tls: tuple[str, bool, Any] | None = None,
        upgrade: bool = False,
    ) -> LeanRequest | None:
        """
        Send a request to C{authority} (C{host:port}) for C{path} (with
        its query), and tell C{receiver} of the outcome: the proxy's way,
        without the URI to format and parse again and the L{Deferred} of
        L{request}.

        @param tls: for C{https}, the name to send as SNI and to verify the
            certificate against, whether to verify it, and the CAs to
            verify it with (an L{aigateway.cacerts.CATrust}, or L{None}
            for the system's), when not the authority's host, C{True} and
            L{None}.
        @param upgrade: the headers ask to switch protocols (a WebSocket
            handshake): a C{101} answer makes the connection a tunnel
            (L{LeanResponse.write} sends to the target) instead of an
            invalid response.

        Header names and values are sent as given: they come from the
        proxy's parsed request and from L{Headers}, which have already
        refused line breaks.

        @return: the request in flight, whose C{cancel()} gives up on it;
            L{None} when it failed at once (C{receiver} has been told).
        """
        lines = [method + b" " + path + b" HTTP/1.1"]
        if headers is not None:
            for name, values in headers._rawHeaders.items():
                for value in values:
                    lines.append(name + b": " + value)
        if headers is None or b"Host" not in headers._rawHeaders:
            lines.append(b"Host: " + authority)
        body = None
        if bodyProducer is None:
            data = b""
            if method in _EMPTY_BODY:
                lines.append(b"Content-Length: 0")
        else:
            body = _Body(bodyProducer)
            if body.chunked:
                lines.append(b"Transfer-Encoding: chunked")
            else:
                lines.append(b"Content-Length: %d" % bodyProducer.length)
            try:
                data = body.start()
            except Exception:
                receiver.request_failed(Failure(RequestTransmissionFailed([Failure()])))
                return None
            if body.done:
                body = None
        lines.append(b"")
        lines.append(data)
        request = LeanRequest(
            self,
            (scheme, authority) if tls is None else (scheme, authority, tls),
            b"\r\n".join(lines),
            method == b"HEAD",
            body,
            receiver,
        )
        if upgrade:
            request.upgrade = True
        connection = self._pool.take(request.key)
        if connection is None:
            self.connect(request)
        else:
            request.send(connection)
        return request

    def connect(self, request: LeanRequest) -> None:
        """
        Open a new connection for C{request}.
        """
        scheme, authority = request.key[0], request.key[1]
        host, port = _split(scheme, authority)
        uri = URI(scheme, authority, host, port, b"/", b"", b"", b"")
        if len(request.key) == 3:
            uri.tls = request.key[2]  # type: ignore[attr-defined]
        try:
            endpoint = self._endpoints.endpointForURI(uri)
            connecting = endpoint.connect(_Connector(self._pool, request.key))
        except Exception:
            request.connect_failed(Failure())
            return
        request.connecting = connecting
        connecting.addCallbacks(request.send, request.connect_failed)


def _split(scheme: bytes, authority: bytes) -> tuple[bytes, int]:
    if authority.endswith(b"]") or b":" not in authority:
        host, port = authority, _PORTS.get(scheme, 80)
    else:
        name, _, digits = authority.rpartition(b":")
        host, port = name, int(digits)
    if host.startswith(b"["):
        host = host[1:-1]
    return host, port


class _Body:
    """
    A request body producer's output.

    A producer that writes everything at once, as the gateway's in-memory
    bodies do, is collected whole, so the request goes out in one write and
    can be sent again.  What any other producer writes later follows on the
    connection as it comes.
    """

    def __init__(self, producer: IBodyProducer) -> None:
        self._producer = producer
        self.chunked = producer.length is UNKNOWN_LENGTH
        self.done = False
        self._parts: list[bytes] = []
        self._transport: Any = None
        self._failure: Failure | None = None

    def start(self) -> bytes:
        """
        Start the producer, and return what it wrote at once.

        @raise Exception: the producer failed at once.
        """
        whole = getattr(self._producer, "in_memory", None)
        if isinstance(whole, bytes) and not self.chunked:
            # A body already in memory (the gateway's own): no producing,
            # and no Deferred, needed.
            self.done = True
            return whole
        finished = self._producer.startProducing(self)
        if finished.called and not isinstance(finished.result, Failure):
            # Written at once (the gateway's case): skip the callback chain.
            self._finished(None)
        else:
            finished.addBoth(self._finished)
        if self._failure is not None:
            self._failure.raiseException()
        data = b"".join(self._parts)
        self._parts = []
        return data

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self.chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        self._out(data)

    def _out(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.write(data)
        else:
            self._parts.append(data)

    def _finished(self, result: object) -> None:
        self.done = True
        if isinstance(result, Failure):
            self._failure = result
            if self._transport is not None:
                # Too late to say so cleanly: the target gets a cut request.
                self._transport.abortConnection()
        elif self.chunked:
            self._out(b"0\r\n\r\n")

    def attach(self, connection: _Connection) -> None:
        """
        Send the rest of the body on C{connection}.
        """
        self._transport = connection.transport
        if self._parts:
            self._transport.write(b"".join(self._parts))
            self._parts = []

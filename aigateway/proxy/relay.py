# -*- test-case-name: tests.test_proxy -*-
"""
The byte-moving end of an exchange: the request body sent to a target,
the response body relayed to the client, and gateway error answers.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import PotentialDataLoss, ResponseDone
from twisted.web.http import PotentialDataLoss as HTTPPotentialDataLoss
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from .usage import sniffer_for

if TYPE_CHECKING:
    from ..model import Target
    from .forward import Exchange
    from .server import ProxyRequest

_DONE = (ResponseDone, PotentialDataLoss, HTTPPotentialDataLoss, ConnectionDone)
_CONNECTION_DONE = Failure(ConnectionDone())
_NO_VALUE = [b""]


@implementer(IBodyProducer)
class BytesProducer:
    """
    A request body already in memory, so it can be sent again on a retry.

    @ivar in_memory: the body, which the lean client sends as it is.
    """

    def __init__(self, body: bytes) -> None:
        self.in_memory = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self.in_memory)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def write_error(
    request: ProxyRequest, code: int, message: str, request_id: str
) -> None:
    """
    Answer with a JSON error body, as Kong does.
    """
    body = json.dumps({"message": message, "request_id": request_id}).encode()
    request.setResponseCode(code)
    headers = request.responseHeaders
    headers.setRawHeaders(b"content-type", [b"application/json; charset=utf-8"])
    headers.setRawHeaders(b"content-length", [b"%d" % len(body)])
    request.write(body)
    request.finish()


def describe(reason: Failure) -> str:
    """
    What went wrong, for a log line or an error event: the causes a
    L{twisted.web._newclient.ResponseFailed} wraps rather than the repr of
    its list of failures.
    """
    causes = getattr(reason.value, "reasons", None)
    if causes and all(isinstance(cause, Failure) for cause in causes):
        return "; ".join(cause.getErrorMessage() for cause in causes)
    return reason.getErrorMessage()


class Discard(Protocol):
    """
    Reads and drops a body nobody will see (a failed-over answer).
    """

    def dataReceived(self, data: bytes) -> None:
        pass


class Relay(Protocol):
    """
    Writes a target's response body to the client as it arrives.

    The target connection is registered as the client request's streaming
    producer, so a slow client pauses reading from the target instead of
    buffering its whole answer in memory.
    """

    def __init__(self, exchange: Exchange, target: Target, first_byte: float) -> None:
        self.exchange = exchange
        self.target = target
        self.first_byte = first_byte
        self._stall_cause: str | None = None
        content_type = exchange.request.responseHeaders._rawHeaders.get(
            b"Content-Type", _NO_VALUE
        )[0]
        self._stream = content_type.startswith(b"text/event-stream")
        self._sniffer = sniffer_for(content_type)

    def connectionMade(self) -> None:
        self.exchange.request.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        exchange = self.exchange
        exchange.bytes_out += len(data)
        exchange.request.write(data)
        if self._sniffer is not None:
            self._sniffer.feed(data)
        exchange.touch()

    def stall(self) -> None:
        """
        The target sent nothing for the service's read timeout: give up.
        """
        self._stall_cause = "read timeout"
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def stop(self) -> None:
        """
        The client went away: stop reading from the target.
        """
        if self.transport is not None:
            # A TransportProxyProducer: it can stop producing.
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = _CONNECTION_DONE) -> None:
        exchange = self.exchange
        request = exchange.request
        # isinstance, not Failure.check, which names every class of the
        # exception's ancestry (reflect.qual) to compare them.
        complete = isinstance(reason.value, _DONE) and self._stall_cause is None
        if not complete and not request.started and not exchange.gone:
            # The answer broke before its first body byte, so its head
            # (which goes out with that byte) never left: for the client
            # this attempt gave no answer at all, and another may.
            request.unregisterProducer()
            exchange.unanswered(self.target, reason, self._stall_cause is not None)
            return
        exchange.end(self.target, str(exchange.status), self.first_byte)
        if exchange.gone:
            exchange.done()
            return
        request.unregisterProducer()
        if complete:
            if self._sniffer is not None:
                exchange.usage = self._sniffer.usage()
            request.finish()
        else:
            self._broken(reason)
        exchange.done()

    def _broken(self, reason: Failure) -> None:
        """
        The target failed after bytes reached the client: the answer cannot
        be completed, so say so and close the connection without the
        chunked terminator, which no client can mistake for a complete
        answer.
        """
        exchange = self.exchange
        cause = self._stall_cause or describe(reason)
        exchange.error = cause
        exchange.hooks.health.report_failure(self.target, cause == "read timeout")
        request = exchange.request
        if self._stream:
            event = json.dumps(
                {
                    "error": {
                        "message": "upstream stream broken: " + cause,
                        "type": "upstream_error",
                        "request_id": exchange.request_id,
                    }
                }
            )
            request.write(b"event: error\ndata: " + event.encode() + b"\n\n")
        request.close_connection()


class Tunnel(Relay):
    """
    The two directions of a connection switched to another protocol (a
    WebSocket): what the target sends is written to the client as it is
    (L{Relay}), and what the client sends from then on goes to the target
    through L{write}.

    Either side closing closes the other.  A tunnel broken or left silent
    for the service's C{read_timeout} is closed without a word (the client
    already speaks another protocol) and without a passive health
    failure: how long a WebSocket lives, or idles, says nothing of the
    target's health.
    """

    def connectionMade(self) -> None:
        super().connectionMade()
        client = self.exchange.request.switch(self)
        self.transport.pace(client)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        # Once the client has left, what the target still sends is read
        # and dropped, and is no sign of life: a target that does not
        # close its side within read_timeout is cut (see stop).
        if not self.exchange.gone:
            super().dataReceived(data)

    def stop(self) -> None:
        """
        The client closed, or lost, its side: close the target's once what
        the client sent before is written to it (its last messages, its
        close frame), as nginx does, rather than reset it and lose them.
        """
        if self.transport is not None:
            self.transport.close_write()  # type: ignore[attr-defined]

    def write(self, data: bytes) -> None:
        """
        Bytes from the client: on to the target.
        """
        exchange = self.exchange
        exchange.bytes_in += len(data)
        exchange.touch()
        transport = self.transport
        if transport is not None:
            transport.write(data)

    def _broken(self, reason: Failure) -> None:
        self.exchange.error = self._stall_cause or describe(reason)
        self.exchange.request.close_connection()

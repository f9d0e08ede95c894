# -*- test-case-name: tests.test_server -*-
"""
The proxy's HTTP/1.1 server side: a lean channel that parses client
requests and hands each to the proxy's twisted.web resource.

twisted.web's C{HTTPChannel} and C{Request} cost about 60% of a proxied
request's CPU under load (measured with py-spy: line-by-line header
parsing, per-request C{Request} set-up, a separate socket write for the
head and the body, C{Date} and persistence logic on every response), while
the proxy needs a narrow subset of them.  This channel keeps the same
resource interface (C{render(request)} returning C{NOT_DONE_YET}, then
C{setResponseCode}, C{responseHeaders}, C{write}, C{finish},
C{notifyFinish}, C{registerProducer}) and does the rest with the message
parser the lean client already uses.

What it does, per RFC 9112:
  - one request at a time per connection; pipelined requests wait, read
    but unparsed, until the response before them is finished;
  - request bodies framed by C{Content-Length} or chunked, bounded by the
    factory's C{max_body} (413 as soon as the bound is passed), answered
    with C{100 Continue} when the client expects it;
  - responses framed by their C{Content-Length}, else chunked for HTTP/1.1
    clients and close-delimited for HTTP/1.0 ones; no body for C{HEAD},
    204 and 304;
  - keep-alive for HTTP/1.1 unless C{Connection: close}, and for HTTP/1.0
    when asked with C{Connection: keep-alive} and the length is known;
  - a client from which no byte of a response leaves (neither Twisted's
    write buffer nor the kernel's send queue goes down) for
    C{idle_timeout} is dropped, as nginx's C{send_timeout} does, whether
    or not the response is finished;
  - a WebSocket handshake the target accepts (C{101}) makes the connection
    a tunnel: the client's bytes go to the exchange as they come
    (L{ProxyRequest.switch}), and the connection closes with it;
  - a malformed request gets a 400 (431, 501, 505 where they apply) and the
    connection is closed; idle connections, and request heads not whole
    within C{idle_timeout} of their first byte, are closed after it; a
    closing connection whose client takes none of the rest of the answer
    for C{close_grace} is aborted (looked at every quarter of it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IProtocolNegotiationFactory,
    IPushProducer,
    ISSLTransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES, datetimeToString
from twisted.web.http_headers import Headers
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from .._version import __version__
from ._parser import BadRequest, RequestHead, RequestParser
from ._transport import SendProgress, send

_log = Logger()

SERVER = b"aigateway/" + __version__.encode("ascii")
_CONNECTION_DONE = Failure(ConnectionDone())
_NO_BODY = frozenset({204, 304})
_HELD_LIMIT = 65536
_dates: dict[int, bytes] = {}


def http_date(now: float) -> bytes:
    """
    The C{Date} header for C{now}, formatted once per second.
    """
    second = int(now)
    date = _dates.get(second)
    if date is None:
        _dates.clear()
        date = _dates[second] = datetimeToString(second)
    return date


# (Twisted's table lacks 426, which https-only routes answer, and RFC 6585's
# 431, which the parser answers.)
_PHRASES = {
    **RESPONSES,
    426: b"Upgrade Required",
    431: b"Request Header Fields Too Large",
}


def _phrase(code: int) -> bytes:
    return _PHRASES.get(code, b"Unknown")


def _json_error(code: int, message: str) -> bytes:
    body = b'{"message": "%s"}' % message.encode("ascii")
    return (
        b"HTTP/1.1 %d %s\r\nServer: %s\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
        % (code, _phrase(code), SERVER, len(body), body)
    )


class ProxyRequest:
    """
    One client request and the response being written to it.

    The part of twisted.web's C{IRequest} that a proxying resource uses;
    C{body} holds the whole request body (the proxy buffers bodies so that
    a failed attempt can be retried on another target).

    @ivar peer: the address the client connected from.
    @ivar port: the port the client connected to, as bytes.
    @ivar gone: the client went away before the response was finished.
    """

    __slots__ = (
        "channel",
        "method",
        "uri",
        "path",
        "clientproto",
        "requestHeaders",
        "responseHeaders",
        "body",
        "code",
        "code_message",
        "peer",
        "port",
        "keep_alive",
        "upgrade",
        "started",
        "finished",
        "gone",
        "_chunks",
        "_size",
        "_chunked",
        "_no_body",
        "_watchers",
        "_gone_hook",
    )

    def __init__(self, channel: ProxyChannel, head: RequestHead) -> None:
        self.channel = channel
        self.method = head.method
        uri = head.uri
        self.uri = uri
        if uri[:1] != b"/" and uri != b"*":
            # Absolute form (RFC 9112 3.2.2): its authority replaces the
            # Host header, and its path is what the route sees.
            after = uri.partition(b"//")[2]
            slash = after.find(b"/")
            query = after.find(b"?")
            if query >= 0 and (slash < 0 or query < slash):
                # No path before the query (http://host?q): the path is "/".
                authority, uri = after[:query], b"/" + after[query:]
            elif slash >= 0:
                authority, uri = after[:slash], after[slash:]
            else:
                authority, uri = after, b"/"
            if authority:
                head.headers._rawHeaders[b"Host"] = [authority.rpartition(b"@")[2]]
        self.path = uri.partition(b"?")[0]
        self.clientproto = head.version
        self.requestHeaders = head.headers
        self.responseHeaders = Headers()
        self.body = b""
        self.code = 200
        self.code_message = b"OK"
        self.peer = channel.peer
        self.port = channel.port
        self.keep_alive = head.keep_alive
        self.upgrade = head.upgrade
        self.started = False
        self.finished = False
        self.gone = False
        self._chunks: list[bytes] = []
        self._size = 0
        self._chunked = False
        self._no_body = head.method == b"HEAD"
        self._watchers: list[Deferred[None]] | None = None
        self._gone_hook: Callable[[Failure], object] | None = None

    # -- the request -----------------------------------------------------

    def getHeader(self, name: bytes) -> bytes | None:
        """
        The last value of the request header C{name}, or L{None}.
        """
        values = self.requestHeaders.getRawHeaders(name)
        return values[-1] if values else None

    def isSecure(self) -> bool:
        """
        Whether the client connected over TLS.
        """
        return self.channel.secure

    # -- the response ----------------------------------------------------

    def setResponseCode(self, code: int, message: bytes | None = None) -> None:
        """
        Set the status of the response (before its first byte is written).
        """
        self.code = code
        self.code_message = message if message else _phrase(code)

    def setHeader(self, name: bytes | str, value: bytes | str) -> None:
        """
        Set a response header.
        """
        self.responseHeaders.setRawHeaders(name, [value])

    def addCookie(self, name: str, value: str, path: str | None = None) -> None:
        """
        Add a C{Set-Cookie} response header.
        """
        cookie = f"{name}={value}" + (f"; Path={path}" if path else "")
        self.responseHeaders.addRawHeader(b"set-cookie", cookie.encode("latin-1"))

    def write(self, data: bytes) -> None:
        """
        Write a piece of the response body; the head goes out with the
        first piece, in the same socket write.
        """
        if self.finished or self.gone:
            return
        if not self.started:
            self.channel.send(self._head() + self._framed(data))
        elif data and not self._no_body:
            self.channel.send(self._framed(data))

    def _framed(self, data: bytes) -> bytes:
        if self._no_body or not data:
            return b""
        if self._chunked:
            return b"%x\r\n%s\r\n" % (len(data), data)
        return data

    def finish(self) -> None:
        """
        The response is complete.
        """
        if self.finished or self.gone:
            return
        if not self.started:
            raw = self.responseHeaders._rawHeaders
            if (
                b"Content-Length" not in raw
                and self.code not in _NO_BODY
                and not self._no_body
            ):
                raw[b"Content-Length"] = [b"0"]
            self.channel.send(self._head())
        elif self._chunked and not self._no_body:
            self.channel.send(b"0\r\n\r\n")
        self.finished = True
        self._gone_hook = None
        self.channel.request_done(self)
        if self._watchers is not None:
            self._notify(None)

    def _head(self) -> bytes:
        """
        The status line and headers, and the framing chosen from them.
        """
        self.started = True
        code = self.code
        raw = self.responseHeaders._rawHeaders
        if code in _NO_BODY or 100 <= code < 200:
            self._no_body = True
        elif b"Content-Length" not in raw:
            if self.clientproto == b"HTTP/1.1":
                self._chunked = True
                raw[b"Transfer-Encoding"] = [b"chunked"]
            else:
                # An HTTP/1.0 client learns the end from the close.
                self.keep_alive = False
        if not self.keep_alive:
            raw[b"Connection"] = [b"close"]
        elif self.clientproto != b"HTTP/1.1":
            raw[b"Connection"] = [b"keep-alive"]
        return _response_head(code, self.code_message, raw)

    def switch(self, tunnel: Any) -> Any:
        """
        Send the target's C{101 Switching Protocols} (its status and headers
        as set) and make the connection a tunnel between client and target
        (a WebSocket): from now on what the client sends goes to
        C{tunnel.write}, and what L{write} gets is sent as it is.  The
        connection closes when L{finish} is called.

        @return: the client's transport, a producer to pause while the
            target takes the client's bytes slower than they come.
        """
        self.started = True
        self.keep_alive = False
        self._no_body = self._chunked = False
        self.channel.send(
            _response_head(
                self.code, self.code_message, self.responseHeaders._rawHeaders
            )
        )
        return self.channel.tunnel_to(tunnel)

    def reset_response(self) -> None:
        """
        Forget the status and headers set so far: nothing of them was
        sent, and another answer (a retry's, or an error) takes their place.
        """
        assert not self.started
        self.code = 200
        self.code_message = b"OK"
        self.responseHeaders = Headers()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        """
        Let C{producer} (the target connection) be paused while the client
        is slower than it.
        """
        self.channel.register(producer)

    def unregisterProducer(self) -> None:
        self.channel.register(None)

    def notifyFinish(self) -> Deferred[None]:
        """
        A L{Deferred} that fires when the response is finished, or fails
        when the client goes away first.
        """
        d: Deferred[None] = Deferred()
        if self.finished:
            d.callback(None)
        elif self.gone:
            d.errback(_CONNECTION_DONE)
        else:
            if self._watchers is None:
                self._watchers = []
            self._watchers.append(d)
        return d

    def when_gone(self, hook: Callable[[Failure], object]) -> None:
        """
        Call C{hook} if the client goes away before the response is
        finished: L{notifyFinish} without a L{Deferred} per request.
        """
        self._gone_hook = hook

    def lent_timer(self, clock: Any) -> LentTimer:
        """
        The connection's timer, for this request's read timeout (see
        L{LentTimer}).
        """
        return self.channel.lent_timer(clock)

    def client_stalled(self) -> bool:
        """
        Whether the client is not taking the response (its connection's
        send buffer is full): the target is paused for it, not silent.
        """
        return self.channel.write_paused

    def client_resumed_at(self) -> float:
        """
        When the client last started taking the response again after a
        stall (0 if it never stalled).
        """
        return self.channel.resumed_at

    def close_connection(self) -> None:
        """
        Close the client connection once what was written is sent: the
        response cannot be completed.
        """
        self.keep_alive = False
        self.channel.close()

    def abandon(self, reason: Failure) -> None:
        """
        The client went away before the response was finished.
        """
        if self.finished or self.gone:
            return
        self.gone = True
        hook, self._gone_hook = self._gone_hook, None
        if hook is not None:
            hook(reason)
        self._notify(reason)

    def _notify(self, reason: Failure | None) -> None:
        watchers, self._watchers = self._watchers, None
        for d in watchers or ():
            if reason is None:
                d.callback(None)
            else:
                d.errback(reason)

    # -- receiving the body ----------------------------------------------

    def received(self, data: bytes) -> bool:
        """
        A piece of the body arrived; C{False} once it passes C{limit}.
        """
        self._size += len(data)
        self._chunks.append(data)
        return self._size <= self.channel.factory.max_body

    def body_complete(self) -> None:
        chunks = self._chunks
        self.body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._chunks = []


def _response_head(code: int, message: bytes, raw: dict[bytes, list[bytes]]) -> bytes:
    """
    A response's status line and header lines, and the blank line after.
    """
    # (Joined at CRLF, as the lean client writes its requests: bytes
    # %-formatting per header line cost more than the rest of this.)
    lines = [b"HTTP/1.1 %d %s" % (code, message)]
    append = lines.append
    for name, values in raw.items():
        for value in values:
            append(name + b": " + value)
    append(b"")
    append(b"")
    return b"\r\n".join(lines)


class LentTimer:
    """
    One timer for a client connection, lent to the exchange in progress on
    it: the proxy's read timeout without a timer per request.

    A L{DelayedCall} made and cancelled for every request cost 3.4% of the
    gateway's instructions per request (callgrind: the call, its entry in
    the reactor's heap, and the heap's compaction of cancelled calls).  A
    connection's requests follow one another, so one call serves them in
    turn: an exchange borrows it (it is moved sooner if it must fire
    earlier than it is set for), one that ends lets go without cancelling
    it, and when it fires it calls its current borrower, or nobody.  The
    borrower must therefore accept being called early: it looks at the
    time it has left and borrows again for that.
    """

    __slots__ = ("_clock", "_call", "_owner", "_callback", "_stopped")

    def __init__(self, clock: Any) -> None:
        self._clock = clock
        self._call: Any = None
        self._owner: object = None
        self._callback: Callable[[], object] | None = None
        self._stopped = False

    def lend(self, owner: object, callback: Callable[[], object], delay: float) -> None:
        """
        Call C{callback} in C{delay} seconds or earlier, for C{owner}, who
        takes the timer over from whoever had it.
        """
        self._owner = owner
        self._callback = callback
        call = self._call
        if call is None:
            self._call = self._clock.callLater(delay, self._fire)
        elif call.getTime() > self._clock.seconds() + delay:
            call.reset(delay)

    def release(self, owner: object) -> None:
        """
        C{owner} needs the timer no more (if it still has it).
        """
        if self._owner is owner:
            self._owner = self._callback = None
            if self._stopped:
                self._cancel()

    def stop(self) -> None:
        """
        The connection is gone: cancel the call, once its borrower (an
        exchange still waiting on its target, if any) lets go of it.
        """
        self._stopped = True
        if self._owner is None:
            self._cancel()

    def _cancel(self) -> None:
        call = self._call
        self._call = None
        if call is not None and call.active():
            call.cancel()

    def _fire(self) -> None:
        self._call = None
        callback = self._callback
        self._owner = self._callback = None
        if callback is not None:
            callback()


@implementer(IPushProducer)
class ProxyChannel(Protocol):
    """
    One client connection.

    It is the transport's producer, so that when the client reads slower
    than the target answers, the current request's producer (the target
    connection) is paused, and so that a client going away is known to
    the request before anything else hears of it.
    """

    def __init__(self, factory: ProxyFactory) -> None:
        self.factory = factory
        self.parser = RequestParser(self._head, self._body)
        self.request: ProxyRequest | None = None
        self.responding = False
        self.refused = False
        self.peer = ""
        self.port = b""
        self.secure = False
        self.last_active = 0.0
        self._held = b""
        self._producer: Any = None
        self._write_paused = False
        self._read_paused = False
        self._closing: Any = None
        # What the client takes of a closing connection's rest, and of a
        # response while its send buffer is full.
        self._draining = SendProgress()
        self._stalled = SendProgress()
        self.request_began = 0.0
        #: When the client last started taking the response again after its
        #: send buffer filled up.
        self.resumed_at = 0.0
        self._timer: LentTimer | None = None
        # Where the client's bytes go once the connection is a tunnel.
        self._tunnel: Any = None

    def lent_timer(self, clock: Any) -> LentTimer:
        """
        The connection's timer for its requests' read timeouts (made with
        C{clock} the first time).
        """
        timer = self._timer
        if timer is None:
            timer = self._timer = LentTimer(clock)
        return timer

    def connectionMade(self) -> None:
        transport: Any = self.transport
        factory = self.factory
        # Without TCP_NODELAY, small server-sent-event chunks can wait for
        # the client's delayed ACK.
        set_nodelay = getattr(transport, "setTcpNoDelay", None)
        if set_nodelay is not None:
            set_nodelay(True)
        self.peer = getattr(transport.getPeer(), "host", "") or ""
        self.port = b"%d" % getattr(transport.getHost(), "port", 0)
        self.secure = ISSLTransport.providedBy(transport)
        transport.registerProducer(self, True)
        self.last_active = factory.seconds()
        factory.opened(self)
        self.parser.expect()

    # -- reading requests ------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        now = self.last_active = self.factory.seconds()
        if self.responding or self.refused:
            if self._tunnel is not None:
                self._tunnel.write(data)
            elif not self.refused:
                self._hold(data)
            return
        if not self.parser.received:
            self.request_began = now
        self._feed(data)

    def _hold(self, data: bytes) -> None:
        # A pipelined request, or bytes after one: parsed once the response
        # before it is finished.  Reading stops if too much piles up.
        self._held += data
        if len(self._held) > _HELD_LIMIT and not self._read_paused:
            self._read_paused = True
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def _feed(self, data: bytes) -> None:
        parser = self.parser
        while True:
            try:
                parser.feed(data)
            except BadRequest as e:
                self._refuse(e.status, str(e))
                return
            if self.refused or not parser.complete:
                return
            request = self.request
            assert request is not None
            data = parser.leftover
            parser.leftover = b""
            self._dispatch(request)
            if self.responding or self.refused or not data:
                if data:
                    self._hold(data)
                return
            # Answered at once (a 404, say): parse what followed.

    def _head(self, head: RequestHead) -> None:
        request = self.request = ProxyRequest(self, head)
        if head.length is not None and head.length > self.factory.max_body:
            self._too_large()
            return
        if head.expect_continue:
            self.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        del request

    def _body(self, data: bytes) -> None:
        request = self.request
        if request is not None and not request.received(data):
            self._too_large()

    def _too_large(self) -> None:
        self._refuse(413, "Request size limit exceeded")

    def _refuse(self, code: int, message: str) -> None:
        """
        Answer a request that cannot be served and close the connection:
        whatever follows on it cannot be framed.
        """
        self.refused = True
        self.parser.stop()
        self.request = None
        transport: Any = self.transport
        if transport is not None:
            transport.write(_json_error(code, message))
            self.close()

    def _dispatch(self, request: ProxyRequest) -> None:
        request.body_complete()
        self.responding = True
        raw = request.responseHeaders._rawHeaders
        factory = self.factory
        raw[b"Server"] = [SERVER]
        raw[b"Date"] = [http_date(factory.seconds())]
        try:
            result = factory.resource.render(request)
        except Exception:
            _log.failure("the proxy resource failed on {uri}", uri=request.uri)
            self._failed(request)
            return
        if result is not NOT_DONE_YET:
            request.write(result)
            request.finish()

    def _failed(self, request: ProxyRequest) -> None:
        if request.started:
            self.close()
            return
        request.finished = True
        self.refused = True
        self.send(_json_error(500, "An unexpected error occurred"))
        self.close()

    def request_done(self, request: ProxyRequest) -> None:
        """
        The response to C{request} is complete: close, or read the next.
        """
        if request is not self.request:
            return
        self.request = None
        self.responding = False
        self._producer = None
        self._tunnel = None
        if not request.keep_alive or self.factory.draining:
            self.refused = True
            self.close()
            return
        self.last_active = self.request_began = self.factory.seconds()
        self.parser.expect()
        held, self._held = self._held, b""
        if self._read_paused:
            self._read_paused = False
            self.transport.resumeProducing()  # type: ignore[union-attr]
        if held:
            self._feed(held)

    def tunnel_to(self, tunnel: Any) -> Any:
        """
        Send what the client sends from now on to C{tunnel.write}, starting
        with what it sent after the request (see L{ProxyRequest.switch}).
        """
        self._tunnel = tunnel
        held, self._held = self._held, b""
        transport: Any = self.transport
        if self._read_paused:
            self._read_paused = False
            transport.resumeProducing()
        if held:
            tunnel.write(held)
        return transport

    # -- writing responses -----------------------------------------------

    def send(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and data:
            send(transport, data)

    def close(self) -> None:
        """
        Close once what was written is sent, and abort if the client takes
        none of it for the factory's C{close_grace}.
        """
        transport: Any = self.transport
        if transport is None or self._closing is not None:
            return
        # Twisted resumes a transport's producer instead of closing once a
        # paused write buffer drains: stop being its producer first (the
        # request still hears of the client leaving, from connectionLost).
        if getattr(transport, "producer", None) is self:
            transport.unregisterProducer()
        transport.loseConnection()
        # A client that never reads the rest would hold the connection.
        self._draining.start(transport, self.factory.seconds())
        self._closing = self.factory.call_later(
            self.factory.close_grace / 4, self._look
        )

    def _look(self) -> None:
        """
        Abort a closing connection whose client has taken none of the rest
        for C{close_grace}; looked at every quarter of it.
        """
        self._closing = None
        transport: Any = self.transport
        if transport is None:
            return
        now = self.factory.seconds()
        if self._draining.stalled_for(transport, now) >= self.factory.close_grace:
            transport.abortConnection()
            return
        self._closing = self.factory.call_later(
            self.factory.close_grace / 4, self._look
        )

    def register(self, producer: Any) -> None:
        """
        Make C{producer} the one paused and resumed with the client's
        write buffer (L{None}: no producer).
        """
        self._producer = producer
        if producer is not None and self._write_paused:
            producer.pauseProducing()

    def pauseProducing(self) -> None:
        if not self._write_paused:
            self._write_paused = True
            self._stalled.start(self.transport, self.factory.seconds())
        if self._producer is not None:
            self._producer.pauseProducing()

    def resumeProducing(self) -> None:
        if self._write_paused:
            self._write_paused = False
            self.resumed_at = self.factory.seconds()
        if self._producer is not None:
            self._producer.resumeProducing()

    @property
    def write_paused(self) -> bool:
        """
        Whether the client is not taking what is written to it (its send
        buffer is full), so the response's producer is paused.
        """
        return self._write_paused

    def stopProducing(self) -> None:
        # The transport is closing: the request hears of it first, so that
        # stopping the target is never mistaken for a target failure.
        self._abandon(_CONNECTION_DONE)

    # -- closing ---------------------------------------------------------

    def idle_for(self, now: float) -> float:
        """
        How long the connection has waited on its client: while the client
        has not taken all it was sent, how long no byte of it has left;
        while a response is in progress and the client keeps up, 0 (the
        exchange's own timeouts apply).
        """
        if self._write_paused:
            # The client has not taken all it was sent (whether or not the
            # response is over).  Twisted resumes a producer only once the
            # write buffer is empty, so a slow client that drains it bit
            # by bit stays paused: progress, not the pause, is what counts
            # (nginx's send_timeout is the time between two successive
            # writes).
            return self._stalled.stalled_for(self.transport, now)
        if self.responding:
            return 0.0
        if self.parser.in_head():
            # A request head must arrive whole within the timeout, however
            # slowly it drips in.
            return now - self.request_began
        return now - self.last_active

    def time_out(self) -> None:
        """
        The client sent nothing for the factory's C{idle_timeout}, or took
        none of a response in progress for that long.
        """
        if self.responding or self._write_paused:
            # Nothing more can be sent to it, nor a refusal: drop it (the
            # exchange hears the client went away; no target is blamed).
            transport: Any = self.transport
            if transport is not None:
                transport.abortConnection()
            return
        if self.refused:
            return
        parser = self.parser
        if parser.received and not parser.complete:
            # In the middle of sending a request: say why it is refused.
            self._refuse(408, "Request timeout")
        else:
            self.refused = True
            self.close()

    def connectionLost(self, reason: Failure = _CONNECTION_DONE) -> None:
        self.factory.closed(self)
        if self._timer is not None:
            self._timer.stop()
        if self._closing is not None and self._closing.active():
            self._closing.cancel()
        self._closing = None
        self._abandon(reason)
        self._producer = self._tunnel = None
        # The parser calls back into this channel: let go of it, so a closed
        # connection is freed by reference counting, not left to the
        # garbage collector.
        self.parser.stop()
        self.parser.release()

    def _abandon(self, reason: Failure) -> None:
        request = self.request
        if request is not None and self.responding:
            request.abandon(reason)


@implementer(IProtocolNegotiationFactory)
class ProxyFactory(Factory):
    """
    Builds L{ProxyChannel}s for the proxy listener and keeps count of them.

    One timer closes the connections idle for more than C{idle_timeout}
    (keep-alive connections nobody uses, clients that stall while sending
    a request), instead of one timer per connection reset on every read.

    @ivar open_connections: client connections now open.
    """

    noisy = False
    #: Seconds a closing connection may go without its client taking any
    #: of what is left before it is aborted (twisted.web's abortTimeout,
    #: which aborts after that long whatever the client takes).
    close_grace = 15.0

    def __init__(
        self,
        resource: Any,
        max_body: int,
        clock: Any,
        idle_timeout: float = 60.0,
    ) -> None:
        self.resource = resource
        self.max_body = max_body
        self.seconds = clock.seconds
        self.call_later = clock.callLater
        self._clock = clock
        self.idle_timeout = idle_timeout
        self._channels: dict[ProxyChannel, None] = {}
        self._sweeper: Any = None
        #: Shutting down: no request is read after the ones in progress.
        self.draining = False
        self._drained: Deferred[None] | None = None
        self._deadline: Any = None

    @property
    def open_connections(self) -> int:
        return len(self._channels)

    @property
    def requests_in_flight(self) -> int:
        """
        Requests whose head has arrived and whose answer is not over: what
        this node is serving now, whatever its configuration has become.
        """
        return sum(1 for channel in self._channels if channel.request is not None)

    def buildProtocol(self, addr: Any) -> ProxyChannel:
        return ProxyChannel(self)

    def acceptableProtocols(self) -> list[bytes]:
        """
        What ALPN may choose on a TLS listener (L{IProtocolNegotiationFactory}):
        HTTP/1.1.  Without an answer, a client that offers ALPN (curl,
        browsers, the OpenAI SDKs) gets an internal-error alert from
        pyOpenSSL instead of a handshake.
        """
        return [b"http/1.1"]

    def opened(self, channel: ProxyChannel) -> None:
        self._channels[channel] = None
        if self._sweeper is None:
            self._sweeper = self._clock.callLater(self._period(), self._sweep)

    def closed(self, channel: ProxyChannel) -> None:
        self._channels.pop(channel, None)
        if self._drained is not None and not self._channels:
            self._done_draining()

    def drain(self, timeout: float) -> Deferred[None]:
        """
        Finish the requests in progress and take no more, for a shutdown
        that cuts no answer short (a stream of tokens included): idle
        connections close now, busy ones once their answer is complete
        (telling the client, with C{Connection: close}, when the answer
        has not started yet), and what is still open after C{timeout}
        seconds is aborted.

        Stop listening first: this does not.

        @return: fires once every connection is closed.
        """
        self.draining = True
        drained = self._drained = Deferred()
        for channel in list(self._channels):
            request = channel.request
            if request is None:
                # Between requests, or part of a head: nothing is lost
                # that the client cannot send again elsewhere.
                channel.refused = True
                channel.close()
            else:
                request.keep_alive = False
        if not self._channels:
            self._done_draining()
        elif self._deadline is None:
            self._deadline = self._clock.callLater(timeout, self._abort_all)
        return drained

    def cut_short(self) -> None:
        """
        End the drain now: abort what is still open.
        """
        if self._drained is not None:
            self._abort_all("the drain was cut short")

    def _abort_all(self, why: str = "the drain timeout passed") -> None:
        self._cancel_deadline()
        if self._channels:
            _log.warn(
                "{why}: {count} connections still busy are aborted",
                why=why,
                count=len(self._channels),
            )
        for channel in list(self._channels):
            transport: Any = channel.transport
            if transport is not None:
                transport.abortConnection()
        # (Aborted connections are lost on a later turn of the reactor.)
        self._clock.callLater(1, self._done_draining)

    def _done_draining(self) -> None:
        self._cancel_deadline()
        drained, self._drained = self._drained, None
        if drained is not None:
            drained.callback(None)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _period(self) -> float:
        return max(self.idle_timeout / 4, 0.5)

    def _sweep(self) -> None:
        self._sweeper = None
        now = self.seconds()
        for channel in list(self._channels):
            if channel.idle_for(now) >= self.idle_timeout:
                channel.time_out()
        if self._channels:
            self._sweeper = self._clock.callLater(self._period(), self._sweep)

    def doStop(self) -> None:
        if self._sweeper is not None and self._sweeper.active():
            self._sweeper.cancel()
        self._sweeper = None
        super().doStop()

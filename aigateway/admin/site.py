# -*- test-case-name: tests.test_feed,tests.test_admin_input -*-
"""
The Admin API's twisted.web site.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.internet import tcp
from twisted.internet.defer import Deferred, TimeoutError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from ..store.interfaces import StoreUnavailable
from .app import answer
from .entities import PATIENCE
from .errors import AdminError, header_too_large, uri_too_long

_log = Logger()


# A request line starts with its method, a token, then a space; a header
# line has a colon right after its name, and a folded one starts with
# blanks (RFC 9112).
_REQUEST_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+ ")


class AdminChannel(HTTPChannel):
    """
    twisted.web's HTTP/1.1 channel, answering a line too long to read (a
    long URL, a long header) in JSON, as every Admin API answer.

    twisted.web closes such a connection without a word (the client sees a
    reset or an empty reply and cannot tell why).  Here the client gets 414
    (or 431) and the connection ends, since the rest of the request cannot
    be found in what follows: the answer is sent, the sending side closed,
    and what the client still sends is read and dropped until it closes
    (for at most L{lingering} seconds), so that its unread bytes do not
    make the kernel reset the connection before the answer is read.

    After L{lingering} seconds the connection is aborted, not closed: a
    close would wait for the client to take what is still unsent (a large
    answer to a request pipelined before, which a client that does not
    read never takes) or, on TLS, for its close_notify, and keep the
    connection for as long as the client likes.

    @cvar lingering: seconds to wait for the client to close after the
        answer.
    """

    # A URL is limited by the request line's own limit (MAX_LENGTH), not
    # by the total of the request line and headers, which would give a URL
    # just under it twisted.web's bare 400.
    totalHeadersSize = 4 * HTTPChannel.MAX_LENGTH
    lingering = 2.0
    _refused = False

    def lineLengthExceeded(self, line: bytes) -> None:
        if _REQUEST_LINE.match(line):
            self._refuse(uri_too_long(self.MAX_LENGTH))
        else:
            self._refuse(header_too_large(self.MAX_LENGTH))

    def _refuse(self, error: AdminError) -> None:
        transport: Any = self.transport
        if transport is None:
            return
        body = json.dumps(error.body).encode("utf-8")
        head = (
            b"HTTP/1.1 %d %s\r\n"
            b"Content-Type: application/json; charset=utf-8\r\n"
            b"Content-Length: %d\r\n"
            b"Connection: close\r\n\r\n"
        ) % (error.status, _REASONS[error.status], len(body))
        self._refused = True
        transport.write(head + body)
        self.setTimeout(self.lingering)
        # Nothing more is produced on this connection, whatever its
        # transport (a TLS transport that still has a producer puts off
        # its close).
        transport.unregisterProducer()
        # Only a plain TCP connection is half-closed: a TLS transport passes
        # loseWriteConnection to the socket under it, past its own close.
        if isinstance(transport, tcp.Connection):
            transport.loseWriteConnection()

    def dataReceived(self, data: bytes) -> None:
        if not self._refused:
            super().dataReceived(data)

    def timeoutConnection(self) -> None:
        transport: Any = self.transport
        if self._refused and transport is not None:
            transport.abortConnection()
        else:
            super().timeoutConnection()


_REASONS = {414: b"URI Too Long", 431: b"Request Header Fields Too Large"}


class AdminSite(Site):
    """
    A site of L{AdminChannel}s, without twisted.web's per-request
    C{Site.log}: admin calls are few, and the gateway logs what matters
    (configuration changes) itself.
    """

    # HTTP/1.1 only.  twisted.web types its factory's protocol as its own
    # (private) wrapper, which could switch to HTTP/2 on a TLS listener
    # that offered it; a channel alone is what a Site built before that
    # wrapper, and Site.buildProtocol still sets it up.
    protocol = AdminChannel  # type: ignore[assignment]

    def __init__(self, resource: Resource, **kwargs: Any) -> None:
        # Bodies are read as bytes (the Admin API parses JSON and forms
        # itself); parsing form posts into request.args through the email
        # package would be work done for nothing.
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(resource, **kwargs)

    def log(self, request: Any) -> None:
        pass


class FreshResource(Resource):
    """
    Answers every admin call from the stored configuration: if another
    process sharing the store changed it, it is loaded (and put in force)
    before the call is handled.

    The proxy learns of other processes' changes within the change feed's
    interval, but an operator who created an upstream through one node and
    adds a target to it through another must not be told it does not
    exist: as with Kong, the Admin API reads what the database holds.  It
    costs one small query per admin call, never a proxied request.

    The store may be out of reach.  A call that has waited C{timeout}
    seconds for the look at the store stops waiting: a read is then
    answered from the configuration in force, and a write is refused with
    503 at once rather than left to wait on the store a second time.  The
    look itself goes on (shared with the calls that come meanwhile, see
    L{Entities.refresh}).  The node's own status and metrics do not look
    at the configuration (they are what a liveness probe and a scraper ask
    for during an outage).
    """

    isLeaf = True

    def __init__(
        self,
        inner: Resource,
        refresh: Callable[[], Deferred[bool]],
        clock: Any,
        timeout: float = PATIENCE,
    ) -> None:
        super().__init__()
        self._inner = inner
        self._refresh = refresh
        self._clock = clock
        self._timeout = timeout

    def render(self, request: Any) -> Any:
        if request.path in _NODE_ONLY:
            return self._inner.render(request)
        try:
            unquote_to_bytes(request.path).decode("utf-8")
        except UnicodeDecodeError:
            # Klein would answer with an HTML page; every answer is JSON.
            return answer(request, 400, {"message": "the URL is not UTF-8"})
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        looked = self._refresh().addTimeout(self._timeout, self._clock)
        looked.addErrback(self._unreachable, request)

        def handle(_: object) -> None:
            if gone or request.finished:
                return
            try:
                result = self._inner.render(request)
            except Exception:
                _log.failure("admin call failed: {uri}", uri=request.uri)
                _answer(request, 500, {"message": "An unexpected error occurred"})
                return
            if result is not NOT_DONE_YET:
                request.write(result)
                request.finish()

        looked.addCallback(handle)
        return NOT_DONE_YET

    def _unreachable(self, failure: Failure, request: Any) -> None:
        """
        Refuse a write while the store is out of reach (the look failed, or
        did not answer in time); a read goes on.
        """
        if request.method in (b"GET", b"HEAD") or request.path.endswith(_NODE_STATE):
            # Reads, and setting a target's health by hand, which is this
            # node's memory, not the store's: an operator may need it most
            # while the database is out.
            return
        if failure.check(TimeoutError):
            why = f"no answer within {self._timeout:g} s"
        elif failure.check(StoreUnavailable):
            why = failure.getErrorMessage()
        else:  # (logged by the look itself)
            why = "it failed"
        message = f"the configuration store is unavailable ({why}); nothing was changed"
        _answer(request, 503, {"message": message})


def _answer(request: Any, status: int, body: dict[str, Any]) -> None:
    """
    Write and finish a JSON answer (as the Admin API's endpoints make
    them), unless the request is finished.
    """
    if request.finished:
        return
    request.write(answer(request, status, body))
    request.finish()


# Writes to a node's own state, not to the store.
_NODE_STATE = (b"/healthy", b"/unhealthy")
# Node-local answers that never read the configuration: status and metrics.
_NODE_ONLY = frozenset([b"/", b"/status", b"/metrics"])

# -*- test-case-name: tests.test_proxy -*-
"""
Forwarding one request: pick a target, send, retry, relay the response.

An L{Exchange} lives for one client request.  Each attempt picks a target
not yet tried, sends the (buffered) body, and either relays the response as
it arrives or, when it failed before any byte reached the client, reports
the failure to passive health and tries another target.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from contextlib import suppress
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.error import DNSLookupError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse

from ..addresses import format_target, host_header
from ..health.passive import TIMEOUTS
from ..model import Target
from .headers import _hostname, client_response_headers, upstream_headers
from .lean import LeanAgent, LeanRequest
from .relay import BytesProducer, Discard, Relay, Tunnel, describe, write_error
from .usage import Usage

if TYPE_CHECKING:
    from ..balancer.context import PickContext
    from ..balancer.interfaces import IBalancer
    from ..cacerts import CATrust
    from ..model import Route, Service, Upstream
    from .client import Agents
    from .server import ProxyRequest

_log = Logger()

NO_PEER = "failure to get a peer from the ring-balancer"
BAD_GATEWAY = "An invalid response was received from the upstream server"
TIMEOUT = "The upstream server is timing out"
NO_NAME = "name resolution failed"
_NO_LENGTH = frozenset({204, 304})
#: The status recorded for a client that went away before any answer.
CLIENT_CLOSED = 499
_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH", b"DELETE"})


@attrs.frozen
class Hooks:
    """
    What every exchange of one proxy shares.

    @ivar health: the passive-health hook (L{HealthManager} or alike).
    @ivar decorate: adds the gateway's own headers to a response.
    @ivar observer: told of each attempt and of the exchange's end, for
        metrics and the access log.
    """

    agents: Agents
    clock: Any
    health: Any
    decorate: Callable[[Exchange, ProxyRequest], None]
    observer: ExchangeObserver


class ExchangeObserver:
    """
    Does nothing; the base of what watches exchanges.
    """

    def attempt_started(self, exchange: Exchange, target: Target) -> None:
        """
        An attempt on C{target} began.
        """

    def attempt_ended(
        self, exchange: Exchange, target: Target, code: str, first_byte: float | None
    ) -> None:
        """
        An attempt ended: C{code} is the status, or C{error} / C{timeout}.
        """

    def done(self, exchange: Exchange) -> None:
        """
        The exchange is over.
        """

    def unrouted(
        self,
        request: ProxyRequest,
        request_id: str,
        client_ip: str,
        path: str,
        status: int,
        message: str,
        started: float,
    ) -> None:
        """
        The gateway answered C{request} itself, without an exchange: no
        route matched (404), or the route is for https only (426).
        """


class Exchange:
    """
    One client request on its way through the gateway.

    @ivar attempts: attempts made so far.
    @ivar tried: keys of the targets already tried, in the order tried.
    @ivar usage: the token usage the answer reported, if any.
    @ivar bytes_in: bytes received from the client: the request body, and
        what it sent through a tunnel (a WebSocket).
    @ivar bytes_out: body bytes relayed to the client (through a tunnel,
        every byte after the 101's head).
    """

    # Slots: one exchange is made per request, and at its thirtieth
    # attribute CPython 3.11 stopped sharing its instance dictionary's keys
    # (callgrind: 8.6k more instructions per request, 2 %).
    __slots__ = (
        "hooks",
        "clock",
        "request",
        "route",
        "service",
        "upstream",
        "balancer",
        "context",
        "path",
        "body",
        "request_id",
        "started",
        "attempts",
        "tried",
        "target",
        "status",
        "upstream_latency",
        "proxy_latency",
        "bytes_in",
        "bytes_out",
        "error",
        "usage",
        "gone",
        "_pending",
        "_sent",
        "_relay",
        "_finished",
        "_timer",
        "_last",
        "_sending",
        "_timed_out",
        "observed",
    )

    def __init__(
        self,
        hooks: Hooks,
        request: ProxyRequest,
        route: Route,
        service: Service,
        upstream: Upstream | None,
        balancer: IBalancer | None,
        context: PickContext,
        path: bytes,
        body: bytes,
        request_id: str,
        started: float,
    ) -> None:
        self.hooks = hooks
        self.clock = hooks.clock
        self.request = request
        self.route = route
        self.service = service
        self.upstream = upstream
        self.balancer = balancer
        self.context = context
        self.path = path
        self.body = body
        self.request_id = request_id
        self.started = started
        self.attempts = 0
        # (A dict for its order: the access log lists them as tried.)
        self.tried: dict[str, None] = {}
        self.target: Target | None = None
        self.status = 0
        self.upstream_latency: float | None = None
        self.proxy_latency: float | None = None
        self.bytes_in = len(body)
        self.bytes_out = 0
        self.error: str | None = None
        self.usage: Usage | None = None
        self.gone = False
        # The attempt in flight: a lean request or a Deferred, either of
        # which can be cancelled.
        self._pending: Any = None
        self._sent = 0.0
        self._relay: Relay | None = None
        self._finished = False
        # The service's read_timeout: until a response head arrives, then
        # between body chunks.  The client connection's timer, borrowed (see
        # LentTimer), instead of addTimeout's plus the relay's, and not reset
        # on every chunk: bytes arriving only note the time (_last), and the
        # timer, when it fires, is borrowed again for what is left.
        self._timer: Any = None
        self._last = 0.0
        self._sending = False
        self._timed_out = False
        # The observer's own: what it needs again when an attempt ends.
        self.observed: Any = None

    def start(self) -> None:
        """
        Make the first attempt, and watch for the client going away.
        """
        self.request.when_gone(self._client_gone)
        target = self._pick()
        if target is None:
            if self.upstream is not None:
                wait = self.hooks.health.retry_after(self.upstream.id)
                if wait is not None:
                    # Every target is rate-limited: say when one is back.
                    self.request.responseHeaders.setRawHeaders(
                        b"retry-after", [b"%d" % math.ceil(wait)]
                    )
            self.error = NO_PEER  # (for the access log: no attempt said why)
            self.fail(503, NO_PEER)
            return
        self._attempt(target)

    def _pick(self) -> Target | None:
        if self.balancer is None:
            return _direct_target(self.service)
        return self.balancer.pick(self.context, self.tried)

    def _begin(self, target: Target) -> None:
        self.attempts += 1
        self.target = target
        self.tried[target.key] = None
        if self.balancer is not None:
            self.balancer.started(target)
        self.hooks.observer.attempt_started(self, target)

    def end(self, target: Target, code: str, first_byte: float | None) -> None:
        """
        An attempt on C{target} is over (its last byte, or an error).
        """
        if self.balancer is not None:
            self.balancer.finished(target, first_byte)
        self.hooks.observer.attempt_ended(self, target, code, first_byte)

    def _attempt(self, target: Target) -> None:
        self._begin(target)
        service = self.service
        request = self.request
        upstream = self.upstream
        client_host = (
            request.requestHeaders._rawHeaders.get(b"Host")
            if self.route.preserve_host
            else None
        )
        if client_host:
            host = client_host[-1]
        else:
            # The same Host an active probe sends, so a probe checks what
            # proxied requests will get.
            name = upstream.host_header if upstream is not None else None
            host = _host_value(name or target.host, target.port, service.protocol)
        headers = upstream_headers(
            request.requestHeaders,
            host,
            self.context.peer.encode("latin-1"),
            self.context.client_ip.encode("latin-1"),
            b"https" if request.isSecure() else b"http",
            request.port,
            target.headers,
        )
        body = None
        if self.body or request.method in _BODY_METHODS:
            body = BytesProducer(self.body)
        now = self.clock.seconds()
        if self.attempts == 1:
            self.proxy_latency = now - self.started
        agent = self.hooks.agents.agent(service.connect_timeout, service.write_timeout)
        self._timed_out = False
        self._sending = False
        self._restart_timer(now)
        self._sent = now
        scheme = service.protocol.encode("ascii")
        authority = target.key.encode("ascii")
        if isinstance(agent, LeanAgent):
            tls = None
            if scheme == b"https":
                tls = _tls_for(host, target.host, service.tls_verify, service.ca_trust)
            upgrade = request.upgrade
            if upgrade is not None:
                # A WebSocket handshake: the hop-by-hop pair that asks for
                # it goes on to the target (as nginx's usual Upgrade and
                # Connection lines, and Kong, do).
                raw = headers._rawHeaders
                raw[b"Connection"] = [b"upgrade"]
                raw[b"Upgrade"] = [upgrade]
            # The exchange is the request's receiver: no URI to format and
            # parse again, no Deferred.
            pending = agent.dispatch(
                request.method,
                scheme,
                authority,
                self.path,
                headers,
                body,
                self,
                tls,
                upgrade is not None,
            )
            # A request that failed at once has been handled already (and
            # perhaps retried, with a pending request of its own).
            if pending is not None and not pending.done:
                self._pending = pending
            return
        d = agent.request(
            request.method, scheme + b"://" + authority + self.path, headers, body
        )
        self._pending = d
        d.addCallbacks(self.response_received, self.request_failed)

    def response_received(self, response: IResponse) -> None:
        """
        The current attempt's response head arrived (L{Receiver}).
        """
        assert self.target is not None
        try:
            self._response(response, self.target, self._sent)
        except Exception:
            self._broke(response)

    def request_failed(self, failure: Failure) -> None:
        """
        The current attempt failed before any response (L{Receiver}).
        """
        assert self.target is not None
        try:
            self._failed(failure, self.target)
        except Exception:
            self._broke(None)

    def _broke(self, response: IResponse | None) -> None:
        """
        The gateway's own handling of an attempt's outcome raised (a bug):
        log it, and end the exchange rather than leave the client waiting
        with nothing to time it out.
        """
        _log.failure(
            "handling an answer for {request_id} failed", request_id=self.request_id
        )
        if response is not None and self._relay is None:
            # Nobody reads its body: let it be read and dropped, so the
            # target connection is not left holding it.
            with suppress(RuntimeError):  # (unless that was already done)
                response.deliverBody(Discard())
        if self._finished:
            return
        if not self.gone:
            if self.request.started:
                self.request.close_connection()
            else:
                self.status = 502
                write_error(self.request, 502, BAD_GATEWAY, self.request_id)
        self.done()

    def _restart_timer(self, now: float) -> None:
        self._last = now
        self._arm(self.service.read_timeout)

    def _arm(self, delay: float) -> None:
        timer = self._timer
        if timer is None:
            timer = self._timer = self.request.lent_timer(self.clock)
        timer.lend(self, self._expired, delay)

    def touch(self, now: float | None = None) -> None:
        """
        Bytes arrived from the target (at C{now}): the read timeout starts
        again.
        """
        self._last = self.clock.seconds() if now is None else now

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.release(self)

    def _expired(self) -> None:
        # (The connection's timer may call early, when it was set for an
        # earlier exchange: what is left is always worked out here.)
        if self._finished:
            return
        timeout = self.service.read_timeout
        last = self._last
        pending = self._pending
        if isinstance(pending, LeanRequest) and pending.sending():
            # The request is still going out (its pace is write_timeout's
            # business): the target's time to answer starts once it is
            # sent.  Look again in a quarter of the timeout...
            self._sending = True
            self._arm(timeout / 4)
            return
        if self._sending:
            # ...and once it is out, count from that look: never early, at
            # most a quarter of the timeout late.
            self._sending = False
            self._last = self.clock.seconds()
            self._arm(timeout)
            return
        if self._relay is not None:
            if self.request.client_stalled() and not self.gone:
                # The target is paused because the client takes nothing:
                # not the target's silence.  (The proxy's channel drops a
                # client that takes nothing for its idle timeout.  One
                # that is gone, as a tunnel's may be before its target
                # closes, pauses nothing.)
                self._arm(timeout)
                return
            # The target's silence counts from when it could send again.
            last = max(last, self.request.client_resumed_at())
        left = last + timeout - self.clock.seconds()
        if left > 0:
            # Bytes came since the timer was set: wait for the rest.
            self._arm(left)
            return
        if self._pending is not None:
            self._timed_out = True
            self._pending.cancel()
        elif self._relay is not None:
            self._relay.stall()

    def _failed(self, failure: Failure, target: Target) -> None:
        self._pending = None
        # (A connect timeout is twisted.internet.error's TimeoutError, not
        # the read timeout's defer.TimeoutError: both are timeouts, 504.)
        if self.gone:
            # The client cancelled: not the target's fault, nor its error.
            self.end(target, str(CLIENT_CLOSED), None)
            self.done()
            return
        timeout = self._timed_out or failure.check(*TIMEOUTS) is not None
        unresolved = failure.check(DNSLookupError) is not None
        self.end(target, "timeout" if timeout else "error", None)
        self.hooks.health.report_failure(target, timeout, unresolved)
        self.error = "read timeout" if self._timed_out else describe(failure)
        # A service's own host (no upstream) is its only target: a name
        # that just failed to resolve would only be looked up again, and
        # every lookup may wait on a slow resolver.
        if self.attempts <= self.service.retries and not (
            unresolved and self.balancer is None
        ):
            following = self._pick()
            if following is not None:
                self._attempt(following)
                return
        if timeout:
            self.fail(504, TIMEOUT)
        elif unresolved:
            # Kong's answer: the target's name did not resolve.
            self.fail(503, NO_NAME)
        else:
            self.fail(502, BAD_GATEWAY)

    def unanswered(self, target: Target, reason: Failure, timed_out: bool) -> None:
        """
        The current attempt's answer broke (or went silent) after its head
        and before any byte of it reached the client: a failed attempt like
        one that got no answer, retried or answered with a 502 or 504.
        """
        self._relay = None
        self.status = 0
        self.upstream_latency = None
        self.request.reset_response()
        self._timed_out = timed_out
        self._failed(reason, target)

    def _response(self, response: IResponse, target: Target, sent: float) -> None:
        self._pending = None
        first_byte = self.clock.seconds() - sent
        status = response.code
        if status == 101:
            # (The lean client gives a 101 only to a request that asked.)
            self._switch(response, target, first_byte)
            return
        # (Headers keep names canonical: read them without getRawHeaders'
        # encoding of the name, on every response.)
        retry_after = response.headers._rawHeaders.get(b"Retry-After")
        self.hooks.health.report_status(
            target, status, retry_after[0] if retry_after else None
        )
        if (
            status in self.service.retry_on_statuses
            and self.attempts <= self.service.retries
            and not self.gone
        ):
            following = self._pick()
            if following is not None:
                # Another target can take it: this answer never reaches
                # the client.
                self.end(target, str(status), first_byte)
                response.deliverBody(Discard())
                self._attempt(following)
                return
        self.upstream_latency = first_byte
        self.status = status
        request = self.request
        request.setResponseCode(status, response.phrase)
        headers = request.responseHeaders = client_response_headers(
            response.headers, request.responseHeaders
        )
        if (
            response.length is not UNKNOWN_LENGTH
            and status not in _NO_LENGTH
            and request.method != b"HEAD"
        ):
            # (Not for a HEAD, 204 or 304, whose length the parser reports
            # as 0: that is not the size of the resource.)
            # Twisted's client keeps Content-Length out of response.headers.
            headers._rawHeaders[b"Content-Length"] = [b"%d" % response.length]
        self.hooks.decorate(self, request)
        self.touch(sent + first_byte)
        relay = Relay(self, target, first_byte)
        self._relay = relay
        response.deliverBody(relay)

    def _switch(self, response: IResponse, target: Target, first_byte: float) -> None:
        """
        The target switched protocols (a WebSocket): pass its 101 on and
        relay bytes both ways until either side closes, or neither sends
        anything for the service's C{read_timeout}.
        """
        self.hooks.health.report_status(target, 101, None)
        self.upstream_latency = first_byte
        self.status = 101
        request = self.request
        request.setResponseCode(101, response.phrase)
        protocol = response.headers._rawHeaders.get(b"Upgrade")
        headers = request.responseHeaders = client_response_headers(
            response.headers, request.responseHeaders
        )
        raw = headers._rawHeaders
        raw[b"Connection"] = [b"upgrade"]
        raw[b"Upgrade"] = protocol or [request.upgrade or b"websocket"]
        # A 1xx has no body to measure (RFC 9110 8.6), whatever the target
        # said: a client could take the length for the tunnel's.
        raw.pop(b"Content-Length", None)
        self.hooks.decorate(self, request)
        self.touch(self._sent + first_byte)
        tunnel = Tunnel(self, target, first_byte)
        self._relay = tunnel
        response.deliverBody(tunnel)

    def _client_gone(self, failure: Failure) -> None:
        self.gone = True
        if self._relay is None and not self.request.started:
            # Gone before any answer came (nginx's and Kong's 499), as the
            # metrics and the access log say, rather than a status of 0.
            self.status = CLIENT_CLOSED
        if self._pending is not None:
            self._pending.cancel()
        if self._relay is not None:
            self._relay.stop()

    def fail(self, code: int, message: str) -> None:
        """
        Answer the client with a gateway error.
        """
        self.status = code
        if not self.gone:
            self.hooks.decorate(self, self.request)
            write_error(self.request, code, message, self.request_id)
        self.done()

    def done(self) -> None:
        """
        The exchange is over: report it once.
        """
        if not self._finished:
            self._finished = True
            self._stop_timer()
            self.hooks.observer.done(self)
            # The relay and the exchange point at each other: break the
            # cycle so both go with reference counting, not a GC pass.
            self._relay = None
            self._pending = None


@functools.lru_cache(maxsize=4096)
def _tls_for(
    host: bytes, target_host: str, verify: bool, trust: CATrust | None
) -> tuple[str, bool, CATrust | None] | None:
    """
    What a TLS connection to a target is for, when it is not the default
    (the target's own name, verified against the system's CAs): the name
    in the C{Host} sent (an upstream's C{host_header}, a preserved client
    C{Host}), which is the name its certificate is for, whether to verify
    it, and against which CAs (the service's C{ca_certificates}; L{None}
    for the system's).  It is part of the pooled connections' key, so a
    connection is lent only to requests that would have verified it the
    same way.
    """
    name = _hostname(host).decode("ascii", "replace").strip("[]")
    if not verify:
        # Nothing is checked: which CAs would have been does not matter.
        return (name, False, None)
    if name == target_host and trust is None:
        return None
    return (name, True, trust)


@functools.lru_cache(maxsize=4096)
def _host_value(host: str, port: int, protocol: str) -> bytes:
    """
    The C{Host} header sent to a target: the same few values on every
    request, formatted once.
    """
    return host_header(host, port, protocol).encode("ascii")


@functools.lru_cache(maxsize=1024)
def _direct_target(service: Service) -> Target:
    """
    The one target of a service whose host is not an upstream: made once
    per service value, not on every attempt.
    """
    return Target(
        id="",
        upstream_id="",
        key=format_target(service.host, service.port),
        host=service.host,
        port=service.port,
        weight=1,
    )

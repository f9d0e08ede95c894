# -*- test-case-name: tests.test_health_state -*-
"""
What one attempt on a target came to, as the health checks see it.

The forwarder (passive checks) and the active prober both describe a
request's end as an L{Outcome}, so one piece of code turns results into
health: the forwarder from a response or a L{Failure}, the prober from its
probe.  Which L{Outcome} counts as a success or a failure is not decided
here: that depends on the upstream's status lists, and is
L{aigateway.health.state}'s job.
"""

from __future__ import annotations

from email.utils import parsedate_to_datetime
from typing import Any

import attrs
from OpenSSL import SSL
from twisted.internet import defer, error
from twisted.python.failure import Failure
from twisted.web.client import RequestTransmissionFailed, ResponseFailed

#: The kinds of L{Outcome}.
STATUS = "status"
CONNECTED = "connected"
TCP_FAILURE = "tcp_failure"
TIMEOUT = "timeout"
DNS_FAILURE = "dns_failure"

#: The longest rate-limit cooldown a C{Retry-After} may ask for, in
#: seconds: a misbehaving upstream must not take a target out for hours.
RETRY_AFTER_CAP = 300.0

#: Exceptions meaning the attempt ran out of time.  twisted.internet.error's
#: TimeoutError is a connect timeout; defer.TimeoutError is addTimeout's.
TIMEOUTS = (defer.TimeoutError, error.TimeoutError, error.TCPTimedOutError)
# Exceptions meaning the target could not be reached or dropped us: refused,
# reset, DNS, TLS, a response that never came or broke off.  (The
# _WrapperException subclasses, ResponseNeverReceived and friends, are looked
# into, below.)
_TCP_FAILURES = (
    error.ConnectError,
    error.ConnectionClosed,
    SSL.Error,
)
# ResponseNeverReceived is a ResponseFailed.
_WRAPPERS = (ResponseFailed, RequestTransmissionFailed)
_CANCELS = (defer.CancelledError, error.ConnectingCancelledError)


@attrs.frozen
class Outcome:
    """
    How one attempt on a target ended.

    @ivar kind: L{STATUS} (a response came), L{CONNECTED} (a TCP probe
        connected), L{TCP_FAILURE} or L{TIMEOUT}.
    @ivar code: the response status, for L{STATUS}.
    @ivar retry_after: the raw C{Retry-After} header of the response, kept
        unparsed because only a 429 needs it, and parsing is not free on the
        hot path.
    """

    kind: str
    code: int = 0
    retry_after: str | None = None

    @classmethod
    def status(cls, code: int, retry_after: str | None = None) -> Outcome:
        """
        A response with status C{code} came.
        """
        if retry_after is None:
            # One value per status: this is called for every proxied
            # response, and a frozen attrs instance is not free to build.
            outcome = _STATUSES.get(code)
            if outcome is None:
                outcome = _STATUSES[code] = cls(STATUS, code)
            return outcome
        return cls(STATUS, code, retry_after)

    @classmethod
    def connected(cls) -> Outcome:
        """
        A TCP connection was made (a C{tcp} probe's success).
        """
        return _CONNECTED

    @classmethod
    def tcp_failure(cls) -> Outcome:
        """
        The connection was refused, reset, or broke before a response.
        """
        return _TCP

    @classmethod
    def timeout(cls) -> Outcome:
        """
        The attempt timed out.
        """
        return _TIMEOUT

    @classmethod
    def dns_failure(cls) -> Outcome:
        """
        The target's host name did not resolve.
        """
        return _DNS


_STATUSES: dict[int, Outcome] = {}
_CONNECTED = Outcome(CONNECTED)
_TCP = Outcome(TCP_FAILURE)
_TIMEOUT = Outcome(TIMEOUT)
_DNS = Outcome(DNS_FAILURE)


def parse_retry_after(value: str, now: float) -> float | None:
    """
    How many seconds a C{Retry-After} header asks to wait, capped.

    Both of RFC 9110's forms are accepted: delay seconds and an HTTP date.

    @param now: the current time in epoch seconds, for a date.
    @return: seconds in C{[0, RETRY_AFTER_CAP]}, or L{None} when the value
        is neither form.
    """
    value = value.strip()
    if value.isdigit():
        delay = float(value)
    else:
        try:
            delay = parsedate_to_datetime(value).timestamp() - now
        except (TypeError, ValueError, IndexError):
            return None
    return min(max(delay, 0.0), RETRY_AFTER_CAP)


def outcome_of_failure(reason: Failure) -> Outcome | None:
    """
    Classify why an attempt failed.

    A cancellation that was not a timeout (the client went away, or we
    stopped) says nothing about the target, and gives L{None}.  So does an
    error that is none of the network errors: a bug of ours must not take
    targets out.  Pass C{onTimeoutCancel=}L{timed_out} to
    L{Deferred.addTimeout} so a timeout that fires while the Agent is
    connecting or waiting is seen as one, not as the
    C{ResponseNeverReceived} the cancellation becomes.

    @return: L{Outcome.timeout}, L{Outcome.dns_failure},
        L{Outcome.tcp_failure} or L{None}.
    """
    exc = reason.value
    if isinstance(exc, _WRAPPERS):
        # The Agent wraps the failures that ended a request.
        found = [outcome_of_failure(inner) for inner in exc.reasons]
        if _TIMEOUT in found:
            return _TIMEOUT
        if _DNS in found:
            return _DNS
        if all(isinstance(inner.value, _CANCELS) for inner in exc.reasons):
            return None
        return _TCP
    if isinstance(exc, TIMEOUTS):
        return _TIMEOUT
    if isinstance(exc, _CANCELS):
        return None
    if isinstance(exc, error.DNSLookupError):
        return _DNS
    if isinstance(exc, _TCP_FAILURES):
        return _TCP
    return None


def timed_out(result: Any, timeout: float) -> Failure:
    """
    An C{onTimeoutCancel} for L{Deferred.addTimeout} that turns whatever the
    cancelled Deferred ended with into L{defer.TimeoutError}.

    Twisted's default converts only a bare L{defer.CancelledError}; an
    Agent request cancelled while waiting for a response fails with
    C{ResponseNeverReceived} instead, and the timeout would be lost.
    """
    return Failure(defer.TimeoutError(timeout, "Deferred"))

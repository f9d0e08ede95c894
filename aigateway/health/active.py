# -*- test-case-name: tests.test_health_active -*-
"""
Active health checks: probing an upstream's targets on a schedule.

L{ActiveChecker} decides I{when} to probe and what a probe's result means;
an L{IProber} does the network part.  Kept apart, the scheduling is tested
exactly with a L{task.Clock} and a fake prober, and L{AgentProber} with real
loopback servers.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    connectProtocol,
)
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import CertificateOptions, optionsForClientTLS
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS, IResponse
from zope.interface import Interface, implementer

from ..addresses import host_header, is_ip
from ..model import Target, Upstream
from .passive import Outcome, outcome_of_failure, timed_out
from .state import Health, TargetHealth

if TYPE_CHECKING:
    from twisted.internet._sslverify import IOpenSSLTrustRoot
    from twisted.internet.ssl import Certificate

    _TrustRoot = IOpenSSLTrustRoot | Certificate | None

_log = Logger()

#: Told of each probe's result: the target's state and the outcome.
ResultHook = Callable[[TargetHealth, Outcome], None]


class IProber(Interface):
    """
    Checks a target once, as the upstream's C{healthchecks.active} says.
    """

    def probe(upstream: Upstream, target: Target) -> defer.Deferred[Outcome]:
        """
        Probe C{target} once.

        @return: a Deferred that fires with the L{Outcome} (a response's
            status, or L{Outcome.connected} for a C{tcp} check), or fails
            with the connection's failure (classified by
            L{aigateway.health.passive.outcome_of_failure}).  Cancelling it
            must abandon the probe, closing its connection.
        """


class ActiveChecker:
    """
    Probes the targets of one upstream.

    Two L{LoopingCall}s run, as in Kong: one probes the healthy targets
    every C{active.healthy.interval} seconds, one the unhealthy ones every
    C{active.unhealthy.interval} (an interval of 0 turns its side off), so
    a failed target can be watched more closely than the ones that work.
    Each round queues the targets of its class that are not already queued
    or being probed; at most C{active.concurrency} probes are in flight,
    each bounded by C{active.timeout} seconds (0: no bound).

    A target in C{DNS_ERROR} belongs to neither class, and would never be
    probed again on an upstream without traffic: each round of either side
    also queues those whose next try of the name is due
    (L{TargetHealth.lookup_due}), so a name is looked up at most every
    C{DNS_RETRY} (5) seconds, or every round when rounds are further apart,
    and the first probe that gets past the lookup puts the target back.

    The checker reads the target states from a mapping its owner keeps up
    to date (by target key), so a round always probes the current targets;
    after removing states, the owner calls L{sync}.
    """

    def __init__(
        self,
        clock: IReactorTime,
        prober: IProber,
        upstream: Upstream,
        states: Mapping[str, TargetHealth],
        on_result: ResultHook,
    ) -> None:
        self._clock = clock
        self._prober = prober
        self._upstream = upstream
        self._states = states
        self._on_result = on_result
        self._loops: list[LoopingCall] = []
        self._queue: deque[str] = deque()
        # Keys queued or in flight, so a slow target is not probed twice.
        self._busy: set[str] = set()
        self._inflight: dict[str, defer.Deferred[Any]] = {}
        self._draining = False
        self._schedule()

    @property
    def in_flight(self) -> int:
        """
        How many probes are running.
        """
        return len(self._inflight)

    def update(self, upstream: Upstream) -> None:
        """
        Take the upstream's new settings; new intervals take effect at once
        (the next rounds are one new interval from now), the other settings
        from the next probe.
        """
        old = self._upstream.healthchecks.active
        self._upstream = upstream
        new = upstream.healthchecks.active
        if (old.healthy.interval, old.unhealthy.interval) != (
            new.healthy.interval,
            new.unhealthy.interval,
        ):
            self._stop_loops()
            self._schedule()
        self._drain()

    def sync(self) -> None:
        """
        Abandon the probes of targets no longer in the states mapping.
        """
        for key, d in list(self._inflight.items()):
            if key not in self._states:
                d.cancel()

    def stop(self) -> None:
        """
        Stop probing: no round is scheduled and no probe is left running.
        """
        self._stop_loops()
        self._queue.clear()
        for d in list(self._inflight.values()):
            d.cancel()

    def _schedule(self) -> None:
        active = self._upstream.healthchecks.active
        for health, interval in [
            (Health.HEALTHY, active.healthy.interval),
            (Health.UNHEALTHY, active.unhealthy.interval),
        ]:
            if interval:
                loop = LoopingCall(self._round, health)
                loop.clock = self._clock
                loop.start(interval, now=False).addErrback(
                    lambda f: _log.failure("health check round", f)
                )
                self._loops.append(loop)

    def _stop_loops(self) -> None:
        for loop in self._loops:
            loop.stop()
        self._loops = []

    def _round(self, health: Health) -> None:
        for key, state in self._states.items():
            if key not in self._busy and (state.health is health or state.lookup_due()):
                self._busy.add(key)
                self._queue.append(key)
        self._drain()

    def _drain(self) -> None:
        # A probe that answers at once calls back here from _start; the
        # outer loop goes on, rather than recursing once per target.
        if self._draining:
            return
        self._draining = True
        try:
            limit = self._upstream.healthchecks.active.concurrency
            while self._queue and len(self._inflight) < limit:
                key = self._queue.popleft()
                state = self._states.get(key)
                if state is None:
                    self._busy.discard(key)
                else:
                    self._start(key, state)
        finally:
            self._draining = False

    def _start(self, key: str, state: TargetHealth) -> None:
        timeout = self._upstream.healthchecks.active.timeout
        probe = defer.maybeDeferred(self._prober.probe, self._upstream, state.target)
        if timeout:
            probe.addTimeout(timeout, self._clock, onTimeoutCancel=timed_out)
        # Recorded before _done is added: a probe that already fired runs it
        # at once, and it must find itself in flight.
        self._inflight[key] = probe
        probe.addErrback(outcome_of_failure).addCallback(self._done, key, state)
        probe.addErrback(lambda f: _log.failure("health check of {key}", f, key=key))

    def _done(self, outcome: Outcome | None, key: str, state: TargetHealth) -> None:
        self._inflight.pop(key, None)
        self._busy.discard(key)
        # None: cancelled by us; a removed target's result is stale.
        if outcome is not None and self._states.get(key) is state:
            self._on_result(state, outcome)
        self._drain()


@implementer(IProber)
class AgentProber:
    """
    Probes over the network: an HTTP(S) C{GET} through an L{Agent}, or a
    TCP connect.

    Probes share one non-persistent L{HTTPConnectionPool}: a probe is rare,
    and a connection kept for it would hide a target that stopped
    accepting new ones.
    """

    def __init__(self, reactor: Any, trust_root: _TrustRoot = None) -> None:
        """
        @param reactor: provides L{IReactorTCP}, L{IReactorTime} and
            L{IReactorPluggableNameResolver}, as L{Agent} needs.
        @param trust_root: the CAs that sign targets' certificates
            (default: the platform's).
        """
        self._reactor = reactor
        self._pool = HTTPConnectionPool(reactor, persistent=False)
        # Twisted logs "Starting/Stopping factory" for every connection of a
        # noisy factory: two log lines per probe.
        self._pool._factory = _QuietHTTP11ClientFactory
        self._trust_root = trust_root

    def probe(self, upstream: Upstream, target: Target) -> defer.Deferred[Outcome]:
        active = upstream.healthchecks.active
        if active.type == "tcp":
            return _connect(_endpoint(self._reactor, target))
        host = upstream.host_header or target.host
        policy = _TLSPolicy(
            active.https_sni or host, active.https_verify_certificate, self._trust_root
        )
        agent = Agent(self._reactor, contextFactory=policy, pool=self._pool)
        headers = Headers()
        for name, value in active.headers:
            headers.addRawHeader(name, value)
        headers.setRawHeaders("host", [host_header(host, target.port, active.type)])
        url = f"{active.type}://{target.key}{active.http_path}"
        return agent.request(b"GET", url.encode("ascii"), headers).addCallback(_status)


class _QuietHTTP11ClientFactory(_HTTP11ClientFactory):
    noisy = False


def _status(response: IResponse) -> Outcome:
    # Only the status matters: drop the connection rather than read a body
    # that may be large, or an endless event stream.
    response.deliverBody(_Discard())
    return Outcome.status(
        response.code, (response.headers.getRawHeaders("retry-after") or [None])[0]
    )


class _Discard(Protocol):
    def connectionMade(self) -> None:
        cast(IPushProducer, self.transport).stopProducing()


def _endpoint(reactor: Any, target: Target) -> IStreamClientEndpoint:
    # An IP target needs no resolver (HostnameEndpoint's runs in a thread).
    if not is_ip(target.host):
        return HostnameEndpoint(reactor, target.host, target.port)
    if ":" in target.host:
        return TCP6ClientEndpoint(reactor, target.host, target.port)
    return TCP4ClientEndpoint(reactor, target.host, target.port)


def _connect(endpoint: IStreamClientEndpoint) -> defer.Deferred[Outcome]:
    def connected(protocol: Protocol) -> Outcome:
        assert protocol.transport is not None
        protocol.transport.loseConnection()
        return Outcome.connected()

    return connectProtocol(endpoint, Protocol()).addCallback(connected)


@implementer(IPolicyForHTTPS)
class _TLSPolicy:
    """
    TLS to a target under the upstream's name: C{https_sni}, else the Host
    the proxy sends; certificates checked unless
    C{https_verify_certificate} is off.
    """

    def __init__(self, name: str, verify: bool, trust_root: _TrustRoot) -> None:
        self._name = name
        self._verify = verify
        self._trust_root = trust_root

    def creatorForNetloc(
        self, hostname: bytes, port: int
    ) -> IOpenSSLClientConnectionCreator:
        if self._verify:
            return optionsForClientTLS(self._name, trustRoot=self._trust_root)
        return _Unverified(self._name)


@implementer(IOpenSSLClientConnectionCreator)
class _Unverified:
    """
    TLS that checks nothing but still sends SNI, which
    L{CertificateOptions} alone does not: a target behind a name-based TLS
    front end needs it even when its certificate is not checked.
    """

    def __init__(self, name: str) -> None:
        self._context = CertificateOptions().getContext()
        self._sni = None if is_ip(name) else name.encode("idna")

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        if self._sni:
            connection.set_tlsext_host_name(self._sni)
        return connection

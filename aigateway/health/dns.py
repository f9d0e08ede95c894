# -*- test-case-name: tests.test_health_dns -*-
"""
Looking up the host names of targets, so the health endpoint can say what
a name resolves to, or that it does not.

Kong resolves a target's name when the target is added and lists one
address per IP found; a name that does not resolve leaves the target with
no addresses and out of the balancer (C{DNS_ERROR}).  The proxy here looks
names up itself, on each new connection (its L{HostnameEndpoint}s), so
these lookups do not steer traffic to an address: they make the report
true, take a target whose name stopped resolving out before a request
finds out, and bring it back when the name resolves again, traffic or
not.

A name is looked up as soon as its target is known, then every
L{LOOKUP_REFRESH} seconds; after a failure every L{DNS_RETRY} seconds,
sharing that schedule with the proxied attempts and probes that also try
the name (L{TargetHealth.take_lookup}).  IP targets are never looked up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHostnameResolver,
    IHostResolution,
    IReactorTime,
    IResolutionReceiver,
)
from twisted.logger import Logger
from zope.interface import implementer

from .state import DNS_RETRY, TargetHealth

#: Seconds between lookups of a name that resolves.  The system resolver
#: gives no TTL; Kong's own default for a record without one is 30 s too.
LOOKUP_REFRESH = 30.0
#: Seconds a lookup may take before the name counts as not resolving (a
#: late answer still counts when it comes).  The system resolver's default
#: is 5 s per try, twice.
LOOKUP_TIMEOUT = 10.0


@implementer(IHostnameResolver)
class ReactorNames:
    """
    The reactor's name resolver, asked for at each lookup: the same one the
    proxy's L{HostnameEndpoint}s use, whichever is installed when they run
    (tests install their own).
    """

    def __init__(self, reactor: Any) -> None:
        """
        @param reactor: provides L{IReactorPluggableNameResolver}.
        """
        self._reactor = reactor

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Sequence[type[IAddress]] | None = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        resolver: IHostnameResolver = self._reactor.nameResolver
        return resolver.resolveHostName(
            resolutionReceiver, hostName, portNumber, addressTypes, transportSemantics
        )


@implementer(IResolutionReceiver)
class _Receiver:
    """
    Gathers the IP addresses one lookup found, in order, once each.
    """

    def __init__(self, done: Callable[[tuple[str, ...]], None]) -> None:
        self._done = done
        self._found: dict[str, None] = {}
        self._complete = False

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:
        pass

    def addressResolved(self, address: IAddress) -> None:
        host = getattr(address, "host", None)
        if isinstance(host, str):
            self._found[host] = None

    def resolutionComplete(self) -> None:
        if not self._complete:
            self._complete = True
            self._done(tuple(self._found))


class _Watch:
    """
    The lookups of one target's name: the next one's timer, and whether
    one is out (a name is never asked again before its last answer came:
    a hung resolver would otherwise take one thread per try).
    """

    def __init__(self, state: TargetHealth) -> None:
        self.state = state
        self.timer: IDelayedCall | None = None
        self.deadline: IDelayedCall | None = None
        self.busy = False

    def cancel(self) -> None:
        for call in (self.timer, self.deadline):
            if call is not None and call.active():
                call.cancel()
        self.timer = self.deadline = None


class NameLookups:
    """
    Looks up the names of the targets it watches, and tells each target's
    state what its name resolved to (L{TargetHealth.resolved}) or that it
    did not (L{TargetHealth.lookup_failed}).
    """

    def __init__(
        self,
        clock: IReactorTime,
        resolver: IHostnameResolver | None,
        log: Logger | None = None,
    ) -> None:
        """
        @param resolver: what names are looked up with (L{ReactorNames} in
            production); L{None} looks nothing up, for tests of IP targets,
            and leaves names C{DNS_PENDING}.
        """
        self._clock = clock
        self._resolver = resolver
        self._log = log or Logger()
        self._watched: dict[TargetHealth, _Watch] = {}

    def watch(self, state: TargetHealth) -> None:
        """
        Look up the name of C{state}'s target now, and from then on; an IP
        target, or one already watched, is left as it is.
        """
        if self._resolver is None or not state.named:
            return
        if state not in self._watched:
            watch = self._watched[state] = _Watch(state)
            self._lookup(watch)

    def forget(self, state: TargetHealth) -> None:
        """
        Stop looking up C{state}'s name (its target is gone); a lookup
        that is out is not told to anyone when it ends.
        """
        watch = self._watched.pop(state, None)
        if watch is not None:
            watch.cancel()

    def wake(self, state: TargetHealth) -> None:
        """
        C{state} changed health: look its name up again when that is now
        due sooner than planned.  Into L{Health.DNS_ERROR} (a proxied
        attempt or a probe failed to resolve it), the next try is
        L{DNS_RETRY} seconds away, not a refresh away; out of it without a
        lookup (an attempt got through, checks were turned on), the
        addresses are unknown, and are looked up at once.
        """
        watch = self._watched.get(state)
        if watch is None or watch.busy:
            return
        at = state.lookup_at()
        if at is not None:
            self._schedule(watch, at - self._clock.seconds())
        elif state.addresses is None:
            # (Not from within the transition that called here.)
            self._schedule(watch, 0)

    def stop(self) -> None:
        """
        Look nothing up any more; L{watch} starts again.
        """
        watched, self._watched = self._watched, {}
        for watch in watched.values():
            watch.cancel()

    def _schedule(self, watch: _Watch, delay: float) -> None:
        if watch.timer is not None and watch.timer.active():
            watch.timer.cancel()
        watch.timer = self._clock.callLater(max(delay, 0.0), self._due, watch)

    def _due(self, watch: _Watch) -> None:
        watch.timer = None
        self._lookup(watch)

    def _lookup(self, watch: _Watch) -> None:
        state = watch.state
        if watch.busy:
            # The last lookup has not answered yet (past its deadline).
            self._schedule(watch, DNS_RETRY)
            return
        if not state.take_lookup():
            # A proxied attempt or a probe tried the name lately.
            self._retry(watch)
            return
        assert self._resolver is not None
        watch.busy = True
        watch.deadline = self._clock.callLater(LOOKUP_TIMEOUT, self._late, watch)
        target = state.target
        receiver = _Receiver(lambda found: self._done(watch, found))
        try:
            self._resolver.resolveHostName(receiver, target.host, target.port)
        except Exception:
            self._log.failure("looking up {host}", host=target.host)
            receiver.resolutionComplete()

    def _late(self, watch: _Watch) -> None:
        watch.deadline = None
        state = watch.state
        self._log.warn(
            "looking up {host} took over {timeout} s",
            host=state.target.host,
            timeout=LOOKUP_TIMEOUT,
        )
        state.lookup_failed()
        # The next try waits for this one's answer (see _lookup).
        self._schedule(watch, DNS_RETRY)

    def _done(self, watch: _Watch, found: tuple[str, ...]) -> None:
        if self._watched.get(watch.state) is not watch:
            return  # forgotten, or stopped, meanwhile
        watch.busy = False
        if watch.deadline is not None and watch.deadline.active():
            watch.deadline.cancel()
        watch.deadline = None
        state = watch.state
        if found:
            state.resolved(found)
            self._schedule(watch, LOOKUP_REFRESH)
        else:
            # (The transition to DNS_ERROR is logged by the manager.)
            state.lookup_failed()
            self._retry(watch)

    def _retry(self, watch: _Watch) -> None:
        """
        Look the name up again when its next try is due.
        """
        at = watch.state.lookup_at()
        now = self._clock.seconds()
        self._schedule(watch, DNS_RETRY if at is None else at - now)

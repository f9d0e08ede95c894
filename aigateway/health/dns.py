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

Each name is looked up once, whichever targets use it (in one upstream or
several, on one port or several), and its answer is given to all of them.
A name is looked up as soon as its first target is known, then about
every L{LOOKUP_REFRESH} seconds (less up to L{LOOKUP_JITTER} of it, at
random, so that names added together are not refreshed together); after a
failure every L{DNS_RETRY} seconds, sharing that schedule with the proxied
attempts and probes that also try the name (L{TargetHealth.take_lookup}).
IP targets are never looked up.

The system resolver runs on the reactor's thread pool, the one the proxy's
own lookups need (ten threads by default): at most L{LOOKUPS_AT_ONCE}
lookups are out at once, and the others wait their turn in the order they
became due, so a thousand names never keep the proxy waiting for a thread.
A lookup's L{LOOKUP_TIMEOUT} runs from when it is sent, not while it
waits; with many names, or a slow resolver, names are refreshed as often
as the queue allows rather than every L{LOOKUP_REFRESH} seconds.
"""

from __future__ import annotations

import random
from collections import deque
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

from .state import DNS_RETRY, Health, TargetHealth

#: Seconds between lookups of a name that resolves, at most (see
#: L{LOOKUP_JITTER}).  The system resolver gives no TTL; Kong's own default
#: for a record without one is 30 s too.
LOOKUP_REFRESH = 30.0
#: The share of L{LOOKUP_REFRESH} a refresh comes early by, at most (a
#: random share, drawn at each answer).
LOOKUP_JITTER = 0.2
#: Seconds a lookup may take once sent before the name counts as not
#: resolving (a late answer still counts when it comes).  The system
#: resolver's default is 5 s per try, twice.
LOOKUP_TIMEOUT = 10.0
#: Lookups out at once, at most: a few of the reactor's ten threads, so the
#: proxy always has the others.  A lookup past its L{LOOKUP_TIMEOUT} still
#: holds its place until it answers, as it still holds a thread.
LOOKUPS_AT_ONCE = 3


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


class _Name:
    """
    One host name and the targets that use it: when it is next due, and
    whether its lookup waits in the queue or is out.  A name is never asked
    again before its last answer came: a hung resolver would otherwise take
    one thread per try.  A name whose targets are all gone is kept while
    its lookup is out, so that a target that comes back joins that lookup.

    @ivar found: what the last answer found (C{()}: the name did not
        resolve), or L{None} before any.
    @ivar refresh_at: when a name that resolved is due again (clock
        seconds), or L{None} after a failure.
    @ivar sent_at: when the lookup out was sent, or L{None} when none is.
    """

    def __init__(self, key: str, host: str) -> None:
        self.key = key
        self.host = host
        self.states: dict[TargetHealth, None] = {}
        self.found: tuple[str, ...] | None = None
        self.refresh_at: float | None = None
        self.sent_at: float | None = None
        self.queued = False
        self.timer: IDelayedCall | None = None
        self.deadline: IDelayedCall | None = None

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
        jitter: Callable[[], float] = random.random,
    ) -> None:
        """
        @param resolver: what names are looked up with (L{ReactorNames} in
            production); L{None} looks nothing up, for tests of IP targets,
            and leaves names C{DNS_PENDING}.
        @param jitter: a number in [0, 1) at each call, the share of
            L{LOOKUP_JITTER} a refresh comes early by; tests pass a
            constant.
        """
        self._clock = clock
        self._resolver = resolver
        self._log = log or Logger()
        self._jitter = jitter
        self._names: dict[str, _Name] = {}
        self._of: dict[TargetHealth, _Name] = {}
        self._queue: deque[_Name] = deque()
        # Lookups out, those of forgotten names included: each holds a
        # thread until it answers.
        self._out = 0
        self._sending = False

    def watch(self, state: TargetHealth) -> None:
        """
        Look up the name of C{state}'s target from now on: at once when no
        other target uses it; otherwise C{state} takes the name's last
        answer, or waits for the lookup under way.  An IP target, or one
        already watched, is left as it is.
        """
        if self._resolver is None or not state.named or state in self._of:
            return
        host = state.target.host
        key = host.lower()
        name = self._names.get(key)
        if name is None:
            name = self._names[key] = _Name(key, host)
        name.states[state] = None
        self._of[state] = name
        if name.sent_at is not None:
            self._join(name, state)
        elif name.found is None:
            if not name.queued:
                self._enqueue(name)
        elif name.found:
            state.resolved(name.found)
        else:
            state.lookup_failed()

    def forget(self, state: TargetHealth) -> None:
        """
        Stop looking up C{state}'s name for it (its target is gone); a
        lookup that is out is not told to anyone when it ends, unless
        another target uses the name.
        """
        name = self._of.pop(state, None)
        if name is not None:
            del name.states[state]
            if not name.states:
                self._drop(name)

    def wake(self, state: TargetHealth) -> None:
        """
        C{state} changed health: look its name up again when that is now
        due sooner or later than planned.  Into L{Health.DNS_ERROR} (a
        proxied attempt or a probe failed to resolve it), the next try is
        L{DNS_RETRY} seconds away, not a refresh away; out of it without a
        lookup (an attempt got through, checks were turned on), the
        addresses are unknown, and are looked up at once.
        """
        name = self._of.get(state)
        if name is not None and name.sent_at is None and not name.queued:
            self._plan(name)

    def stop(self) -> None:
        """
        Look nothing up any more; L{watch} starts again.  The lookups out
        are remembered until they answer: they still hold their threads,
        and a name watched again meanwhile waits for its answer rather
        than being asked a second time.
        """
        self._of.clear()
        self._queue.clear()
        for name in list(self._names.values()):
            name.states.clear()
            self._drop(name)

    def _drop(self, name: _Name) -> None:
        """
        The last target of C{name} is gone: no more lookups of it, and
        none of its timers left; kept while its lookup is out.
        """
        name.cancel()
        name.queued = False  # (left in the queue, and passed over there)
        if name.sent_at is None and self._names.get(name.key) is name:
            del self._names[name.key]

    def _join(self, name: _Name, state: TargetHealth) -> None:
        """
        C{state} waits for the lookup of C{name} that is out; after
        L{stop} or L{forget}, that lookup lost its deadline, which is set
        again from when the lookup was sent.
        """
        if name.deadline is not None:
            return
        assert name.sent_at is not None
        left = name.sent_at + LOOKUP_TIMEOUT - self._clock.seconds()
        if left > 0:
            name.deadline = self._clock.callLater(left, self._late, name)
        else:
            state.lookup_failed()

    def _plan(self, name: _Name) -> None:
        """
        Set C{name}'s timer for when the first of its targets wants it
        looked up: its refresh, the next try of a target in
        L{Health.DNS_ERROR}, or now for one whose addresses are unknown.
        """
        now = self._clock.seconds()
        at: float | None = None
        for state in name.states:
            if state.health is Health.DNS_ERROR:
                due = state.lookup_at()
                due = now + DNS_RETRY if due is None else due
            elif state.addresses is None or name.refresh_at is None:
                due = now
            else:
                # (Not for targets in DNS_ERROR: a refresh that came due
                # while they all waited for their next try would be due
                # again and again.)
                due = name.refresh_at
            at = due if at is None else min(at, due)
        if at is None:
            at = now + DNS_RETRY
        if name.timer is not None and name.timer.active():
            name.timer.cancel()
        name.timer = self._clock.callLater(max(at - now, 0.0), self._due, name)

    def _due(self, name: _Name) -> None:
        name.timer = None
        if any(
            state.health is not Health.DNS_ERROR or state.lookup_due()
            for state in name.states
        ):
            self._enqueue(name)
        else:
            # A proxied attempt or a probe tried the name lately.
            self._plan(name)

    def _enqueue(self, name: _Name) -> None:
        if name.timer is not None and name.timer.active():
            name.timer.cancel()
        name.timer = None
        name.queued = True
        self._queue.append(name)
        self._send_queued()

    def _send_queued(self) -> None:
        # Not re-entered from a lookup answered at once, which would
        # recurse once per name: the loop goes on instead.
        if self._sending:
            return
        self._sending = True
        try:
            while self._queue and self._out < LOOKUPS_AT_ONCE:
                name = self._queue.popleft()
                if name.queued:
                    name.queued = False
                    self._send(name)
        finally:
            self._sending = False

    def _send(self, name: _Name) -> None:
        # Every target in DNS_ERROR whose try is due takes this lookup as
        # its try (each must be asked: no short cut).
        takers = [state.take_lookup() for state in list(name.states)]
        if not any(takers):
            # Tried by a proxied attempt or a probe while it waited.
            self._plan(name)
            return
        assert self._resolver is not None
        self._out += 1
        name.sent_at = self._clock.seconds()
        name.deadline = self._clock.callLater(LOOKUP_TIMEOUT, self._late, name)
        receiver = _Receiver(lambda found: self._answered(name, found))
        try:
            self._resolver.resolveHostName(receiver, name.host)
        except Exception:
            self._log.failure("looking up {host}", host=name.host)
            receiver.resolutionComplete()

    def _late(self, name: _Name) -> None:
        name.deadline = None
        self._log.warn(
            "looking up {host} took over {timeout} s",
            host=name.host,
            timeout=LOOKUP_TIMEOUT,
        )
        # (The next lookup waits for this one's answer: see _answered.)
        for state in list(name.states):
            state.lookup_failed()

    def _answered(self, name: _Name, found: tuple[str, ...]) -> None:
        self._out -= 1
        if name.deadline is not None and name.deadline.active():
            name.deadline.cancel()
        name.deadline = None
        if name.states:
            name.found = found
            # (Still out while the targets hear of it, so that their
            # transitions plan nothing; the transition to DNS_ERROR is
            # logged by the manager.)
            for state in list(name.states):
                if found:
                    state.resolved(found)
                else:
                    state.lookup_failed()
            name.sent_at = None
            if found:
                early = LOOKUP_JITTER * self._jitter()
                name.refresh_at = self._clock.seconds() + LOOKUP_REFRESH * (1 - early)
            else:
                name.refresh_at = None
            self._plan(name)
        else:
            # Forgotten, or stopped, meanwhile.
            name.sent_at = None
            self._drop(name)
        self._send_queued()

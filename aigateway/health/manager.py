# -*- test-case-name: tests.test_health_manager -*-
"""
The node's health checking, in one object: the proxy asks it which targets
are available and tells it how attempts went, the Admin API reads and sets
health, and each new configuration snapshot is handed to it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, Union

import attrs
from twisted.internet.interfaces import IHostnameResolver, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..addresses import is_ip
from ..balancer.interfaces import IHealthPeek
from ..config import ConfigSnapshot
from ..model import Target, Upstream
from .active import ActiveChecker, IProber
from .dns import NameLookups
from .passive import Outcome, outcome_of_failure
from .state import ACTIVE, COUNTERS, PASSIVE, Health, TargetHealth


@attrs.frozen
class Transition:
    """
    A target's health changed.

    @ivar cause: what changed it: C{"active timeouts"}, C{"passive
        http_failures"}, C{"passive trial"}, C{"manual"}, C{"healthchecks
        off"}...
    """

    upstream: str
    upstream_id: str
    target: str
    old: Health
    new: Health
    cause: str


@attrs.frozen
class Probed:
    """
    An active probe of a target ended (for metrics).
    """

    upstream: str
    upstream_id: str
    target: str
    outcome: Outcome


HealthEvent = Union[Transition, Probed]
Observer = Callable[[HealthEvent], None]


@implementer(IHealthPeek)
class HealthManager:
    """
    Health checking for every upstream of this node.

    A target is checked when its weight is positive: a weight-0 target gets
    no traffic and no probes, and is described as C{HEALTHCHECKS_OFF}.
    Targets are known by upstream id and C{host:port}, so a target's health
    survives configuration changes that keep it.  The host name of a
    checked target is looked up as soon as the target is known (a few
    names at a time, the others queued), and kept looked up, once for every
    target that uses it (L{NameLookups}).
    """

    def __init__(
        self,
        clock: IReactorTime,
        prober: IProber,
        log: Logger | None = None,
        resolver: IHostnameResolver | None = None,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        """
        @param clock: the reactor, or a L{task.Clock} in tests.
        @param prober: what active checks probe with (L{AgentProber} in
            production).
        @param resolver: what targets' host names are looked up with
            (L{aigateway.health.dns.ReactorNames} in production); without
            one, names are never looked up and stay C{DNS_PENDING}.
        @param jitter: what spreads the refreshes of names (see
            L{NameLookups}); tests pass a constant.
        """
        self._clock = clock
        self._prober = prober
        self._log = log or Logger()
        self._lookups = NameLookups(clock, resolver, self._log, jitter)
        self._upstreams: dict[str, Upstream] = {}
        # Target states by upstream id, then key; each ActiveChecker reads
        # its upstream's dict, so it is changed in place, never replaced.
        self._states: dict[str, dict[str, TargetHealth]] = {}
        self._checkers: dict[str, ActiveChecker] = {}
        self._observers: list[Observer] = []
        self._stopped = False

    def update(self, snapshot: ConfigSnapshot) -> None:
        """
        Follow a new configuration: new targets start healthy (or
        C{HEALTHCHECKS_OFF}) and their names are looked up (in turn),
        unchanged ones keep their state, removed ones are forgotten and
        their probes and lookups abandoned, and active checks are started,
        stopped or rescheduled as the upstreams now say.  After L{stop}
        the states follow the configuration still, but nothing is started.
        """
        lookups = self._lookups
        for uid in [u for u in self._upstreams if u not in snapshot.upstreams_by_id]:
            checker = self._checkers.pop(uid, None)
            if checker is not None:
                checker.stop()
            for state in self._states[uid].values():
                lookups.forget(state)
            del self._upstreams[uid], self._states[uid]
        for uid, upstream in snapshot.upstreams_by_id.items():
            self._upstreams[uid] = upstream
            states = self._states.setdefault(uid, {})
            wanted = {t.key: t for t in snapshot.targets.get(uid, ()) if t.weight > 0}
            for key in [k for k in states if k not in wanted]:
                lookups.forget(states.pop(key))
            for key, target in wanted.items():
                known = states.get(key)
                if known is None:
                    state = states[key] = TargetHealth(
                        target, upstream, self._clock, self._transition
                    )
                else:
                    state = known
                    state.reconfigure(target, upstream)
                if not self._stopped:
                    # (Watching a watched target does nothing.)
                    lookups.watch(state)
            if not self._stopped:
                self._update_checker(upstream, states)

    def _update_checker(
        self, upstream: Upstream, states: dict[str, TargetHealth]
    ) -> None:
        checker = self._checkers.get(upstream.id)
        if not upstream.healthchecks.active.enabled:
            if checker is not None:
                del self._checkers[upstream.id]
                checker.stop()
        elif checker is None:
            self._checkers[upstream.id] = ActiveChecker(
                self._clock, self._prober, upstream, states, self._probed
            )
        else:
            checker.update(upstream)
            checker.sync()

    def _state(self, target: Target) -> TargetHealth | None:
        states = self._states.get(target.upstream_id)
        return None if states is None else states.get(target.key)

    def available(self, target: Target) -> bool:
        """
        Whether C{target} may be given traffic now; see
        L{TargetHealth.available}: a true answer for an unhealthy target is
        its trial request, so call this only to pick.
        """
        states = self._states.get(target.upstream_id)
        if states is None:
            return True
        state = states.get(target.key)
        return state is None or state.available()

    def eligible(self, target: Target) -> bool:
        """
        Whether L{available} would say yes now, granting no trial: for a
        balancer weighing candidates; see L{TargetHealth.eligible}.
        """
        states = self._states.get(target.upstream_id)
        if states is None:
            return True
        state = states.get(target.key)
        return state is None or state.eligible()

    def is_available(self, target: Target) -> bool:
        """
        Whether C{target} counts as available weight, for reports such as
        the health endpoint: a target out of rotation is not, even when it
        is due a trial request; see L{TargetHealth.is_available}.
        """
        state = self._state(target)
        return state is None or state.is_available()

    def report(self, target: Target, outcome: Outcome) -> None:
        """
        The passive hook: how a proxied attempt on C{target} ended.
        """
        state = self._state(target)
        if state is not None:
            state.record(outcome, PASSIVE)

    def report_status(
        self, target: Target, status: int, retry_after: bytes | str | None = None
    ) -> None:
        """
        A proxied attempt got a response (C{retry_after}: its raw
        C{Retry-After} header).
        """
        state = self._state(target)
        if state is None:
            return
        if isinstance(retry_after, bytes):
            retry_after = retry_after.decode("latin-1")
        state.record(Outcome.status(status, retry_after), PASSIVE)

    def report_failure(self, target: Target, timeout: bool, dns: bool = False) -> None:
        """
        A proxied attempt got no response: it timed out, the target's name
        did not resolve (C{dns}), or the connection failed.
        """
        if dns:
            outcome = Outcome.dns_failure()
        elif timeout:
            outcome = Outcome.timeout()
        else:
            outcome = Outcome.tcp_failure()
        self.report(target, outcome)

    def report_error(self, reason: Failure, target: Target) -> Failure:
        """
        An errback reporting why a proxied attempt failed, for
        C{d.addErrback(health.report_error, target)}; the failure goes on
        down the chain.  A cancellation that was not a timeout is not the
        target's fault and is not reported (see
        L{aigateway.health.passive.outcome_of_failure}, and use its
        C{timed_out} with C{addTimeout}).
        """
        outcome = outcome_of_failure(reason)
        if outcome is not None:
            self.report(target, outcome)
        return reason

    def set_manual(self, target: Target, healthy: bool) -> None:
        """
        Set a target's health by hand (an unchecked target is ignored).
        """
        state = self._state(target)
        if state is not None:
            state.set_manual(healthy)

    def retry_after(self, upstream_id: str) -> float | None:
        """
        Seconds until the first rate-limit cooldown of the upstream's targets
        ends, or L{None} when none is cooling down: what a client that found
        no target available should be told to wait.
        """
        now = self._clock.seconds()
        ends = [
            state.cooldown_until
            for state in self._states.get(upstream_id, {}).values()
            if state.cooldown_until > now
        ]
        return min(ends) - now if ends else None

    def describe(self, target: Target) -> dict[str, Any]:
        """
        C{{"health", "cooldown_until", "counters"}} of C{target}, for the
        health endpoint.
        """
        state = self._state(target)
        if state is None:
            return {
                "health": Health.HEALTHCHECKS_OFF.value,
                "cooldown_until": None,
                "counters": dict.fromkeys(COUNTERS, 0),
            }
        return state.describe()

    def addresses(self, target: Target) -> tuple[str, ...]:
        """
        The IP addresses to list for C{target} in the health endpoint, one
        per address its name resolved to (see
        L{TargetHealth.shown_addresses}); none while it is not known.
        """
        state = self._state(target)
        if state is None:
            return (target.host,) if is_ip(target.host) else ()
        return state.shown_addresses()

    def upstream_health(self, upstream_id: str) -> str:
        """
        C{HEALTHCHECKS_OFF} when the upstream checks nothing, else
        C{HEALTHY} while any of its targets is available (L{is_available}),
        else C{UNHEALTHY}.
        """
        upstream = self._upstreams.get(upstream_id)
        if upstream is None or not upstream.healthchecks.enabled:
            return Health.HEALTHCHECKS_OFF.value
        if any(s.is_available() for s in self._states[upstream_id].values()):
            return Health.HEALTHY.value
        return Health.UNHEALTHY.value

    def add_observer(self, observer: Observer) -> None:
        """
        Call C{observer} with every L{Transition} and L{Probed} event.
        """
        self._observers.append(observer)

    def remove_observer(self, observer: Observer) -> None:
        """
        Stop calling C{observer}.
        """
        self._observers.remove(observer)

    def stop(self) -> None:
        """
        Stop every active check and name lookup and abandon the probes in
        flight, for good: the node is stopping.  States are kept, and a
        configuration put in force later (a store's late answer) still
        updates them, but starts no check and no lookup.
        """
        self._stopped = True
        checkers, self._checkers = self._checkers, {}
        for checker in checkers.values():
            checker.stop()
        self._lookups.stop()

    def _emit(self, event: HealthEvent) -> None:
        for observer in list(self._observers):
            try:
                observer(event)
            except Exception:
                # A broken metric must not break health checking.
                self._log.failure("health observer {observer!r}", observer=observer)

    def _transition(
        self, state: TargetHealth, old: Health, new: Health, cause: str
    ) -> None:
        upstream = state.upstream
        self._log.info(
            "upstream {upstream} target {target}: {old} -> {new} ({cause})",
            upstream=upstream.name,
            target=state.target.key,
            old=old.value,
            new=new.value,
            cause=cause,
        )
        self._emit(
            Transition(upstream.name, upstream.id, state.target.key, old, new, cause)
        )
        self._lookups.wake(state)

    def _probed(self, state: TargetHealth, outcome: Outcome) -> None:
        upstream = state.upstream
        self._emit(Probed(upstream.name, upstream.id, state.target.key, outcome))
        state.record(outcome, ACTIVE)

# -*- test-case-name: tests.test_health_state -*-
"""
The health of one target on this node: Kong's counters and states, plus
our two additions (a passive cooldown that gives a failed target a trial
request, and a rate-limit cooldown from C{429 Retry-After}).

Everything here is pure: it changes only on the events it is told of
(L{TargetHealth.record}, L{TargetHealth.set_manual},
L{TargetHealth.reconfigure}, and the lookups of its name:
L{TargetHealth.resolved}, L{TargetHealth.lookup_failed}) and reads time
from the clock it is given, so a L{task.Clock} drives it exactly in tests.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime

from ..addresses import is_ip
from ..model import Target, Upstream
from .config import Active, Passive
from .passive import (
    CONNECTED,
    DNS_FAILURE,
    STATUS,
    TCP_FAILURE,
    Outcome,
    parse_retry_after,
)


class Health(enum.Enum):
    """
    A target's health, as the Admin API shows it.
    """

    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"
    #: The upstream checks nothing: the target is always available.
    HEALTHCHECKS_OFF = "HEALTHCHECKS_OFF"
    #: The target's host name did not resolve when last tried.
    DNS_ERROR = "DNS_ERROR"
    #: Shown, never a state of the machine: the target's host name has not
    #: been looked up yet (or not since it last failed), so its addresses
    #: are unknown; shown instead of C{HEALTHY} or C{HEALTHCHECKS_OFF},
    #: which would claim addresses nobody has seen.
    DNS_PENDING = "DNS_PENDING"


#: Seconds between tries of a target whose name did not resolve (Kong's
#: resolver caches a failed lookup for seconds too, then tries again).
DNS_RETRY = 5.0

#: Where an outcome came from, which selects the thresholds it is held to.
ACTIVE = "active"
PASSIVE = "passive"
#: The cause of a transition made by hand.
MANUAL = "manual"

#: The counters, named as the thresholds in the C{healthchecks} tree.
SUCCESSES = "successes"
HTTP_FAILURES = "http_failures"
TCP_FAILURES = "tcp_failures"
TIMEOUTS = "timeouts"
COUNTERS = (SUCCESSES, HTTP_FAILURES, TCP_FAILURES, TIMEOUTS)

#: Told of every transition: the target's state, old health, new health and
#: the cause (C{"active timeouts"}, C{"passive trial"}, C{"manual"}, ...).
TransitionHook = Callable[["TargetHealth", Health, Health, str], None]


def classify(outcome: Outcome, checks: Active | Passive) -> str | None:
    """
    Which counter an outcome feeds, under one side's settings.

    A status in neither list is ignored, as Kong does.  Under a C{tcp}
    check any response is a success: the connection worked.

    @return: one of L{COUNTERS}, or L{None} when the outcome is ignored.
    """
    kind = outcome.kind
    if kind == STATUS:
        if checks.type == "tcp" or outcome.code in checks.healthy.http_statuses:
            return SUCCESSES
        if outcome.code in checks.unhealthy.http_statuses:
            return HTTP_FAILURES
        return None
    if kind == CONNECTED:
        return SUCCESSES
    return TCP_FAILURES if kind == TCP_FAILURE else TIMEOUTS


class TargetHealth:
    """
    The health state machine of one target.

    States and what moves between them::

      HEALTHY    -- failures of one kind reach its threshold --> UNHEALTHY
      UNHEALTHY  -- successes reach healthy.successes -------> HEALTHY
      UNHEALTHY  -- (passive) a trial request succeeds ------> HEALTHY
      any        -- set by hand ---------------------------> HEALTHY/UNHEALTHY
      any but DNS_ERROR -- healthchecks turned off / on ----> HEALTHCHECKS_OFF/HEALTHY
      any        -- its host name does not resolve ---------> DNS_ERROR
      DNS_ERROR  -- a lookup, attempt or probe gets past it --> the state before

    A target in C{DNS_ERROR} gets no traffic, whether checks are on or off
    (as in Kong), except one trial every L{DNS_RETRY} seconds; the node's
    own lookups of the name (L{aigateway.health.dns}) share those tries
    (L{take_lookup}), so a name that resolves again brings the target back
    without traffic or active checks.

    Counters count I{consecutive} events, as lua-resty-healthcheck does: a
    success clears the failure counters and a failure the success counter;
    only the counters that can move the target are kept (failures while
    healthy, successes while unhealthy); a threshold of 0 disables its
    counter; every transition clears them all.  Active and passive outcomes
    share the counters, as in lua-resty-healthcheck, but each is held to
    its own side's thresholds.  Proxied outcomes count only while passive
    checks are on (L{Passive.on}): otherwise a target that serves traffic
    but fails its probes would have the probes' failures cleared by every
    proxied success, and never be taken out.  A host name that does not
    resolve and a C{429} with C{Retry-After} are not passive checks: they
    act whatever the checks are.

    Two cooldowns sit beside the state.  A target made unhealthy by
    I{passive} failures would otherwise never come back without active
    checks (Kong's behaviour, ours when C{passive.unhealthy.cooldown} is 0):
    after the cooldown it is offered one trial request, whose success makes
    it healthy and whose failure restarts the cooldown; an unreported trial
    is replaced by another a cooldown later.  A C{429} with C{Retry-After}
    makes a target unavailable until then without counting as a failure:
    the target is fine, only busy.

    Beside the state sits what the target's name resolved to
    (L{addresses}): Kong lists a target's addresses, and a target that has
    none (its name not looked up yet) is not shown as healthy nor counted
    as available weight, though it keeps taking traffic (the proxy looks
    the name up itself when it connects).

    @ivar health: the current L{Health}.
    @ivar named: whether the target's host is a name (not an IP address).
    @ivar addresses: the IP addresses of the target: its host for an IP
        target; for a name, what the last lookup found, or L{None} until a
        lookup succeeds (and again after the name failed to resolve).
    @ivar counters: the counters by name (L{COUNTERS}).
    @ivar cooldown_until: the end of a rate-limit cooldown (clock seconds),
        or 0.
    """

    def __init__(
        self,
        target: Target,
        upstream: Upstream,
        clock: IReactorTime,
        on_transition: TransitionHook,
    ) -> None:
        self.target = target
        self.upstream = upstream
        self._clock = clock
        self._notify = on_transition
        self.health = (
            Health.HEALTHY if upstream.healthchecks.enabled else Health.HEALTHCHECKS_OFF
        )
        # Whether traffic may go (HEALTHY or HEALTHCHECKS_OFF), kept beside
        # health so available() reads one attribute.
        self._up = True
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.cooldown_until = 0.0
        # When a passively failed target gets its next trial (None: never),
        # and whether a trial is out, so its report ends it.
        self._trial_at: float | None = None
        self._trial_out = False
        # The health to go back to once the host name resolves again.
        self._before_dns = self.health
        self.named = not is_ip(target.host)
        self.addresses: tuple[str, ...] | None = None if self.named else (target.host,)

    def available(self) -> bool:
        """
        Whether this target may be given traffic now.

        A true answer for an unhealthy target is its trial: the caller is
        expected to send it a request, and no other trial is granted until
        that one is reported or a cooldown has passed.  So ask only about a
        target that will be picked if the answer is yes; to weigh
        candidates, ask L{eligible}.  This is on the hot path: a healthy
        target with no cooldown costs two attribute reads.
        """
        if self._up and not self.cooldown_until:
            return True
        now = self._clock.seconds()
        if not self._open(now):
            return False
        # Back on the fast path once a rate-limit cooldown is over.
        self.cooldown_until = 0.0
        if not self._up:
            if self.health is Health.DNS_ERROR:
                self._trial_at = now + DNS_RETRY
            else:
                self._trial_at = (
                    now + self.upstream.healthchecks.passive.unhealthy.cooldown
                )
            self._trial_out = True
        return True

    def eligible(self) -> bool:
        """
        Whether L{available} would say yes now, granting nothing: for a
        balancer weighing candidates it may not pick, so that a trial goes
        only to a target actually picked.  Time only opens what is closed
        (a trial becomes due, a rate-limit cooldown ends), so a yes here
        stays a yes from L{available} until an outcome is recorded.
        """
        if self._up and not self.cooldown_until:
            return True
        return self._open(self._clock.seconds())

    def is_available(self) -> bool:
        """
        Whether the target counts as available weight, for the health
        endpoint and the upstream's health: it is healthy (or unchecked),
        its addresses are known, and it is not in a rate-limit cooldown.
        Being due a trial request is not being available: the target is out
        until the trial succeeds.  Nor is a name not looked up yet: nobody
        knows it resolves.
        """
        return (
            self._up
            and self.addresses is not None
            and self._clock.seconds() >= self.cooldown_until
        )

    def lookup_due(self) -> bool:
        """
        Whether the target is in L{Health.DNS_ERROR} and its next try of
        the name is due (L{DNS_RETRY} seconds after the last, whether a
        proxied attempt or a probe made it): what active checks probe,
        besides the targets of their health class.
        """
        return (
            self.health is Health.DNS_ERROR
            and self._trial_at is not None
            and self._clock.seconds() >= self._trial_at
        )

    def take_lookup(self) -> bool:
        """
        Whether a lookup of the name may go now.  In L{Health.DNS_ERROR}
        only when a try is due (L{lookup_due}), and then the lookup takes
        the try: the proxied attempts and probes that also try the name
        wait L{DNS_RETRY} seconds from it, so the name is looked up once a
        L{DNS_RETRY} whoever does it.
        """
        if self.health is not Health.DNS_ERROR:
            return True
        if not self.lookup_due():
            return False
        self._trial_at = self._clock.seconds() + DNS_RETRY
        return True

    def lookup_at(self) -> float | None:
        """
        When the name's next try is due (clock seconds), in
        L{Health.DNS_ERROR}; otherwise L{None}.
        """
        return self._trial_at if self.health is Health.DNS_ERROR else None

    def resolved(self, addresses: tuple[str, ...]) -> None:
        """
        A lookup of the name found C{addresses} (at least one): they are
        the target's, and a target in L{Health.DNS_ERROR} goes back to the
        state it had.
        """
        self.addresses = addresses
        if self.health is Health.DNS_ERROR:
            self._become(self._before_dns, "dns", "dns resolved")

    def lookup_failed(self) -> None:
        """
        A lookup of the name found nothing (or took too long): the target
        is out, as when a proxied attempt or a probe failed to resolve it.
        """
        self._dns_failed()

    def _open(self, now: float) -> bool:
        if now < self.cooldown_until:
            return False
        return self._up or (self._trial_at is not None and now >= self._trial_at)

    def record(self, outcome: Outcome, source: str) -> None:
        """
        Count the outcome of a probe (C{source} L{ACTIVE}) or of a proxied
        attempt (L{PASSIVE}), and move the target if a threshold is reached.
        """
        if outcome.kind == DNS_FAILURE:
            self._dns_failed()
            return
        if self.health is Health.DNS_ERROR:
            # Whatever else happened, the name resolved: back to where it
            # was, and count the outcome as usual from there.
            self._become(self._before_dns, source, "dns resolved")
        if outcome.code == 429 and outcome.retry_after is not None:
            now = self._clock.seconds()
            delay = parse_retry_after(outcome.retry_after, now)
            if delay is not None:
                self.cooldown_until = now + delay
                return
        if self.health is Health.HEALTHCHECKS_OFF:
            return
        hc = self.upstream.healthchecks
        checks: Active | Passive = hc.active
        if source == PASSIVE:
            if not hc.passive.on:
                return
            checks = hc.passive
        counter = classify(outcome, checks)
        if counter is None:
            return
        counters = self.counters
        if counter == SUCCESSES:
            if self._trial_out and source == PASSIVE:
                self._become(Health.HEALTHY, PASSIVE, "passive trial")
                return
            counters[HTTP_FAILURES] = counters[TCP_FAILURES] = counters[TIMEOUTS] = 0
            limit = checks.healthy.successes
            goal = Health.HEALTHY
        else:
            if self._trial_out and source == PASSIVE:
                self._trial_out = False
                self._trial_at = self._clock.seconds() + hc.passive.unhealthy.cooldown
                return
            counters[SUCCESSES] = 0
            limit = getattr(checks.unhealthy, counter)
            goal = Health.UNHEALTHY
        if limit and self.health is not goal:
            counters[counter] += 1
            if counters[counter] >= limit:
                self._become(goal, source, f"{source} {counter}")

    def _dns_failed(self) -> None:
        if self.named:
            # What the name resolved to before is not known to hold now.
            self.addresses = None
        if self.health is not Health.DNS_ERROR:
            self._before_dns = self.health
            self._become(Health.DNS_ERROR, "dns", "dns error")
        self._trial_out = False
        self._trial_at = self._clock.seconds() + DNS_RETRY

    def set_manual(self, healthy: bool) -> None:
        """
        Set the health by hand: counters, trial and rate-limit cooldown are
        cleared, so the operator's word holds until the checks overrule it.
        Setting healthy when checks are off gives L{Health.HEALTHCHECKS_OFF}.
        """
        self.cooldown_until = 0.0
        if not healthy:
            self._become(Health.UNHEALTHY, MANUAL, MANUAL)
        elif self.upstream.healthchecks.enabled:
            self._become(Health.HEALTHY, MANUAL, MANUAL)
        else:
            self._become(Health.HEALTHCHECKS_OFF, MANUAL, MANUAL)

    def reconfigure(self, target: Target, upstream: Upstream) -> None:
        """
        Take the target's and its upstream's new values, keeping the health
        unless checking was turned off or on.  A target in
        L{Health.DNS_ERROR} stays there (its name resolves no better for
        it), and goes back to the new state once the name resolves.
        """
        was = self.upstream.healthchecks.enabled
        self.target, self.upstream = target, upstream
        now = upstream.healthchecks.enabled
        if now != was:
            base = Health.HEALTHY if now else Health.HEALTHCHECKS_OFF
            if self.health is Health.DNS_ERROR:
                self._before_dns = base
            else:
                cause = "healthchecks on" if now else "healthchecks off"
                self._become(base, "config", cause)
        elif self.health is not Health.DNS_ERROR and not (
            # A trial is only ended by a proxied outcome, which is not
            # counted with passive checks off.
            upstream.healthchecks.passive.on
            and upstream.healthchecks.passive.unhealthy.cooldown
        ):
            self._trial_at, self._trial_out = None, False

    def shown(self) -> Health:
        """
        The health the Admin API and the metrics show: the state, except
        that a target whose addresses are not known yet is
        L{Health.DNS_PENDING} rather than C{HEALTHY} or
        C{HEALTHCHECKS_OFF}.
        """
        health = self.health
        if self.addresses is None and (
            health is Health.HEALTHY or health is Health.HEALTHCHECKS_OFF
        ):
            return Health.DNS_PENDING
        return health

    def shown_addresses(self) -> tuple[str, ...]:
        """
        The addresses the health endpoint lists: none in
        L{Health.DNS_ERROR} (as Kong, whose balancer then holds none) or
        before the name was looked up.
        """
        if self.health is Health.DNS_ERROR or self.addresses is None:
            return ()
        return self.addresses

    def describe(self) -> dict[str, Any]:
        """
        The state as the health endpoint shows it (see L{shown}).
        """
        until = self.cooldown_until
        return {
            "health": self.shown().value,
            "cooldown_until": until if until > self._clock.seconds() else None,
            "counters": dict(self.counters),
        }

    def _become(self, new: Health, source: str, cause: str) -> None:
        old = self.health
        self.health = new
        self._up = new is not Health.UNHEALTHY and new is not Health.DNS_ERROR
        for name in COUNTERS:
            self.counters[name] = 0
        self._trial_out = False
        self._trial_at = None
        if new is Health.UNHEALTHY and source == PASSIVE:
            cooldown = self.upstream.healthchecks.passive.unhealthy.cooldown
            if cooldown:
                self._trial_at = self._clock.seconds() + cooldown
        if new is not old:
            self._notify(self, old, new, cause)

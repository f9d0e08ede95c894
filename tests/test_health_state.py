"""
Tests for L{aigateway.health.state} and L{aigateway.health.passive}: the
per-target state machine, driven by outcomes and a L{task.Clock}.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from twisted.internet import defer, error, task
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseFailed, ResponseNeverReceived

from aigateway.health.passive import (
    RETRY_AFTER_CAP,
    Outcome,
    outcome_of_failure,
    parse_retry_after,
    timed_out,
)
from aigateway.health.state import (
    ACTIVE,
    DNS_RETRY,
    PASSIVE,
    Health,
    TargetHealth,
    classify,
)

from .healthkit import target, upstream

OK = Outcome.status(200)
ERR = Outcome.status(500)
TCP = Outcome.tcp_failure()
TIMEOUT = Outcome.timeout()
DNS = Outcome.dns_failure()
HEALTHY, UNHEALTHY, OFF = Health.HEALTHY, Health.UNHEALTHY, Health.HEALTHCHECKS_OFF

# Active checks on, with Kong's default thresholds (2 of each).
ACTIVE_ON = {"active__healthy__interval": 5, "active__unhealthy__interval": 5}


class StateMixin:
    def make(self, **checks: Any) -> TargetHealth:
        self.clock = task.Clock()
        self.clock.advance(1000)
        self.transitions: list[tuple[Health, Health, str]] = []
        return TargetHealth(
            target(),
            upstream(**checks),
            self.clock,
            lambda state, old, new, cause: self.transitions.append((old, new, cause)),
        )


class ClassifyTests(SynchronousTestCase):
    """
    L{classify} picks the counter an outcome feeds.
    """

    def test_statuses(self) -> None:
        checks = upstream().healthchecks.active
        self.assertEqual(classify(OK, checks), "successes")
        self.assertEqual(classify(Outcome.status(302), checks), "successes")
        self.assertEqual(classify(ERR, checks), "http_failures")
        self.assertIsNone(classify(Outcome.status(418), checks))
        self.assertEqual(classify(TCP, checks), "tcp_failures")
        self.assertEqual(classify(TIMEOUT, checks), "timeouts")
        self.assertEqual(classify(Outcome.connected(), checks), "successes")

    def test_tcp_type(self) -> None:
        """
        Under a C{tcp} check any response is a success.
        """
        checks = upstream(active__type="tcp").healthchecks.active
        self.assertEqual(classify(ERR, checks), "successes")


class ThresholdTests(StateMixin, SynchronousTestCase):
    """
    Counters move the target when they reach their thresholds.
    """

    def test_unhealthy_at_threshold(self) -> None:
        for outcome, counter in [(ERR, "http"), (TCP, "tcp"), (TIMEOUT, "timeouts")]:
            state = self.make(**ACTIVE_ON)
            state.record(outcome, ACTIVE)
            self.assertEqual(state.health, HEALTHY)
            self.assertTrue(state.available())
            state.record(outcome, ACTIVE)
            self.assertEqual(state.health, UNHEALTHY, counter)
            self.assertFalse(state.available())
            self.assertEqual(self.transitions[-1][:2], (HEALTHY, UNHEALTHY))

    def test_cause(self) -> None:
        state = self.make(**ACTIVE_ON)
        state.record(TIMEOUT, ACTIVE)
        state.record(TIMEOUT, ACTIVE)
        self.assertEqual(self.transitions, [(HEALTHY, UNHEALTHY, "active timeouts")])

    def test_healthy_at_threshold(self) -> None:
        state = self.make(active__healthy__successes=3, **ACTIVE_ON)
        state.set_manual(False)
        state.record(OK, ACTIVE)
        state.record(OK, ACTIVE)
        self.assertEqual(state.counters["successes"], 2)
        self.assertEqual(state.health, UNHEALTHY)
        state.record(OK, ACTIVE)
        self.assertEqual(state.health, HEALTHY)
        self.assertEqual(self.transitions[-1], (UNHEALTHY, HEALTHY, "active successes"))

    def test_success_resets_failures(self) -> None:
        """
        Failures count only consecutively: a success in between clears them.
        """
        state = self.make(**ACTIVE_ON)
        state.record(ERR, ACTIVE)
        state.record(TCP, ACTIVE)
        self.assertEqual(state.counters["http_failures"], 1)
        self.assertEqual(state.counters["tcp_failures"], 1)
        state.record(OK, ACTIVE)
        self.assertEqual(
            state.counters,
            {"successes": 0, "http_failures": 0, "tcp_failures": 0, "timeouts": 0},
        )
        state.record(ERR, ACTIVE)
        self.assertEqual(state.health, HEALTHY)

    def test_failure_resets_successes(self) -> None:
        state = self.make(**ACTIVE_ON)
        state.set_manual(False)
        state.record(OK, ACTIVE)
        state.record(TIMEOUT, ACTIVE)
        self.assertEqual(state.counters["successes"], 0)
        state.record(OK, ACTIVE)
        self.assertEqual(state.health, UNHEALTHY)

    def test_different_failures_count_apart(self) -> None:
        """
        Each failure kind has its own counter: one of each is not two.
        """
        state = self.make(**ACTIVE_ON)
        state.record(ERR, ACTIVE)
        state.record(TCP, ACTIVE)
        state.record(TIMEOUT, ACTIVE)
        self.assertEqual(state.health, HEALTHY)

    def test_transition_resets_counters(self) -> None:
        state = self.make(**ACTIVE_ON)
        state.record(TCP, ACTIVE)
        state.record(ERR, ACTIVE)
        state.record(ERR, ACTIVE)
        self.assertEqual(state.health, UNHEALTHY)
        self.assertEqual(set(state.counters.values()), {0})
        # Failures are not counted while unhealthy.
        state.record(ERR, ACTIVE)
        self.assertEqual(set(state.counters.values()), {0})

    def test_zero_threshold_disables(self) -> None:
        state = self.make(active__unhealthy__http_failures=0, **ACTIVE_ON)
        for _ in range(10):
            state.record(ERR, ACTIVE)
        self.assertEqual(state.health, HEALTHY)
        self.assertEqual(state.counters["http_failures"], 0)
        state = self.make(active__healthy__successes=0, **ACTIVE_ON)
        state.set_manual(False)
        for _ in range(10):
            state.record(OK, ACTIVE)
        self.assertEqual(state.health, UNHEALTHY)

    def test_ignored_status(self) -> None:
        """
        A status in neither list changes nothing, not even the counters.
        """
        state = self.make(**ACTIVE_ON)
        state.record(ERR, ACTIVE)
        state.record(Outcome.status(418), ACTIVE)
        self.assertEqual(state.counters["http_failures"], 1)

    def test_sides_have_own_thresholds(self) -> None:
        """
        Passive outcomes are held to the passive thresholds.
        """
        state = self.make(passive__unhealthy__http_failures=3, **ACTIVE_ON)
        state.record(ERR, PASSIVE)
        state.record(ERR, PASSIVE)
        self.assertEqual(state.health, HEALTHY)
        state.record(ERR, PASSIVE)
        self.assertEqual(state.health, UNHEALTHY)
        self.assertEqual(self.transitions[-1][2], "passive http_failures")

    def test_passive_statuses(self) -> None:
        """
        Passive statuses are matched against the passive lists: 404 is an
        active failure by default, not a passive one.
        """
        state = self.make(passive__unhealthy__http_failures=1)
        state.record(Outcome.status(404), PASSIVE)
        self.assertEqual(state.health, HEALTHY)
        state.record(Outcome.status(503), PASSIVE)
        self.assertEqual(state.health, UNHEALTHY)

    def test_passive_defaults_do_nothing(self) -> None:
        """
        With Kong's passive defaults (all thresholds 0) and no active
        checks, health checking is off: every outcome is ignored.
        """
        state = self.make()
        self.assertEqual(state.health, OFF)
        for _ in range(10):
            state.record(TCP, PASSIVE)
            state.record(TCP, ACTIVE)
        self.assertEqual(state.health, OFF)
        self.assertTrue(state.available())


class PassiveOffTests(StateMixin, SynchronousTestCase):
    """
    With passive checks off, proxied outcomes count for nothing; with them
    on, both sides share the counters.
    """

    def test_proxied_successes_do_not_mask_probes(self) -> None:
        """
        A target whose probe fails but whose proxied requests succeed is
        taken out by its second failed probe, however much traffic it
        served in between.
        """
        state = self.make(**ACTIVE_ON)
        state.record(ERR, ACTIVE)
        for _ in range(15):
            state.record(OK, PASSIVE)
        self.assertEqual(state.counters["http_failures"], 1)
        state.record(ERR, ACTIVE)
        self.assertEqual(state.health, UNHEALTHY)
        self.assertEqual(
            self.transitions, [(HEALTHY, UNHEALTHY, "active http_failures")]
        )

    def test_proxied_outcomes_ignored(self) -> None:
        """
        Neither proxied failures nor proxied successes move the target or
        its counters.
        """
        state = self.make(passive__healthy__successes=0, **ACTIVE_ON)
        state.record(OK, ACTIVE)
        for outcome in [ERR, TCP, TIMEOUT] * 5:
            state.record(outcome, PASSIVE)
        self.assertEqual(state.health, HEALTHY)
        self.assertEqual(set(state.counters.values()), {0})
        state.set_manual(False)
        state.record(OK, ACTIVE)
        for _ in range(5):
            state.record(OK, PASSIVE)
        self.assertEqual(state.counters["successes"], 1)
        self.assertEqual(state.health, UNHEALTHY)

    def test_dns_and_rate_limits_still_act(self) -> None:
        """
        A name that does not resolve and a C{429} with C{Retry-After} are
        not passive checks: they act with passive checks off.
        """
        state = self.make(**ACTIVE_ON)
        state.record(Outcome.status(429, "10"), PASSIVE)
        self.assertFalse(state.available())
        self.clock.advance(10)
        state.record(DNS, PASSIVE)
        self.assertEqual(state.health, Health.DNS_ERROR)

    def test_passive_on_shares_counters(self) -> None:
        """
        With passive checks on, a proxied success clears the failures
        probes counted, as in lua-resty-healthcheck, and a probe's success
        the proxied failures.
        """
        state = self.make(passive__unhealthy__tcp_failures=2, **ACTIVE_ON)
        state.record(ERR, ACTIVE)
        state.record(OK, PASSIVE)
        self.assertEqual(state.counters["http_failures"], 0)
        state.record(TCP, PASSIVE)
        state.record(OK, ACTIVE)
        state.record(TCP, PASSIVE)
        self.assertEqual(state.health, HEALTHY)

    def test_passive_successes_alone(self) -> None:
        """
        C{passive.healthy.successes} alone counts proxied successes: they
        may bring back what probes took out.
        """
        state = self.make(passive__healthy__successes=2, **ACTIVE_ON)
        state.record(ERR, ACTIVE)
        state.record(ERR, ACTIVE)
        self.assertEqual(state.health, UNHEALTHY)
        state.record(OK, PASSIVE)
        state.record(OK, PASSIVE)
        self.assertEqual(state.health, HEALTHY)
        self.assertEqual(self.transitions[-1][2], "passive successes")

    def test_turned_off_drops_trial(self) -> None:
        """
        Passive checks turned off while a target waits for its trial: no
        trial comes (its outcome would not be counted); probes decide.
        """
        checks = dict(passive__unhealthy__tcp_failures=1, **ACTIVE_ON)
        state = self.make(passive__unhealthy__cooldown=5, **checks)
        state.record(TCP, PASSIVE)
        self.assertEqual(state.health, UNHEALTHY)
        state.reconfigure(state.target, upstream(**ACTIVE_ON))
        self.clock.advance(100)
        self.assertFalse(state.available())
        state.record(OK, ACTIVE)
        state.record(OK, ACTIVE)
        self.assertEqual(state.health, HEALTHY)


class AvailableWeightTests(StateMixin, SynchronousTestCase):
    """
    L{TargetHealth.is_available} (the health endpoint's available weight)
    is false for a target out of rotation even when it is due a trial,
    which L{TargetHealth.eligible} sees and L{TargetHealth.available}
    grants.
    """

    def test_due_trial_is_not_available_weight(self) -> None:
        state = self.make(
            passive__unhealthy__http_failures=1, passive__unhealthy__cooldown=3
        )
        state.record(ERR, PASSIVE)
        self.clock.advance(3.5)
        self.assertFalse(state.is_available())
        self.assertTrue(state.eligible())
        self.assertTrue(state.available())
        self.assertFalse(state.is_available())
        state.record(OK, PASSIVE)
        self.assertTrue(state.is_available())

    def test_dns_error_is_not_available_weight(self) -> None:
        state = self.make()
        state.record(DNS, PASSIVE)
        self.clock.advance(DNS_RETRY + 1)
        self.assertFalse(state.is_available())
        self.assertTrue(state.eligible())
        state.record(OK, PASSIVE)
        self.assertTrue(state.is_available())

    def test_rate_limited_is_not_available_weight(self) -> None:
        state = self.make()
        state.record(Outcome.status(429, "2"), PASSIVE)
        self.assertFalse(state.is_available())
        self.assertFalse(state.eligible())
        self.clock.advance(2)
        self.assertTrue(state.is_available())
        self.assertTrue(state.eligible())

    def test_eligible_grants_nothing(self) -> None:
        """
        Looking does not take the trial: it is still there for the target
        that is picked, and is then gone.
        """
        state = self.make(
            passive__unhealthy__tcp_failures=1, passive__unhealthy__cooldown=3
        )
        state.record(TCP, PASSIVE)
        self.clock.advance(3)
        for _ in range(5):
            self.assertTrue(state.eligible())
        self.assertTrue(state.available())
        self.assertFalse(state.eligible())
        self.assertFalse(state.available())


class TrialTests(StateMixin, SynchronousTestCase):
    """
    A passively failed target gets a trial request after the cooldown.
    """

    def failed(self, cooldown: float = 30) -> TargetHealth:
        state = self.make(
            passive__unhealthy__tcp_failures=1, passive__unhealthy__cooldown=cooldown
        )
        state.record(TCP, PASSIVE)
        self.assertEqual(state.health, UNHEALTHY)
        return state

    def test_trial_after_cooldown(self) -> None:
        state = self.failed()
        self.clock.advance(29.9)
        self.assertFalse(state.available())
        self.clock.advance(0.1)
        self.assertTrue(state.eligible())
        self.assertTrue(state.available())
        # One trial at a time.
        self.assertFalse(state.available())
        self.assertFalse(state.eligible())
        self.assertEqual(state.health, UNHEALTHY)
        state.record(OK, PASSIVE)
        self.assertEqual(state.health, HEALTHY)
        self.assertEqual(self.transitions[-1], (UNHEALTHY, HEALTHY, "passive trial"))
        self.assertTrue(state.available())

    def test_failed_trial_restarts_cooldown(self) -> None:
        state = self.failed()
        self.clock.advance(30)
        self.assertTrue(state.available())
        self.clock.advance(5)
        state.record(TIMEOUT, PASSIVE)
        self.clock.advance(29.9)
        self.assertFalse(state.available())
        self.clock.advance(0.1)
        self.assertTrue(state.available())

    def test_unreported_trial_replaced(self) -> None:
        state = self.failed()
        self.clock.advance(30)
        self.assertTrue(state.available())
        self.clock.advance(29.9)
        self.assertFalse(state.available())
        self.clock.advance(0.1)
        self.assertTrue(state.available())

    def test_no_trial_without_cooldown(self) -> None:
        """
        A cooldown of 0 keeps Kong's behaviour: never back passively.
        """
        state = self.failed(cooldown=0)
        self.clock.advance(100000)
        self.assertFalse(state.available())

    def test_no_trial_after_active_failure(self) -> None:
        """
        Active checks bring back what they took out: no trials.
        """
        state = self.make(**ACTIVE_ON)
        state.record(TCP, ACTIVE)
        state.record(TCP, ACTIVE)
        self.clock.advance(100000)
        self.assertFalse(state.available())

    def test_late_success_is_not_trial(self) -> None:
        """
        A success of a request sent before the target failed does not end
        the cooldown.
        """
        state = self.failed()
        state.record(OK, PASSIVE)
        self.assertEqual(state.health, UNHEALTHY)

    def test_cooldown_turned_off(self) -> None:
        state = self.failed()
        state.reconfigure(
            state.target,
            upstream(
                passive__unhealthy__tcp_failures=1, passive__unhealthy__cooldown=0
            ),
        )
        self.clock.advance(100)
        self.assertFalse(state.available())


class RateLimitTests(StateMixin, SynchronousTestCase):
    """
    A 429 with C{Retry-After} is a cooldown, not a failure.
    """

    def test_seconds(self) -> None:
        state = self.make(passive__unhealthy__http_failures=1)
        state.record(Outcome.status(429, "10"), PASSIVE)
        self.assertEqual(state.health, HEALTHY)
        self.assertEqual(state.counters["http_failures"], 0)
        self.assertFalse(state.available())
        self.assertEqual(state.describe()["cooldown_until"], 1010.0)
        self.clock.advance(9.9)
        self.assertFalse(state.available())
        self.clock.advance(0.1)
        self.assertTrue(state.available())
        self.assertIsNone(state.describe()["cooldown_until"])
        self.assertEqual(self.transitions, [])

    def test_http_date(self) -> None:
        state = self.make()
        self.clock.advance(1_700_000_000 - 1000)
        # 1700000000 is Tue, 14 Nov 2023 22:13:20 GMT.
        state.record(Outcome.status(429, "Tue, 14 Nov 2023 22:14:00 GMT"), PASSIVE)
        self.assertEqual(state.describe()["cooldown_until"], 1_700_000_040.0)
        self.clock.advance(39)
        self.assertFalse(state.available())
        self.clock.advance(1)
        self.assertTrue(state.available())

    def test_cap(self) -> None:
        state = self.make()
        state.record(Outcome.status(429, "86400"), PASSIVE)
        self.assertEqual(state.cooldown_until, 1000 + RETRY_AFTER_CAP)
        self.clock.advance(RETRY_AFTER_CAP)
        self.assertTrue(state.available())

    def test_off_still_rate_limited(self) -> None:
        state = self.make()
        self.assertEqual(state.health, OFF)
        state.record(Outcome.status(429, "5"), ACTIVE)
        self.assertFalse(state.available())

    def test_no_trial_while_rate_limited(self) -> None:
        state = self.make(passive__unhealthy__tcp_failures=1)
        state.record(TCP, PASSIVE)
        state.record(Outcome.status(429, "100"), PASSIVE)
        self.clock.advance(30)
        self.assertFalse(state.available())
        self.clock.advance(70)
        self.assertTrue(state.available())

    def test_without_retry_after(self) -> None:
        """
        A plain 429 (or an unreadable C{Retry-After}) is an HTTP failure.
        """
        state = self.make(passive__unhealthy__http_failures=2)
        state.record(Outcome.status(429), PASSIVE)
        state.record(Outcome.status(429, "soon"), PASSIVE)
        self.assertEqual(state.health, UNHEALTHY)

    def test_parse(self) -> None:
        self.assertEqual(parse_retry_after(" 7 ", 0), 7.0)
        self.assertEqual(parse_retry_after("Thu, 01 Jan 1970 00:00:10 GMT", 4), 6.0)
        self.assertEqual(parse_retry_after("Thu, 01 Jan 1970 00:00:10 GMT", 50), 0.0)
        self.assertEqual(parse_retry_after("1000", 0), RETRY_AFTER_CAP)
        self.assertIsNone(parse_retry_after("-1", 0))
        self.assertIsNone(parse_retry_after("", 0))
        self.assertIsNone(parse_retry_after("later", 0))


class ManualTests(StateMixin, SynchronousTestCase):
    """
    Health set by hand.
    """

    def test_set(self) -> None:
        state = self.make(**ACTIVE_ON)
        state.record(ERR, ACTIVE)
        state.set_manual(False)
        self.assertEqual(state.health, UNHEALTHY)
        self.assertFalse(state.available())
        state.record(OK, ACTIVE)
        state.set_manual(False)
        self.assertEqual(state.counters["successes"], 0)
        state.set_manual(True)
        self.assertEqual(state.health, HEALTHY)
        self.assertEqual(
            self.transitions,
            [(HEALTHY, UNHEALTHY, "manual"), (UNHEALTHY, HEALTHY, "manual")],
        )

    def test_healthy_clears_rate_limit(self) -> None:
        state = self.make(**ACTIVE_ON)
        state.record(Outcome.status(429, "60"), PASSIVE)
        state.set_manual(True)
        self.assertTrue(state.available())

    def test_checks_off(self) -> None:
        """
        With checks off a target can still be taken out by hand; set
        healthy, it is back to C{HEALTHCHECKS_OFF}.
        """
        state = self.make()
        state.set_manual(False)
        self.assertFalse(state.available())
        state.set_manual(True)
        self.assertEqual(state.health, OFF)

    def test_manual_unhealthy_gets_no_trial(self) -> None:
        state = self.make(passive__unhealthy__tcp_failures=1)
        state.set_manual(False)
        self.clock.advance(1000)
        self.assertFalse(state.available())


class ReconfigureTests(StateMixin, SynchronousTestCase):
    def test_keeps_health(self) -> None:
        state = self.make(**ACTIVE_ON)
        state.record(ERR, ACTIVE)
        state.reconfigure(target(weight=5), upstream(active__timeout=3, **ACTIVE_ON))
        self.assertEqual(state.counters["http_failures"], 1)
        self.assertEqual(state.target.weight, 5)

    def test_off_and_on(self) -> None:
        state = self.make(**ACTIVE_ON)
        state.set_manual(False)
        state.reconfigure(state.target, upstream())
        self.assertEqual(state.health, OFF)
        self.assertTrue(state.available())
        state.reconfigure(state.target, upstream(**ACTIVE_ON))
        self.assertEqual(state.health, HEALTHY)
        self.assertEqual(
            [t[2] for t in self.transitions],
            ["manual", "healthchecks off", "healthchecks on"],
        )

    def test_describe(self) -> None:
        state = self.make(**ACTIVE_ON)
        state.record(TIMEOUT, ACTIVE)
        self.assertEqual(
            state.describe(),
            {
                "health": "HEALTHY",
                "cooldown_until": None,
                "counters": {
                    "successes": 0,
                    "http_failures": 0,
                    "tcp_failures": 0,
                    "timeouts": 1,
                },
            },
        )


class FailureTests(SynchronousTestCase):
    """
    L{outcome_of_failure} tells the target's faults from ours.
    """

    def test_tcp(self) -> None:
        for exc in [
            error.ConnectionRefusedError(),
            error.ConnectionLost(),
            error.ConnectionDone(),
            SSL.Error(),
            ResponseNeverReceived([Failure(error.ConnectionLost())]),
            ResponseFailed([Failure(error.ConnectionDone())]),
        ]:
            self.assertEqual(outcome_of_failure(Failure(exc)), TCP, exc)

    def test_dns(self) -> None:
        for exc in [
            error.DNSLookupError("no results for hostname lookup: x"),
            ResponseNeverReceived([Failure(error.DNSLookupError())]),
        ]:
            self.assertEqual(outcome_of_failure(Failure(exc)), DNS, exc)

    def test_timeout(self) -> None:
        for exc in [
            defer.TimeoutError(),
            error.TimeoutError(),
            error.TCPTimedOutError(),
            ResponseNeverReceived([Failure(defer.TimeoutError())]),
        ]:
            self.assertEqual(outcome_of_failure(Failure(exc)), TIMEOUT, exc)

    def test_not_the_target(self) -> None:
        """
        A cancellation or a bug of ours is not reported.
        """
        for exc in [
            defer.CancelledError(),
            error.ConnectingCancelledError(None),
            ResponseNeverReceived([Failure(defer.CancelledError())]),
            ZeroDivisionError(),
        ]:
            self.assertIsNone(outcome_of_failure(Failure(exc)), exc)

    def test_timed_out(self) -> None:
        """
        L{timed_out} makes a timed-out Agent request a timeout, whatever
        its cancellation failed with.
        """
        clock = task.Clock()

        def cancel(d: defer.Deferred[None]) -> None:
            d.errback(ResponseNeverReceived([Failure(defer.CancelledError())]))

        d: defer.Deferred[None] = defer.Deferred(cancel)
        d.addTimeout(1, clock, onTimeoutCancel=timed_out)
        clock.advance(1)
        self.assertEqual(outcome_of_failure(self.failureResultOf(d)), TIMEOUT)


class DNSErrorTests(StateMixin, SynchronousTestCase):
    """
    A host name that does not resolve takes the target out at once, checks
    on or off; it gets a trial every L{DNS_RETRY} seconds, and the first
    attempt that gets past the lookup restores the state it had.
    """

    def test_out_at_once_with_checks_off(self) -> None:
        state = self.make()
        assert state.health is OFF and state.available()
        state.record(DNS, PASSIVE)
        assert state.health is Health.DNS_ERROR
        assert not state.available() and not state.is_available()
        assert self.transitions == [(OFF, Health.DNS_ERROR, "dns error")]
        assert state.describe()["health"] == "DNS_ERROR"

    def test_trial_every_retry_then_back(self) -> None:
        state = self.make(**ACTIVE_ON)
        state.record(DNS, PASSIVE)
        self.clock.advance(DNS_RETRY - 0.1)
        assert not state.available()
        self.clock.advance(0.1)
        assert state.available()  # the trial
        assert not state.available()  # only one
        state.record(DNS, PASSIVE)  # still failing: the next one later
        assert state.health is Health.DNS_ERROR
        self.clock.advance(DNS_RETRY / 2)
        assert not state.available()
        self.clock.advance(DNS_RETRY / 2)
        assert state.available()
        state.record(OK, PASSIVE)
        assert state.health is HEALTHY and state.available()
        assert self.transitions[-1] == (Health.DNS_ERROR, HEALTHY, "dns resolved")

    def test_resolved_but_failing_counts_as_usual(self) -> None:
        """
        A connection refused after the name resolved again ends the DNS
        error and counts as a TCP failure from the state before it.
        """
        state = self.make(**ACTIVE_ON)
        state.record(TCP, ACTIVE)
        state.record(DNS, ACTIVE)
        state.record(TCP, ACTIVE)
        assert state.health is HEALTHY
        assert state.counters["tcp_failures"] == 1
        state.record(TCP, ACTIVE)
        assert state.health is UNHEALTHY

    def test_unhealthy_before_stays_unhealthy(self) -> None:
        state = self.make(**ACTIVE_ON)
        state.set_manual(False)
        state.record(DNS, ACTIVE)
        assert state.health is Health.DNS_ERROR
        state.record(OK, ACTIVE)
        assert state.health is UNHEALTHY
        state.record(OK, ACTIVE)
        assert state.health is HEALTHY

    def test_manual_overrides(self) -> None:
        state = self.make(**ACTIVE_ON)
        state.record(DNS, PASSIVE)
        state.set_manual(True)
        assert state.health is HEALTHY and state.available()

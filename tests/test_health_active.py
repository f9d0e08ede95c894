"""
Tests for L{aigateway.health.active}: probe scheduling on a L{task.Clock}
with fake probers, and L{AgentProber} against real loopback servers.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import error, task
from twisted.trial.unittest import SynchronousTestCase

from aigateway.addresses import host_header
from aigateway.health.active import ActiveChecker, IProber
from aigateway.health.passive import Outcome
from aigateway.health.state import ACTIVE, Health, TargetHealth

from .healthkit import AnsweringProber, FakeProber, target, upstream

KEYS = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.4:80", "10.0.0.5:80"]


class CheckerMixin:
    """
    Builds an L{ActiveChecker} over real target states.
    """

    def make(
        self, prober: IProber, keys: list[str] = KEYS[:2], **checks: Any
    ) -> ActiveChecker:
        self.clock = task.Clock()
        self.upstream = upstream(**checks)
        self.results: list[tuple[float, str, Outcome]] = []
        self.transitions: list[tuple[float, str, Health]] = []
        self.states = {
            k: TargetHealth(
                target(k),
                self.upstream,
                self.clock,
                lambda s, old, new, cause: self.transitions.append(
                    (self.clock.seconds(), s.target.key, new)
                ),
            )
            for k in keys
        }

        def on_result(state: TargetHealth, outcome: Outcome) -> None:
            self.results.append((self.clock.seconds(), state.target.key, outcome))
            state.record(outcome, ACTIVE)

        self.checker = ActiveChecker(
            self.clock, prober, self.upstream, self.states, on_result
        )
        return self.checker

    def probe_times(self) -> list[tuple[float, str]]:
        return [(t, k) for t, k, _ in self.results]


class ScheduleTests(CheckerMixin, SynchronousTestCase):
    """
    Probes happen at exactly the configured intervals.
    """

    def test_healthy_interval(self) -> None:
        self.make(AnsweringProber(), active__healthy__interval=5)
        self.clock.advance(4.9)
        self.assertEqual(self.results, [])
        self.clock.advance(0.1)
        self.assertEqual(self.probe_times(), [(5, KEYS[0]), (5, KEYS[1])])
        self.clock.pump([5, 5])
        self.assertEqual(len(self.results), 6)
        self.assertEqual({t for t, _ in self.probe_times()}, {5, 10, 15})

    def test_transition_moments(self) -> None:
        """
        A failing target is taken out at its second failed probe, then
        probed at the unhealthy interval and brought back at its second
        success.
        """
        outcomes = {KEYS[0]: Outcome.status(500)}
        self.make(
            AnsweringProber(outcomes),
            keys=KEYS[:1],
            active__healthy__interval=10,
            active__unhealthy__interval=3,
        )
        self.clock.pump([1] * 20)
        self.assertEqual(self.transitions, [(20, KEYS[0], Health.UNHEALTHY)])
        self.assertEqual(self.probe_times(), [(10, KEYS[0]), (20, KEYS[0])])
        outcomes[KEYS[0]] = Outcome.status(200)
        self.clock.pump([1] * 10)
        self.assertEqual(
            self.transitions,
            [(20, KEYS[0], Health.UNHEALTHY), (24, KEYS[0], Health.HEALTHY)],
        )
        # 21 and 24 by the unhealthy round, 30 by the healthy one.
        self.assertEqual([t for t, _ in self.probe_times()], [10, 20, 21, 24, 30])

    def test_zero_interval_disables_side(self) -> None:
        prober = AnsweringProber()
        self.make(prober, active__unhealthy__interval=5)
        self.clock.pump([5] * 4)
        self.assertEqual(prober.calls, [])
        self.checker.stop()
        self.make(prober, active__healthy__interval=0, active__unhealthy__interval=0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_probes_by_class(self) -> None:
        """
        Each round probes only the targets of its health class.
        """
        prober = AnsweringProber({KEYS[1]: Outcome.status(500)})
        self.make(prober, active__healthy__interval=10, active__unhealthy__interval=4)
        self.states[KEYS[1]].set_manual(False)
        self.clock.pump([4, 4])
        self.assertEqual(prober.calls, [KEYS[1], KEYS[1]])
        self.clock.advance(2)
        self.assertEqual(prober.calls, [KEYS[1], KEYS[1], KEYS[0]])

    def test_update_reschedules(self) -> None:
        prober = AnsweringProber()
        checker = self.make(prober, active__healthy__interval=5)
        self.clock.advance(1)
        checker.update(upstream(active__healthy__interval=10))
        self.clock.advance(9.9)
        self.assertEqual(prober.calls, [])
        self.clock.advance(0.1)
        self.assertEqual(len(prober.calls), 2)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_update_keeps_rhythm(self) -> None:
        """
        Settings other than the intervals do not restart the rounds.
        """
        prober = AnsweringProber()
        checker = self.make(prober, active__healthy__interval=5)
        self.clock.advance(3)
        checker.update(upstream(active__healthy__interval=5, active__http_path="/h"))
        self.clock.advance(2)
        self.assertEqual(len(prober.calls), 2)

    def test_synchronous_answers(self) -> None:
        """
        A prober that answers at once probes every target, one at a time.
        """
        keys = [f"10.0.1.{i}:80" for i in range(200)]
        prober = AnsweringProber()
        self.make(prober, keys=keys, active__healthy__interval=1, active__concurrency=1)
        self.clock.advance(1)
        self.assertEqual(prober.calls, keys)
        self.assertEqual(self.checker.in_flight, 0)


class DNSErrorTests(CheckerMixin, SynchronousTestCase):
    """
    A target whose name did not resolve is probed again every
    L{DNS_RETRY} seconds, with no traffic at all, and the first probe
    that gets past the lookup puts it back.
    """

    def test_probed_again_until_resolved(self) -> None:
        outcomes = {KEYS[0]: Outcome.dns_failure()}
        self.make(
            AnsweringProber(outcomes),
            keys=KEYS[:1],
            active__healthy__interval=1,
            active__unhealthy__interval=1,
        )
        self.clock.pump([1] * 12)
        self.assertEqual(self.states[KEYS[0]].health, Health.DNS_ERROR)
        # Not every round: once a DNS_RETRY, as the proxy's tries.
        self.assertEqual([t for t, _ in self.probe_times()], [1, 6, 11])
        outcomes[KEYS[0]] = Outcome.status(200)
        self.clock.pump([1] * 3)
        self.assertEqual(self.states[KEYS[0]].health, Health.DNS_ERROR)
        self.clock.advance(1)
        self.assertEqual(self.probe_times()[-1], (16, KEYS[0]))
        self.assertEqual(self.states[KEYS[0]].health, Health.HEALTHY)
        self.assertEqual(
            self.transitions,
            [(1, KEYS[0], Health.DNS_ERROR), (16, KEYS[0], Health.HEALTHY)],
        )
        # Back in its class's rounds.
        self.clock.advance(1)
        self.assertEqual(self.probe_times()[-1], (17, KEYS[0]))

    def test_unhealthy_side_alone(self) -> None:
        """
        With only the unhealthy side probing, its rounds try the name.
        """
        outcomes = {KEYS[0]: Outcome.dns_failure()}
        self.make(
            AnsweringProber(outcomes), keys=KEYS[:1], active__unhealthy__interval=2
        )
        self.states[KEYS[0]].set_manual(False)
        self.clock.advance(2)
        self.assertEqual(self.states[KEYS[0]].health, Health.DNS_ERROR)
        outcomes[KEYS[0]] = Outcome.status(200)
        self.clock.pump([2] * 3)
        # Back to UNHEALTHY (the state before), counting the success.
        self.assertEqual([t for t, _ in self.probe_times()], [2, 8])
        self.assertEqual(self.states[KEYS[0]].health, Health.UNHEALTHY)
        self.assertEqual(self.states[KEYS[0]].counters["successes"], 1)

    def test_proxied_try_postpones_probe(self) -> None:
        """
        A proxied attempt's lookup counts as the try: the probe waits a
        DNS_RETRY from it.
        """
        outcomes = {KEYS[0]: Outcome.dns_failure()}
        self.make(AnsweringProber(outcomes), keys=KEYS[:1], active__healthy__interval=2)
        self.clock.pump([2, 2, 2, 1])
        self.assertTrue(self.states[KEYS[0]].available())  # a proxied try at 7 s
        self.clock.pump([1] * 5)
        # Not at 8: 5 s after the proxied try.
        self.assertEqual([t for t, _ in self.probe_times()], [2, 12])


class ConcurrencyTests(CheckerMixin, SynchronousTestCase):
    def test_bound(self) -> None:
        prober = FakeProber()
        checker = self.make(
            prober,
            keys=KEYS,
            active__healthy__interval=5,
            active__concurrency=2,
            active__timeout=0,
        )
        self.clock.advance(5)
        self.assertEqual(prober.pending(), KEYS[:2])
        prober.answer(Outcome.status(200), KEYS[0])
        self.assertEqual(prober.pending(), [KEYS[1], KEYS[2]])
        self.assertEqual(checker.in_flight, 2)
        # A round while probes are queued or running adds no duplicate.
        self.clock.advance(5)
        prober.answer(Outcome.status(200))
        prober.answer(Outcome.status(200))
        prober.answer(Outcome.status(200))
        self.assertEqual(sorted(k for k, _ in prober.probes), sorted(KEYS + [KEYS[0]]))
        self.assertEqual(checker.in_flight, 0)

    def test_timeout(self) -> None:
        prober = FakeProber()
        self.make(prober, keys=KEYS[:1], active__healthy__interval=5, active__timeout=2)
        self.clock.advance(5)
        self.clock.advance(1.9)
        self.assertEqual(self.results, [])
        self.clock.advance(0.1)
        self.assertEqual(prober.cancelled, [KEYS[0]])
        self.assertEqual(self.results, [(7, KEYS[0], Outcome.timeout())])
        self.assertEqual(self.states[KEYS[0]].counters["timeouts"], 1)
        self.assertEqual(self.checker.in_flight, 0)
        # Only the round's LoopingCall is left.
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_failure_classified(self) -> None:
        prober = FakeProber()
        self.make(prober, keys=KEYS[:1], active__healthy__interval=5)
        self.clock.advance(5)
        prober.probes[0][1].errback(error.ConnectionRefusedError())
        self.assertEqual(self.results, [(5, KEYS[0], Outcome.tcp_failure())])


class StopTests(CheckerMixin, SynchronousTestCase):
    def test_stop(self) -> None:
        prober = FakeProber()
        checker = self.make(
            prober,
            keys=KEYS,
            active__healthy__interval=5,
            active__unhealthy__interval=5,
            active__concurrency=2,
        )
        self.clock.advance(5)
        checker.stop()
        self.assertEqual(sorted(prober.cancelled), KEYS[:2])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(checker.in_flight, 0)
        self.assertEqual(prober.pending(), [])
        self.assertEqual(self.results, [])

    def test_removed_target(self) -> None:
        """
        A removed target's probe is abandoned and its result dropped.
        """
        prober = FakeProber()
        checker = self.make(prober, active__healthy__interval=5)
        self.clock.advance(5)
        del self.states[KEYS[0]]
        checker.sync()
        self.assertEqual(prober.cancelled, [KEYS[0]])
        prober.answer(Outcome.status(500))
        self.assertEqual(self.results, [(5, KEYS[1], Outcome.status(500))])


class HostHeaderTests(SynchronousTestCase):
    def test_default_ports(self) -> None:
        self.assertEqual(host_header("a.example", 80, "http"), "a.example")
        self.assertEqual(host_header("a.example", 443, "https"), "a.example")
        self.assertEqual(host_header("a.example", 443, "http"), "a.example:443")
        self.assertEqual(host_header("::1", 8080, "http"), "[::1]:8080")

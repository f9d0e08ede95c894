"""
Tests for L{aigateway.health.manager.HealthManager}: following snapshots,
the hot-path view, the passive hook, manual health, events and stopping.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet import defer, error, task
from twisted.logger import ILogObserver, Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from aigateway.balancer.interfaces import IHealthPeek, IHealthView
from aigateway.config import ConfigSnapshot
from aigateway.health.manager import HealthManager, Probed, Transition
from aigateway.health.passive import Outcome
from aigateway.health.state import Health

from .healthkit import (
    AnsweringProber,
    FakeProber,
    one_upstream,
    target,
)

A, B, C = "10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"
ACTIVE_ON = {"active__healthy__interval": 5, "active__unhealthy__interval": 5}
PASSIVE_ON = {
    "passive__unhealthy__http_failures": 2,
    "passive__unhealthy__cooldown": 10,
}


class ManagerMixin:
    def make(self, prober: Any = None) -> HealthManager:
        self.clock = task.Clock()
        self.logged: list[dict[str, Any]] = []
        self.events: list[Any] = []
        self.prober = prober or FakeProber()
        self.manager = HealthManager(
            self.clock,
            self.prober,
            log=Logger(observer=cast(ILogObserver, self.logged.append)),
        )
        self.manager.add_observer(self.events.append)
        return self.manager

    def config(
        self, version: int, keys: dict[str, int] | None = None, /, **checks: Any
    ) -> ConfigSnapshot:
        """
        Upstream C{u1} with C{checks} and targets C{{key: weight}}.
        """
        keys = {A: 100, B: 100} if keys is None else keys
        snap = one_upstream(version, keys, **checks)
        self.manager.update(snap)
        return snap

    def transitions(self) -> list[tuple[str, str, str, str]]:
        return [
            (e.old.value, e.target, e.new.value, e.cause)
            for e in self.events
            if isinstance(e, Transition)
        ]


class ViewTests(ManagerMixin, SynchronousTestCase):
    def test_interface(self) -> None:
        verifyObject(IHealthView, self.make())
        verifyObject(IHealthPeek, self.manager)

    def test_off(self) -> None:
        manager = self.make()
        self.config(1)
        self.assertTrue(manager.available(target(A)))
        self.assertEqual(manager.describe(target(A))["health"], "HEALTHCHECKS_OFF")
        self.assertEqual(manager.upstream_health("u1"), "HEALTHCHECKS_OFF")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_unknown_target(self) -> None:
        manager = self.make()
        self.assertTrue(manager.available(target(A)))
        manager.report_failure(target(A), timeout=True)
        manager.set_manual(target(A), False)
        self.assertEqual(manager.describe(target(A))["health"], "HEALTHCHECKS_OFF")

    def test_weight_zero_not_checked(self) -> None:
        manager = self.make()
        self.config(1, {A: 100, B: 0}, **ACTIVE_ON)
        self.clock.advance(5)
        self.assertEqual(self.prober.pending(), [A])
        self.assertEqual(
            manager.describe(target(B, weight=0))["health"], "HEALTHCHECKS_OFF"
        )
        self.assertEqual(manager.describe(target(A))["health"], "HEALTHY")

    def test_upstream_health(self) -> None:
        manager = self.make()
        self.config(1, **PASSIVE_ON)
        self.assertEqual(manager.upstream_health("u1"), "HEALTHY")
        manager.set_manual(target(A), False)
        self.assertEqual(manager.upstream_health("u1"), "HEALTHY")
        manager.set_manual(target(B), False)
        self.assertEqual(manager.upstream_health("u1"), "UNHEALTHY")
        self.assertEqual(manager.upstream_health("nope"), "HEALTHCHECKS_OFF")

    def test_due_trial_is_not_available(self) -> None:
        """
        Both targets failed passively and are still failing: once their
        cooldown is over they are due a trial, which a balancer may take
        (L{HealthManager.eligible}), but they are not available weight and
        the upstream stays UNHEALTHY until a trial succeeds.
        """
        manager = self.make()
        self.config(
            1, passive__unhealthy__http_failures=1, passive__unhealthy__cooldown=3
        )
        manager.report_status(target(A), 500)
        manager.report_status(target(B), 500)
        self.clock.advance(3.5)
        for key in (A, B):
            self.assertTrue(manager.eligible(target(key)))
            self.assertFalse(manager.is_available(target(key)))
        self.assertEqual(manager.upstream_health("u1"), "UNHEALTHY")
        self.assertTrue(manager.available(target(A)))
        manager.report_status(target(A), 200)
        self.assertTrue(manager.is_available(target(A)))
        self.assertEqual(manager.upstream_health("u1"), "HEALTHY")

    def test_dns_error_is_not_available(self) -> None:
        manager = self.make()
        self.config(1)
        manager.report_failure(target(A), timeout=False, dns=True)
        self.clock.advance(6)
        self.assertTrue(manager.eligible(target(A)))
        self.assertFalse(manager.is_available(target(A)))

    def test_eligible_unknown(self) -> None:
        manager = self.make()
        self.assertTrue(manager.eligible(target(A)))
        self.config(1, **PASSIVE_ON)
        self.assertTrue(manager.eligible(target(C)))


class UpdateTests(ManagerMixin, SynchronousTestCase):
    def test_keeps_unchanged_targets(self) -> None:
        manager = self.make()
        self.config(1, **PASSIVE_ON)
        manager.set_manual(target(A), False)
        manager.report_status(target(B), 500)
        # A weight change and a new target keep the others' state.
        self.config(2, {A: 50, B: 100, C: 100}, **PASSIVE_ON)
        self.assertEqual(manager.describe(target(A))["health"], "UNHEALTHY")
        self.assertEqual(manager.describe(target(B))["counters"]["http_failures"], 1)
        self.assertEqual(manager.describe(target(C))["health"], "HEALTHY")

    def test_removed_target_forgotten(self) -> None:
        manager = self.make()
        self.config(1, **PASSIVE_ON)
        manager.set_manual(target(A), False)
        self.config(2, {B: 100}, **PASSIVE_ON)
        self.assertEqual(manager.describe(target(A))["health"], "HEALTHCHECKS_OFF")
        self.config(3, **PASSIVE_ON)
        self.assertEqual(manager.describe(target(A))["health"], "HEALTHY")

    def test_checks_turned_off(self) -> None:
        manager = self.make()
        self.config(1, **ACTIVE_ON)
        manager.set_manual(target(A), False)
        self.config(2)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(manager.describe(target(A))["health"], "HEALTHCHECKS_OFF")
        self.assertIn(
            ("UNHEALTHY", A, "HEALTHCHECKS_OFF", "healthchecks off"), self.transitions()
        )

    def test_reschedule(self) -> None:
        self.make()
        self.config(1, **ACTIVE_ON)
        self.assertEqual(
            sorted(c.getTime() for c in self.clock.getDelayedCalls()), [5, 5]
        )
        self.clock.advance(2)
        self.config(2, active__healthy__interval=30, active__unhealthy__interval=0)
        self.assertEqual([c.getTime() for c in self.clock.getDelayedCalls()], [32])
        self.clock.advance(29.9)
        self.assertEqual(self.prober.probes, [])
        self.clock.advance(0.1)
        self.assertEqual(self.prober.pending(), [A, B])

    def test_deleted_target_stops_probes(self) -> None:
        self.make()
        self.config(1, **ACTIVE_ON, active__timeout=0)
        self.clock.advance(5)
        self.assertEqual(self.prober.pending(), [A, B])
        self.config(2, {B: 100}, **ACTIVE_ON, active__timeout=0)
        self.assertEqual(self.prober.cancelled, [A])
        self.prober.answer(Outcome.status(200))
        self.assertEqual([e.target for e in self.events if isinstance(e, Probed)], [B])

    def test_deleted_upstream_stops_probes(self) -> None:
        self.make()
        self.config(1, **ACTIVE_ON)
        self.clock.advance(5)
        self.manager.update(ConfigSnapshot.empty())
        self.assertEqual(sorted(self.prober.cancelled), [A, B])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.manager.upstream_health("u1"), "HEALTHCHECKS_OFF")

    def test_stop(self) -> None:
        self.make()
        self.config(1, **ACTIVE_ON)
        self.clock.advance(5)
        self.manager.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.prober.pending(), [])
        self.assertEqual([e for e in self.events if isinstance(e, Probed)], [])


class ActiveTests(ManagerMixin, SynchronousTestCase):
    def test_events_and_log(self) -> None:
        prober = AnsweringProber({A: Outcome.status(503)})
        self.make(prober)
        self.config(1, active__healthy__interval=5)
        self.clock.advance(5)
        self.assertEqual(self.transitions(), [])
        self.clock.advance(5)
        self.assertEqual(
            self.transitions(), [("HEALTHY", A, "UNHEALTHY", "active http_failures")]
        )
        self.assertFalse(self.manager.available(target(A)))
        self.assertTrue(self.manager.available(target(B)))
        probed = [e for e in self.events if isinstance(e, Probed)]
        self.assertEqual(len(probed), 4)
        self.assertEqual(probed[0], Probed("llm", "u1", A, Outcome.status(503)))
        [entry] = [e for e in self.logged if "old" in e]
        self.assertEqual(
            (entry["upstream"], entry["target"], entry["old"], entry["new"]),
            ("llm", A, "HEALTHY", "UNHEALTHY"),
        )

    def test_proxied_successes_do_not_mask_probes(self) -> None:
        """
        Passive checks off: a target whose probe answers 500 is taken out
        by its second probe, though every proxied request in between
        succeeded (15 a second).
        """
        prober = AnsweringProber({A: Outcome.status(500)})
        manager = self.make(prober)
        self.config(1, active__http_path="/health", **dict.fromkeys(ACTIVE_ON, 1))
        for _ in range(45):
            self.clock.advance(1 / 15)
            manager.report_status(target(A), 200)
        self.assertEqual(
            self.transitions(), [("HEALTHY", A, "UNHEALTHY", "active http_failures")]
        )
        self.assertFalse(manager.available(target(A)))

    def test_broken_observer(self) -> None:
        prober = AnsweringProber()
        self.make(prober)

        def broken(event: object) -> None:
            raise ZeroDivisionError()

        self.manager.add_observer(broken)
        self.config(1, **ACTIVE_ON)
        self.clock.advance(5)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 0)
        self.assertEqual(len([e for e in self.logged if e.get("log_failure")]), 2)
        self.manager.remove_observer(broken)


class PassiveTests(ManagerMixin, SynchronousTestCase):
    def test_thresholds_and_trial(self) -> None:
        manager = self.make()
        self.config(1, **PASSIVE_ON)
        manager.report_status(target(A), 500)
        manager.report_status(target(A), 503)
        self.assertFalse(manager.available(target(A)))
        self.clock.advance(10)
        # Due a trial: eligible for a pick, but not available weight.
        self.assertTrue(manager.eligible(target(A)))
        self.assertFalse(manager.is_available(target(A)))
        self.assertTrue(manager.available(target(A)))
        self.assertFalse(manager.available(target(A)))
        self.assertFalse(manager.eligible(target(A)))
        manager.report_status(target(A), 200)
        self.assertTrue(manager.available(target(A)))
        self.assertTrue(manager.is_available(target(A)))
        self.assertEqual(
            self.transitions(),
            [
                ("HEALTHY", A, "UNHEALTHY", "passive http_failures"),
                ("UNHEALTHY", A, "HEALTHY", "passive trial"),
            ],
        )

    def test_retry_after_bytes(self) -> None:
        manager = self.make()
        self.config(1, **PASSIVE_ON)
        manager.report_status(target(A), 429, b"3")
        self.assertEqual(manager.describe(target(A))["cooldown_until"], 3.0)
        self.assertFalse(manager.available(target(A)))
        self.clock.advance(3)
        self.assertTrue(manager.available(target(A)))
        self.assertEqual(self.transitions(), [])

    def test_failures(self) -> None:
        manager = self.make()
        self.config(
            1, passive__unhealthy__tcp_failures=1, passive__unhealthy__timeouts=1
        )
        manager.report_failure(target(A), timeout=False)
        manager.report_failure(target(B), timeout=True)
        self.assertEqual(
            [cause for *_, cause in self.transitions()],
            ["passive tcp_failures", "passive timeouts"],
        )

    def test_report_error(self) -> None:
        """
        L{HealthManager.report_error} reports and passes the failure on; a
        plain cancellation is not reported.
        """
        manager = self.make()
        self.config(
            1, passive__unhealthy__tcp_failures=1, passive__unhealthy__timeouts=1
        )
        d: defer.Deferred[None] = defer.fail(error.ConnectionRefusedError())
        d.addErrback(manager.report_error, target(A))
        self.failureResultOf(d, error.ConnectionRefusedError)
        self.assertFalse(manager.available(target(A)))
        manager.report_error(Failure(defer.CancelledError()), target(B))
        self.assertTrue(manager.available(target(B)))
        manager.report_error(Failure(defer.TimeoutError()), target(B))
        self.assertFalse(manager.available(target(B)))

    def test_manual(self) -> None:
        manager = self.make()
        self.config(1, **PASSIVE_ON)
        manager.set_manual(target(A), False)
        self.assertFalse(manager.available(target(A)))
        manager.set_manual(target(A), True)
        self.assertTrue(manager.available(target(A)))
        self.assertEqual([c for *_, c in self.transitions()], ["manual", "manual"])
        self.assertEqual(
            self.transitions()[0][:3], ("HEALTHY", A, Health.UNHEALTHY.value)
        )

"""
Tests for L{aigateway.balancer.latency}.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from random import Random

from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from aigateway.balancer.context import PickContext
from aigateway.balancer.interfaces import ISuccessor
from aigateway.balancer.latency import Latency, LatencyBalancer
from aigateway.balancer.leastconn import LeastConnectionsBalancer
from aigateway.health.manager import HealthManager
from aigateway.health.passive import Outcome
from aigateway.model import Target

from . import healthkit
from .balancing import FakeHealth, pick_keys, target, targets, upstream


def _run(
    balancer: LatencyBalancer,
    count: int,
    firstByte: Callable[[Target], float | None],
) -> list[str]:
    """
    Make C{count} attempts one after another, each answering after
    C{firstByte(target)} seconds; return the keys picked.
    """
    ctx = PickContext()
    keys = []
    for _ in range(count):
        chosen = balancer.pick(ctx, ())
        assert chosen is not None
        balancer.started(chosen)
        balancer.finished(chosen, firstByte(chosen))
        keys.append(chosen.key)
    return keys


class LatencyTests(SynchronousTestCase):
    """
    The latency balancer favours targets that answer sooner, and notices
    when a slow one gets fast again.
    """

    def test_factory(self) -> None:
        """
        The factory is named C{latency}.
        """
        factory = Latency()
        self.assertEqual(factory.name, "latency")
        built = factory.build(upstream(), targets(100), FakeHealth())
        self.assertIsInstance(built, LatencyBalancer)

    def test_slow_target(self) -> None:
        """
        After warm-up, a target 50 ms slower than the other gets less than
        20% of the attempts.
        """
        fast, slow = targets(100, 100)
        balancer = LatencyBalancer([fast, slow], FakeHealth(), Random(1))
        times = {fast.key: 0.010, slow.key: 0.060}
        _run(balancer, 100, lambda t: times[t.key])
        counts = Counter(_run(balancer, 2000, lambda t: times[t.key]))
        self.assertLess(counts[slow.key] / 2000, 0.2)

    def test_recovery(self) -> None:
        """
        When the slow target becomes as fast as the other, within 600
        attempts it gets its weight share back (about 220 are expected:
        see the module's docstring).
        """
        fast, slow = targets(100, 100)
        balancer = LatencyBalancer([fast, slow], FakeHealth(), Random(2))
        times = {fast.key: 0.010, slow.key: 0.060}
        _run(balancer, 500, lambda t: times[t.key])
        times[slow.key] = 0.010
        _run(balancer, 600, lambda t: times[t.key])
        counts = Counter(_run(balancer, 1000, lambda t: times[t.key]))
        self.assertLess(abs(counts[slow.key] / 1000 - 0.5), 0.07)

    def test_weights(self) -> None:
        """
        Targets that answer equally fast share attempts by weight.
        """
        ts = targets(100, 300)
        balancer = LatencyBalancer(ts, FakeHealth(), Random(3))
        counts = Counter(_run(balancer, 4000, lambda t: 0.02))
        self.assertLess(abs(counts[ts[1].key] / 4000 - 0.75), 0.03)

    def test_failures(self) -> None:
        """
        A target whose attempts fail is avoided like a slow one.
        """
        good, bad = targets(100, 100)
        balancer = LatencyBalancer([good, bad], FakeHealth(), Random(4))
        _run(balancer, 100, lambda t: 0.5 if t is good else None)
        counts = Counter(_run(balancer, 1000, lambda t: 0.5 if t is good else None))
        self.assertLess(counts[bad.key] / 1000, 0.2)

    def test_in_flight(self) -> None:
        """
        Attempts in flight add to a target's cost: of two equally fast
        targets, one holding many attempts open gets none of the next.
        """
        busy, idle = targets(100, 100)
        balancer = LatencyBalancer([busy, idle], FakeHealth(), Random(5))
        _run(balancer, 20, lambda t: 0.01)
        for _ in range(10):
            balancer.started(busy)
        counts = Counter(pick_keys(balancer, 200))
        self.assertLess(counts[busy.key] / 200, 0.1)

    def test_skips(self) -> None:
        """
        Excluded, unavailable and weight-0 targets are never picked, even
        when they are the fastest; with none left, a pick is L{None}.
        """
        ts = targets(100, 100, 100, 0, 100)
        health = FakeHealth([ts[1].key, ts[4].key])
        balancer = LatencyBalancer(ts, health, Random(6))
        for t in ts:
            balancer.started(t)
            balancer.finished(t, 0.001 if t is not ts[2] else 1.0)
        keys = pick_keys(balancer, 50, [ts[0].key])
        self.assertEqual(set(keys), {ts[2].key})
        self.assertEqual(pick_keys(balancer, 3, [ts[0].key, ts[2].key]), [None] * 3)
        self.assertEqual(pick_keys(LatencyBalancer([], health), 1), [None])

    def test_unknown_targets(self) -> None:
        """
        C{finished} for a target the balancer does not have is ignored, and
        more C{finished} than C{started} leaves no negative count.
        """
        ts = targets(100, 100)
        balancer = LatencyBalancer(ts, FakeHealth(), Random(7))
        balancer.finished(targets(1, 1, 1)[2], 5.0)
        balancer.finished(ts[0], 0.01)
        balancer.finished(ts[1], 0.01)
        counts = Counter(pick_keys(balancer, 400))
        self.assertLess(abs(counts[ts[0].key] / 400 - 0.5), 0.08)


class TrialTests(SynchronousTestCase):
    """
    With real health states on a L{task.Clock}: a target back from an
    outage gets its trial request within one cooldown, because only the
    target picked takes it, not a candidate that lost the comparison.
    """

    KEYS = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]

    def make(self) -> None:
        """
        A health manager on a fresh clock, over L{KEYS} (passive checks:
        one refused connection takes a target out for a 1 s cooldown).
        """
        self.refusing = False
        self.clock = task.Clock()
        self.health = HealthManager(self.clock, healthkit.FakeProber())
        self.health.update(
            healthkit.snapshot(
                1,
                [
                    healthkit.upstream_record(
                        "u1",
                        passive__unhealthy__tcp_failures=1,
                        passive__unhealthy__cooldown=1,
                    )
                ],
                [healthkit.target_record(k) for k in self.KEYS],
            )
        )
        self.targets = [healthkit.target(k) for k in self.KEYS]

    def attempts(self, balancer: LatencyBalancer, count: int) -> list[str]:
        """
        C{count} attempts at the same moment: the first target refuses
        connections while the others answer in 10 ms.
        """
        down = self.targets[0]
        picked = []
        for _ in range(count):
            chosen = balancer.pick(PickContext(), ())
            assert chosen is not None
            balancer.started(chosen)
            if chosen.key == down.key and self.refusing:
                self.health.report(chosen, Outcome.tcp_failure())
                balancer.finished(chosen, None)
            else:
                self.health.report(chosen, Outcome.status(200))
                balancer.finished(chosen, 0.01)
            picked.append(chosen.key)
        return picked

    def test_trial_within_one_cooldown(self) -> None:
        """
        For any draw of the dice: the refusing target is taken out at its
        first failure; once it listens again, the attempts made one
        cooldown later include its trial, which brings it back.
        """
        for seed in range(20):
            self.make()
            down = self.targets[0]
            balancer = LatencyBalancer(self.targets, self.health, Random(seed))
            self.refusing = True
            while down.key not in self.attempts(balancer, 1):
                pass
            self.assertEqual(self.health.describe(down)["health"], "UNHEALTHY")
            self.attempts(balancer, 50)
            self.refusing = False
            self.clock.advance(1)
            picked = self.attempts(balancer, 300)
            self.assertEqual(
                self.health.describe(down)["health"], "HEALTHY", f"seed {seed}"
            )
            self.assertGreaterEqual(picked.count(down.key), 1)

    def test_loser_keeps_its_trial(self) -> None:
        """
        A candidate due a trial that loses the comparison keeps its trial:
        weighing it took nothing.
        """
        self.make()
        down = self.targets[0]
        balancer = LatencyBalancer(self.targets, self.health, Random(11))
        for t in self.targets:
            balancer.started(t)
            balancer.finished(t, 5.0 if t is down else 0.01)
        self.health.report(down, Outcome.tcp_failure())
        self.clock.advance(1)
        for _ in range(100):
            chosen = balancer.pick(PickContext(), ())
            assert chosen is not None
            if chosen.key == down.key:
                break
            self.assertTrue(self.health.eligible(down))
        else:
            self.fail("no trial in 100 picks")
        self.assertFalse(self.health.eligible(down))


class TakeOverTests(SynchronousTestCase):
    """
    A latency balancer built for a changed configuration starts from the
    averages and in-flight counts of the one it replaces, and learns from
    the attempts that end on that one.
    """

    def test_averages_carried(self) -> None:
        """
        After a change of weight, the target known to be slow still gets
        less than 20% of the attempts, from the first one on; the averages
        and the typical average are those of the targets kept.
        """
        fast, slow, gone = targets(100, 100, 100)
        old = LatencyBalancer([fast, slow, gone], FakeHealth(), Random(9))
        times = {fast.key: 0.010, slow.key: 0.060, gone.key: 5.0}
        _run(old, 100, lambda t: times[t.key])
        new = LatencyBalancer([target(fast.key, 150), slow], FakeHealth(), Random(10))
        verifyObject(ISuccessor, new)
        self.assertTrue(new.take_over(old))
        self.assertEqual(
            [s.ewma for s in new._stats],
            [old._byKey[fast.key].ewma, old._byKey[slow.key].ewma],
        )
        self.assertEqual(new._measured, 2)
        self.assertAlmostEqual(new._sum, sum(s.ewma or 0 for s in new._stats))
        counts = Counter(_run(new, 500, lambda t: times[t.key]))
        self.assertLess(counts[slow.key] / 500, 0.2)

    def test_in_flight_carried(self) -> None:
        """
        Attempts in flight on the replaced balancer count in its successor
        until they end on the replaced one, and their samples reach it.
        """
        busy, idle = targets(100, 100)
        old = LatencyBalancer([busy, idle], FakeHealth(), Random(11))
        _run(old, 20, lambda t: 0.01)
        for _ in range(10):
            old.started(busy)
        new = LatencyBalancer([busy, target(idle.key, 50)], FakeHealth(), Random(12))
        self.assertTrue(new.take_over(old))
        counts = Counter(pick_keys(new, 200))
        self.assertLess(counts[busy.key] / 200, 0.1)
        for _ in range(10):
            old.finished(busy, 2.0)
        self.assertEqual([s.active for s in new._stats], [0, 0])
        # The samples went to the successor only: the replaced balancer,
        # used now only by retries of attempts it began, keeps what it knew.
        self.assertGreater(new._byKey[busy.key].ewma or 0, 1.0)
        self.assertEqual(old._byKey[busy.key].ewma, 0.01)

    def test_not_taken_over(self) -> None:
        """
        A balancer of another algorithm, or one already taken over, is not
        taken over.
        """
        ts = targets(100, 100)
        self.assertFalse(
            LatencyBalancer(ts, FakeHealth()).take_over(
                LeastConnectionsBalancer(ts, FakeHealth())
            )
        )
        old = LatencyBalancer(ts, FakeHealth())
        self.assertTrue(LatencyBalancer(ts, FakeHealth()).take_over(old))
        self.assertFalse(LatencyBalancer(ts, FakeHealth()).take_over(old))

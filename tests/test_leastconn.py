"""
Tests for L{aigateway.balancer.leastconn}.
"""

from __future__ import annotations

from collections import Counter

from twisted.trial.unittest import SynchronousTestCase

from aigateway.balancer.context import PickContext
from aigateway.balancer.leastconn import (
    LeastConnections,
    LeastConnectionsBalancer,
)

from .balancing import FakeHealth, pick_keys, targets, upstream


class LeastConnectionsTests(SynchronousTestCase):
    """
    Least connections sends each attempt to the least loaded target for its
    weight.
    """

    def test_factory(self) -> None:
        """
        The factory is named C{least-connections}.
        """
        factory = LeastConnections()
        self.assertEqual(factory.name, "least-connections")
        built = factory.build(upstream(), targets(100), FakeHealth())
        self.assertIsInstance(built, LeastConnectionsBalancer)

    def test_fewest_active(self) -> None:
        """
        The target with the fewest attempts in flight is picked.
        """
        ts = targets(100, 100, 100)
        balancer = LeastConnectionsBalancer(ts, FakeHealth())
        for t in (ts[0], ts[0], ts[1], ts[2], ts[2]):
            balancer.started(t)
        self.assertEqual(pick_keys(balancer, 3), [ts[1].key] * 3)
        balancer.finished(ts[0], 0.1)
        balancer.finished(ts[0], None)
        self.assertEqual(pick_keys(balancer, 1), [ts[0].key])

    def test_weighted_in_flight(self) -> None:
        """
        Targets weighted 1:3, each attempt held open, end up with in-flight
        counts in ratio 1:3.
        """
        ts = targets(1, 3)
        balancer = LeastConnectionsBalancer(ts, FakeHealth())
        ctx = PickContext()
        active: Counter[str] = Counter()
        for _ in range(400):
            chosen = balancer.pick(ctx, ())
            assert chosen is not None
            balancer.started(chosen)
            active[chosen.key] += 1
        self.assertEqual(active, {ts[0].key: 100, ts[1].key: 300})

    def test_churn(self) -> None:
        """
        With attempts finishing as others start, in-flight counts stay in
        the ratio of the weights.
        """
        ts = targets(1, 3)
        balancer = LeastConnectionsBalancer(ts, FakeHealth())
        ctx = PickContext()
        inFlight = []
        for i in range(2000):
            chosen = balancer.pick(ctx, ())
            assert chosen is not None
            balancer.started(chosen)
            inFlight.append(chosen)
            if i >= 40:
                balancer.finished(inFlight.pop(0), 0.01)
        counts = Counter(t.key for t in inFlight)
        self.assertEqual(counts, {ts[0].key: 10, ts[1].key: 30})

    def test_ties_round_robin(self) -> None:
        """
        Equally loaded targets take turns.
        """
        ts = targets(100, 100, 100)
        balancer = LeastConnectionsBalancer(ts, FakeHealth())
        keys = pick_keys(balancer, 9)
        self.assertEqual(keys, [t.key for t in ts] * 3)

    def test_skips(self) -> None:
        """
        Excluded, unavailable and weight-0 targets are not picked, whatever
        their load; with none left, a pick is L{None}.
        """
        ts = targets(100, 100, 100, 0)
        health = FakeHealth([ts[1].key])
        balancer = LeastConnectionsBalancer(ts, health)
        balancer.started(ts[2])
        balancer.started(ts[2])
        self.assertEqual(set(pick_keys(balancer, 5, [ts[0].key])), {ts[2].key})
        self.assertEqual(pick_keys(balancer, 2, [ts[0].key, ts[2].key]), [None] * 2)
        health.down.clear()
        self.assertNotIn(ts[3].key, pick_keys(balancer, 10))

    def test_unknown_targets(self) -> None:
        """
        C{started} and C{finished} for a target the balancer does not have,
        or more C{finished} than C{started}, change nothing.
        """
        ts = targets(100, 100)
        balancer = LeastConnectionsBalancer(ts, FakeHealth())
        balancer.started(targets(1, 1, 1)[2])
        balancer.finished(ts[0], None)
        balancer.finished(ts[0], None)
        self.assertEqual(pick_keys(balancer, 4), [ts[0].key, ts[1].key] * 2)

    def test_heap_bounded(self) -> None:
        """
        Many load changes without picks do not grow the heap without bound.
        """
        ts = targets(100, 100)
        balancer = LeastConnectionsBalancer(ts, FakeHealth())
        for _ in range(1000):
            balancer.started(ts[0])
        self.assertLessEqual(len(balancer._heap), 4 * 2 + 8)
        self.assertEqual(pick_keys(balancer, 2), [ts[1].key] * 2)

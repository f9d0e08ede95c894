"""
Tests for L{aigateway.balancer.roundrobin}.
"""

from __future__ import annotations

from collections import Counter
from functools import reduce
from math import gcd

from twisted.trial.unittest import SynchronousTestCase

from aigateway.balancer.roundrobin import RoundRobin, RoundRobinBalancer

from .balancing import FakeHealth, pick_keys, targets, upstream


class RoundRobinTests(SynchronousTestCase):
    """
    Weighted round-robin shares by weight, smoothly, over available targets.
    """

    def test_factory(self) -> None:
        """
        The factory is named C{round-robin} and builds a round-robin balancer.
        """
        factory = RoundRobin()
        self.assertEqual(factory.name, "round-robin")
        built = factory.build(upstream(), targets(100), FakeHealth())
        self.assertIsInstance(built, RoundRobinBalancer)

    def test_weights(self) -> None:
        """
        Over 4000 picks, targets weighted 100/100/200 get 1/4, 1/4, 1/2 of
        the picks, within 2%.
        """
        ts = targets(100, 100, 200)
        counts = Counter(pick_keys(RoundRobinBalancer(ts, FakeHealth()), 4000))
        for t, share in zip(ts, [0.25, 0.25, 0.5], strict=True):
            self.assertLess(abs(counts[t.key] / 4000 - share), 0.02)

    def test_smooth(self) -> None:
        """
        In every window of C{sum(weights) / gcd(weights)} successive picks,
        each target appears exactly its share, however long the balancer
        has run: there are no bursts.
        """
        for weights in [(100, 100, 200), (5, 1, 1), (3, 7, 11, 13), (999, 1)]:
            ts = targets(*weights)
            divisor = reduce(gcd, weights)
            window = sum(weights) // divisor
            expected = {t.key: t.weight // divisor for t in ts}
            keys = pick_keys(RoundRobinBalancer(ts, FakeHealth()), window * 20)
            counts = Counter(keys[:window])
            self.assertEqual(counts, expected)
            for start in range(window, len(keys)):
                # Slide the window by one pick.
                counts[keys[start - window]] -= 1
                counts[keys[start]] += 1
                self.assertEqual(+counts, expected, (weights, start))

    def test_zero_weight(self) -> None:
        """
        A target of weight 0 is never picked, even when it is the only one.
        """
        ts = targets(0, 100)
        self.assertNotIn(ts[0].key, pick_keys(RoundRobinBalancer(ts, FakeHealth()), 50))
        self.assertEqual(
            pick_keys(RoundRobinBalancer(targets(0), FakeHealth()), 3), [None] * 3
        )

    def test_exclude(self) -> None:
        """
        Excluded targets are skipped; a pick with exclusions (a retry)
        borrows the next target's turn without taking it, so it does not
        move the rotation of first attempts.
        """
        ts = targets(100, 100, 100)
        balancer = RoundRobinBalancer(ts, FakeHealth())
        keys = pick_keys(balancer, 30, [ts[1].key])
        self.assertNotIn(ts[1].key, keys)
        self.assertEqual(pick_keys(balancer, 3), [t.key for t in ts])

    def test_unavailable(self) -> None:
        """
        Unavailable targets are skipped, and are picked again, without a
        burst, once available.
        """
        ts = targets(100, 100)
        health = FakeHealth([ts[0].key])
        balancer = RoundRobinBalancer(ts, health)
        self.assertEqual(set(pick_keys(balancer, 10)), {ts[1].key})
        health.down.clear()
        self.assertEqual(Counter(pick_keys(balancer, 10)), {ts[0].key: 5, ts[1].key: 5})

    def test_a_heavier_target_back_after_a_long_outage_does_not_burst(self):
        """
        A target that was unavailable for many picks comes back at its
        weight's share at once, not with the turns it missed: a skipped
        target's place moves with the picks made meanwhile.
        """
        ts = targets(100, 50)
        health = FakeHealth([ts[0].key])
        balancer = RoundRobinBalancer(ts, health)
        self.assertEqual(set(pick_keys(balancer, 1000)), {ts[1].key})
        health.down.clear()
        for _ in range(5):
            window = Counter(pick_keys(balancer, 9))
            self.assertEqual(window, {ts[0].key: 6, ts[1].key: 3})

    def test_none_available(self) -> None:
        """
        With every target unavailable or excluded, a pick is L{None}, and
        the balancer still works afterwards.
        """
        ts = targets(100, 100)
        health = FakeHealth([ts[0].key])
        balancer = RoundRobinBalancer(ts, health)
        self.assertEqual(pick_keys(balancer, 3, [ts[1].key]), [None] * 3)
        self.assertEqual(pick_keys(RoundRobinBalancer([], health), 1), [None])
        self.assertEqual(pick_keys(balancer, 2), [ts[1].key] * 2)


class RetryTests(SynchronousTestCase):
    """
    Retries do not disturb the rotation of first attempts.
    """

    def test_failing_target_keeps_its_share(self):
        """
        With one of two equal targets failing every attempt, first attempts
        still alternate: the failing target costs half of the requests a
        retry, not every request.
        """
        from aigateway.balancer.context import PickContext
        from aigateway.balancer.roundrobin import RoundRobinBalancer

        from .balancing import FakeHealth, target

        good, bad = target("good:1"), target("bad:1")
        balancer = RoundRobinBalancer([good, bad], FakeHealth())
        firsts = []
        for _ in range(10):
            first = balancer.pick(PickContext(), ())
            firsts.append(first.key)
            if first is bad:
                retry = balancer.pick(PickContext(), {bad.key})
                self.assertIs(retry, good)
        self.assertEqual(firsts.count("bad:1"), 5)
        self.assertEqual(firsts.count("good:1"), 5)

"""
Tests for L{aigateway.balancer.leastconn}.
"""

from __future__ import annotations

import gc
import weakref
from collections import Counter
from random import Random

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from aigateway.balancer.context import PickContext
from aigateway.balancer.interfaces import IBalancer, ISuccessor
from aigateway.balancer.leastconn import (
    LeastConnections,
    LeastConnectionsBalancer,
)
from aigateway.balancer.roundrobin import RoundRobinBalancer
from aigateway.model import Target

from .balancing import FakeHealth, pick_keys, target, targets, upstream


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


class TakeOverTests(SynchronousTestCase):
    """
    A least-connections balancer built for a changed configuration starts
    from the in-flight counts of the one it replaces, and is told of the
    attempts that start and end on that one.
    """

    def test_counts_carried(self) -> None:
        """
        With 20 attempts in flight on alpha, a balancer rebuilt for a
        change of alpha's weight sends the next 10 to beta.
        """
        alpha, beta = targets(100, 100)
        old = LeastConnectionsBalancer([alpha, beta], FakeHealth())
        for _ in range(20):
            old.started(alpha)
        new = LeastConnectionsBalancer([target(alpha.key, 120), beta], FakeHealth())
        verifyObject(ISuccessor, new)
        self.assertTrue(new.take_over(old))
        self.assertEqual(_attempts(new, 10), [beta.key] * 10)

    def test_ends_passed_on(self) -> None:
        """
        Attempts begun on the replaced balancer end on it, and the count of
        its successor goes down with them; retries begun on it count in the
        successor too.  An end more than began leaves 0.
        """
        alpha, beta = targets(100, 100)
        old = LeastConnectionsBalancer([alpha, beta], FakeHealth())
        for _ in range(20):
            old.started(alpha)
        new = LeastConnectionsBalancer([alpha, beta], FakeHealth())
        new.take_over(old)
        old.started(alpha)
        new.started(alpha)
        self.assertEqual(_active(new), {alpha.key: 22, beta.key: 0})
        for _ in range(21):
            old.finished(alpha, 0.1)
        self.assertEqual(_active(new), {alpha.key: 1, beta.key: 0})
        new.finished(alpha, 0.1)
        new.finished(alpha, 0.1)
        self.assertEqual(_active(new), {alpha.key: 0, beta.key: 0})
        self.assertEqual(pick_keys(new, 4), [alpha.key, beta.key] * 2)

    def test_replaced_balancers_are_not_kept(self) -> None:
        """
        An attempt that outlives a thousand changes keeps its own balancer,
        not the thousand that replaced it one after the other, and its end
        still counts in the balancer in force, in one step.
        """
        alpha, beta = targets(100, 100)
        first = LeastConnectionsBalancer([alpha, beta], FakeHealth())
        first.started(alpha)
        current = first
        middle = None
        for i in range(1000):
            new = LeastConnectionsBalancer(
                [target(alpha.key, 100 + i % 2), beta], FakeHealth()
            )
            self.assertTrue(new.take_over(current))
            if i == 500:
                middle = weakref.ref(new)
            current = new
        gc.collect()
        assert middle is not None
        self.assertIsNone(middle())
        self.assertEqual(_active(current), {alpha.key: 1, beta.key: 0})
        first.finished(alpha, 0.1)
        self.assertEqual(_active(current), {alpha.key: 0, beta.key: 0})

    def test_many_changes(self) -> None:
        """
        Through 2000 changes of weight, with attempts begun and ended on
        whichever balancer was in force when each began, the balancer in
        force counts exactly the attempts in flight; the first attempt
        ends without recursing 2000 balancers deep.
        """
        ts = targets(100, 100, 100)
        rng = Random(8)
        current = LeastConnectionsBalancer(ts, FakeHealth())
        inFlight: list[tuple[LeastConnectionsBalancer, Target]] = []
        for step in range(2000):
            for _ in range(rng.randrange(3)):
                chosen = current.pick(PickContext(), ())
                assert chosen is not None
                current.started(chosen)
                inFlight.append((current, chosen))
            for _ in range(rng.randrange(3)):
                if len(inFlight) > 1:
                    balancer, chosen = inFlight.pop(rng.randrange(1, len(inFlight)))
                    balancer.finished(chosen, 0.1)
            weights = [rng.choice([1, 50, 100, 300]) for _ in ts]
            new = LeastConnectionsBalancer(
                [target(t.key, w) for t, w in zip(ts, weights, strict=True)],
                FakeHealth(),
            )
            self.assertTrue(new.take_over(current), step)
            current = new
        expected = Counter(t.key for _, t in inFlight)
        self.assertEqual(_active(current), {t.key: expected[t.key] for t in ts})
        for balancer, chosen in inFlight:
            balancer.finished(chosen, 0.1)
        self.assertEqual(_active(current), {t.key: 0 for t in ts})

    def test_removed_target(self) -> None:
        """
        A target removed and added back starts from 0: the attempts begun
        on it before it was removed never reach its new count.
        """
        alpha, beta = targets(100, 100)
        first = LeastConnectionsBalancer([alpha, beta], FakeHealth())
        for _ in range(5):
            first.started(alpha)
            first.started(beta)
        second = LeastConnectionsBalancer([beta], FakeHealth())
        self.assertTrue(second.take_over(first))
        third = LeastConnectionsBalancer([alpha, beta], FakeHealth())
        self.assertTrue(third.take_over(second))
        self.assertEqual(_active(third), {alpha.key: 0, beta.key: 5})
        third.started(alpha)
        for _ in range(5):
            first.finished(alpha, 0.1)
            first.finished(beta, 0.1)
        self.assertEqual(_active(third), {alpha.key: 1, beta.key: 0})

    def test_not_taken_over(self) -> None:
        """
        A balancer of another algorithm, one with none of the targets, or
        one already taken over is not taken over: the new balancer starts
        fresh, and nothing is passed on to it.
        """
        alpha, beta = targets(100, 100)
        self.assertFalse(
            LeastConnectionsBalancer([alpha], FakeHealth()).take_over(
                RoundRobinBalancer([alpha], FakeHealth())
            )
        )
        old = LeastConnectionsBalancer([alpha], FakeHealth())
        old.started(alpha)
        other = LeastConnectionsBalancer([beta], FakeHealth())
        self.assertFalse(other.take_over(old))
        new = LeastConnectionsBalancer([alpha], FakeHealth())
        self.assertTrue(new.take_over(old))
        late = LeastConnectionsBalancer([alpha], FakeHealth())
        self.assertFalse(late.take_over(old))
        old.finished(alpha, None)
        self.assertEqual(_active(new), {alpha.key: 0})
        self.assertEqual(_active(late), {alpha.key: 0})


def _attempts(balancer: IBalancer, count: int) -> list[str]:
    """
    Pick and start C{count} attempts, held open; return the keys picked.
    """
    keys = []
    for _ in range(count):
        chosen = balancer.pick(PickContext(), ())
        assert chosen is not None
        balancer.started(chosen)
        keys.append(chosen.key)
    return keys


def _active(balancer: LeastConnectionsBalancer) -> dict[str, int]:
    """
    The in-flight count of each target of C{balancer}.
    """
    return {key: load.active for key, load in balancer._byKey.items()}

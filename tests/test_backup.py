"""
Tests for L{aigateway.balancer.backup}.
"""

from __future__ import annotations

import attrs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from aigateway.balancer import registry
from aigateway.balancer.backup import BackupBalancer, build_balancer, carry_over
from aigateway.balancer.interfaces import IBalancer
from aigateway.balancer.leastconn import LeastConnectionsBalancer
from aigateway.balancer.roundrobin import RoundRobinBalancer
from aigateway.model import Target

from .balancing import FakeHealth, context, pick_keys, target, targets, upstream
from .test_leastconn import _active, _attempts


class BuildBalancerTests(SynchronousTestCase):
    """
    L{build_balancer} builds the upstream's algorithm, wrapped for backups
    only when there are both backup and other targets.
    """

    def test_algorithm(self) -> None:
        """
        Without backups, the balancer is the algorithm's own.
        """
        ts = targets(100, 100)
        self.assertIsInstance(
            build_balancer(upstream(algorithm="least-connections"), ts, FakeHealth()),
            LeastConnectionsBalancer,
        )
        self.assertIsInstance(
            build_balancer(upstream(), ts, FakeHealth()), RoundRobinBalancer
        )

    def test_only_backups(self) -> None:
        """
        With only backup targets, they are balanced as usual.
        """
        ts = targets(100, 100, backup=True)
        balancer = build_balancer(upstream(), ts, FakeHealth())
        self.assertIsInstance(balancer, RoundRobinBalancer)
        self.assertEqual(set(pick_keys(balancer, 4)), {t.key for t in ts})

    def test_unknown(self) -> None:
        """
        An algorithm nobody registered is a L{KeyError}.
        """
        unknown = attrs.evolve(upstream(), algorithm="nope")
        self.assertRaises(KeyError, build_balancer, unknown, [], FakeHealth())

    def test_every_algorithm(self) -> None:
        """
        Every registered algorithm builds, with backups, a balancer that
        provides L{IBalancer} and picks a backup only while no primary
        target is available.
        """
        primary = targets(100, 100)
        backup = targets(100, 100, backup=True)
        for name in registry.names():
            health = FakeHealth()
            balancer = build_balancer(
                upstream(algorithm=name), primary + backup, health
            )
            self.assertIsInstance(balancer, BackupBalancer)
            verifyObject(IBalancer, balancer)
            ctx = context({"x-user": "a"}, client_ip="1.2.3.4")
            for _ in range(10):
                self.assertIn(balancer.pick(ctx, ()), primary, name)
            self.assertIn(balancer.pick(ctx, [primary[0].key]), primary, name)
            health.down = {primary[1].key}
            self.assertIn(balancer.pick(ctx, [primary[0].key]), backup, name)
            health.down = {t.key for t in primary + backup}
            self.assertIsNone(balancer.pick(ctx, ()), name)


class BackupBalancerTests(SynchronousTestCase):
    """
    L{BackupBalancer} tells each attempt's start and end to the balancer
    that owns the target.
    """

    def test_started_finished(self) -> None:
        """
        C{started} and C{finished} go to the primary or the backup balancer
        by the target's C{backup} flag.
        """
        primary = targets(100, 100)
        backup = targets(100, 100, backup=True)
        health = FakeHealth({t.key for t in primary})
        balancer = BackupBalancer(
            LeastConnectionsBalancer(primary, health),
            LeastConnectionsBalancer(backup, health),
        )
        balancer.started(backup[0])
        balancer.started(primary[1])
        self.assertEqual(pick_keys(balancer, 2), [backup[1].key] * 2)
        balancer.finished(backup[0], 0.1)
        balancer.started(backup[1])
        health.down.clear()
        self.assertEqual(pick_keys(balancer, 2), [primary[0].key] * 2)
        balancer.finished(primary[1], None)
        self.assertEqual(pick_keys(balancer, 2), [primary[1].key, primary[0].key])


class CarryOverTests(SynchronousTestCase):
    """
    L{carry_over} hands each part of a balancer split by backup targets the
    counts of the part of the replaced balancer with its targets, however
    the split changed.
    """

    def build(self, ts: list[Target]) -> IBalancer:
        return build_balancer(upstream(algorithm="least-connections"), ts, self.health)

    def setUp(self) -> None:
        self.health = FakeHealth()
        self.alpha, self.beta = targets(100, 100)
        self.spare = target("10.0.0.9:81", backup=True)

    def test_split(self) -> None:
        """
        With a backup target, 20 attempts in flight on alpha send the next
        10 to beta after a change of alpha's weight, and their ends on the
        replaced balancer bring the counts down.
        """
        alpha, beta, spare = self.alpha, self.beta, self.spare
        before = [alpha, beta, spare]
        old = self.build(before)
        old.started(spare)
        for _ in range(20):
            old.started(alpha)
        after = [target(alpha.key, 120), beta, spare]
        new = self.build(after)
        self.assertIsInstance(new, BackupBalancer)
        carry_over(new, after, old, before)
        self.assertEqual(_counts(new), {alpha.key: 20, beta.key: 0, spare.key: 1})
        self.assertEqual(_attempts(new, 10), [beta.key] * 10)
        old.finished(spare, 0.1)
        for _ in range(20):
            old.finished(alpha, 0.1)
        self.assertEqual(_counts(new), {alpha.key: 0, beta.key: 10, spare.key: 0})

    def test_split_made_and_undone(self) -> None:
        """
        Adding the first backup target, or removing the last, keeps the
        counts of the other targets.
        """
        alpha, beta, spare = self.alpha, self.beta, self.spare
        plain = self.build([alpha, beta])
        for _ in range(20):
            plain.started(alpha)
        split = self.build([alpha, beta, spare])
        carry_over(split, [alpha, beta, spare], plain, [alpha, beta])
        split.started(spare)
        self.assertEqual(_counts(split), {alpha.key: 20, beta.key: 0, spare.key: 1})
        again = self.build([alpha, beta])
        carry_over(again, [alpha, beta], split, [alpha, beta, spare])
        self.assertEqual(_counts(again), {alpha.key: 20, beta.key: 0})
        for _ in range(20):
            plain.finished(alpha, 0.1)
        split.finished(spare, 0.1)
        self.assertEqual(_counts(again), {alpha.key: 0, beta.key: 0})

    def test_only_backups_split(self) -> None:
        """
        An upstream of backup targets only, given its first primary target,
        keeps the backups' counts in its backup part.
        """
        spare, other = self.spare, target("10.0.0.8:81", backup=True)
        old = self.build([spare, other])
        old.started(spare)
        new = self.build([self.alpha, spare, other])
        carry_over(new, [self.alpha, spare, other], old, [spare, other])
        self.assertEqual(_counts(new), {self.alpha.key: 0, spare.key: 1, other.key: 0})

    def test_a_backup_made_primary_leaves_the_others_theirs(self) -> None:
        """
        Of an upstream of backup targets only, one made a primary target
        starts afresh in the primary part; the backups it leaves keep their
        counts (the backup part takes over the balancer before, which was
        all backups).
        """
        spare, other = self.spare, target("10.0.0.8:81", backup=True)
        before = [spare, other]
        old = self.build(before)
        for _ in range(20):
            old.started(other)
        old.started(spare)
        promoted = attrs.evolve(spare, backup=False)
        after = [promoted, other]
        new = self.build(after)
        self.assertIsInstance(new, BackupBalancer)
        carry_over(new, after, old, before)
        self.assertEqual(_counts(new), {spare.key: 0, other.key: 20})
        old.finished(spare, 0.1)
        for _ in range(20):
            old.finished(other, 0.1)
        self.assertEqual(_counts(new), {spare.key: 0, other.key: 0})

    def test_backup_flag_changed(self) -> None:
        """
        A target that becomes a backup starts from 0 and its old attempts
        do not reach its new count; the others keep theirs.
        """
        alpha, beta = self.alpha, self.beta
        before = [alpha, beta, self.spare]
        old = self.build(before)
        old.started(alpha)
        old.started(beta)
        after = [attrs.evolve(alpha, backup=True), beta, self.spare]
        new = self.build(after)
        carry_over(new, after, old, before)
        self.assertEqual(_counts(new), {alpha.key: 0, beta.key: 1, self.spare.key: 0})
        new.started(attrs.evolve(alpha, backup=True))
        old.finished(alpha, 0.1)
        old.finished(beta, 0.1)
        self.assertEqual(_counts(new), {alpha.key: 1, beta.key: 0, self.spare.key: 0})


def _counts(balancer: IBalancer) -> dict[str, int]:
    """
    The in-flight count of each target of C{balancer}, a least-connections
    balancer or two of them split by backup targets.
    """
    parts = [balancer]
    if isinstance(balancer, BackupBalancer):
        parts = [balancer._primary, balancer._backup]
    counts = {}
    for part in parts:
        assert isinstance(part, LeastConnectionsBalancer)
        counts.update(_active(part))
    return counts

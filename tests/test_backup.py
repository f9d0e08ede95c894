"""
Tests for L{aigateway.balancer.backup}.
"""

from __future__ import annotations

import attrs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from aigateway.balancer import registry
from aigateway.balancer.backup import BackupBalancer, build_balancer
from aigateway.balancer.interfaces import IBalancer
from aigateway.balancer.leastconn import LeastConnectionsBalancer
from aigateway.balancer.roundrobin import RoundRobinBalancer

from .balancing import FakeHealth, context, pick_keys, targets, upstream


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

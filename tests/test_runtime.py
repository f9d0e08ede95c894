"""
Configuration snapshots and the runtime that swaps them in.
"""

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from aigateway.balancer.backup import build_balancer
from aigateway.balancer.interfaces import IBalancer
from aigateway.config import ConfigSnapshot, empty_records
from aigateway.records import build_record
from aigateway.runtime import Runtime

from .test_leastconn import _attempts


class _Health:
    def __init__(self):
        self.updates = []

    def update(self, snapshot):
        self.updates.append(snapshot.version)

    def available(self, target):
        return True


def _records(weights, algorithm="round-robin"):
    records = empty_records()
    upstream, _ = build_record(
        "upstreams", {"name": "u", "algorithm": algorithm}, False
    )
    upstream["id"] = "u1"
    records["upstreams"]["u1"] = upstream
    for i, weight in enumerate(weights):
        target, _ = build_record(
            "targets",
            {"target": f"10.0.0.{i}:80", "weight": weight, "upstream": {"id": "u1"}},
            False,
        )
        target["id"] = f"t{i}"
        records["targets"][target["id"]] = target
    service, _ = build_record("services", {"name": "s", "host": "u"}, False)
    service["id"] = "s1"
    records["services"]["s1"] = service
    route, _ = build_record("routes", {"paths": ["/"], "service": {"id": "s1"}}, False)
    route["id"] = "r1"
    records["routes"]["r1"] = route
    return records


class RuntimeTests(SynchronousTestCase):
    def test_snapshot_indexes(self):
        snapshot = ConfigSnapshot.build(3, _records([100, 0]))
        self.assertEqual(snapshot.version, 3)
        self.assertEqual(snapshot.upstreams["u"].id, "u1")
        self.assertEqual(
            [t.key for t in snapshot.targets["u1"]], ["10.0.0.0:80", "10.0.0.1:80"]
        )
        self.assertEqual(snapshot.services["s1"].read_timeout, 60.0)
        self.assertEqual(snapshot.routes[0].paths, ("/",))

    def test_swap(self):
        """
        apply() swaps router and balancers in one assignment, tells health
        first and observers after; an unchanged upstream keeps its balancer
        (and its state), a changed one gets a new one.
        """
        health = _Health()
        runtime = Runtime(health, build_balancer)
        seen = []
        runtime.observe(lambda snapshot: seen.append(snapshot.version))
        runtime.apply(ConfigSnapshot.build(1, _records([100, 100])))
        first = runtime.current
        balancer = first.balancers["u1"]
        verifyObject(IBalancer, balancer)
        self.assertIsNotNone(first.router.match("h", "GET", "/x"))

        records = _records([100, 100])
        records["services"]["s1"] = {**records["services"]["s1"], "retries": 1}
        runtime.apply(ConfigSnapshot.build(2, records))
        self.assertIs(runtime.current.balancers["u1"], balancer)
        self.assertIsNot(runtime.current, first)

        runtime.apply(ConfigSnapshot.build(3, _records([100, 50])))
        self.assertIsNot(runtime.current.balancers["u1"], balancer)
        self.assertEqual(health.updates, [1, 2, 3])
        self.assertEqual(seen, [1, 2, 3])
        self.assertEqual(runtime.snapshot.version, 3)

    def test_carry_over(self):
        """
        A least-connections balancer rebuilt for a change of weight starts
        from the counts of the one it replaced, which passes on the ends of
        the attempts begun on it; after a change of algorithm and back,
        the balancer starts fresh.
        """
        runtime = Runtime(_Health(), build_balancer)
        runtime.apply(ConfigSnapshot.build(1, _records([100, 100], LEAST)))
        alpha, beta = runtime.snapshot.targets["u1"]
        first = runtime.current.balancers["u1"]
        for _ in range(20):
            first.started(alpha)

        runtime.apply(ConfigSnapshot.build(2, _records([120, 100], LEAST)))
        second = runtime.current.balancers["u1"]
        self.assertIsNot(second, first)
        self.assertEqual(_attempts(second, 10), [beta.key] * 10)
        for _ in range(20):
            first.finished(alpha, 1.0)
        self.assertEqual(_attempts(second, 2), [alpha.key] * 2)

        runtime.apply(ConfigSnapshot.build(3, _records([120, 100])))
        runtime.apply(ConfigSnapshot.build(4, _records([120, 100], LEAST)))
        fourth = runtime.current.balancers["u1"]
        self.assertEqual(_attempts(fourth, 2), [alpha.key, beta.key])


LEAST = "least-connections"

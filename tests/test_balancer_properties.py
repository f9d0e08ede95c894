"""
Properties every registered balancing algorithm must have, checked on
random upstreams: whatever the weights, health and exclusions, a pick is an
eligible target when there is one, and L{None} only when there is none.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from aigateway.balancer import registry
from aigateway.balancer.interfaces import IBalancer, IBalancerFactory

from .balancing import FakeHealth, context, target, upstream

#: One target: (weight, available, excluded).
_TARGET = st.tuples(
    st.sampled_from([0, 0, 1, 2, 3, 100, 1000, 65535]), st.booleans(), st.booleans()
)


class RegistryTests(SynchronousTestCase):
    """
    Every registered algorithm is found by its name and provides the
    interfaces.
    """

    def test_names(self) -> None:
        """
        The four built-in algorithms are registered, each under its name.
        """
        self.assertTrue(
            {"round-robin", "least-connections", "consistent-hashing", "latency"}
            <= set(registry.names())
        )
        for name in registry.names():
            self.assertEqual(registry.lookup(name).name, name)

    def test_interfaces(self) -> None:
        """
        Each factory provides L{IBalancerFactory}, and what it builds
        provides L{IBalancer}.
        """
        for name in registry.names():
            factory = registry.lookup(name)
            verifyObject(IBalancerFactory, factory)
            built = factory.build(
                upstream(algorithm=name), [target("a:1")], FakeHealth()
            )
            verifyObject(IBalancer, built)


class PickTests(SynchronousTestCase):
    """
    Picks respect weight 0, health and exclusions, for every algorithm.
    """

    @settings(max_examples=60, deadline=None)
    @given(
        st.lists(_TARGET, max_size=10),
        st.integers(10, 100),
        st.lists(
            st.tuples(st.text(max_size=4), st.booleans(), st.integers(0, 12)),
            min_size=1,
            max_size=8,
        ),
    )
    def test_pick(
        self,
        specs: list[tuple[int, bool, bool]],
        slots: int,
        steps: list[tuple[str, bool, int]],
    ) -> None:
        """
        A pick returns an eligible target (positive weight, available, not
        excluded) when one exists and L{None} only when none does, across a
        sequence of picks with attempts started and finished, and a
        target's health flipped, in between.
        """
        ts = [target(f"10.0.0.{i}:80", w) for i, (w, _, _) in enumerate(specs)]
        exclude = {t.key for t, (_, _, out) in zip(ts, specs, strict=True) if out}
        for name in registry.names():
            health = FakeHealth(
                t.key for t, (_, up, _) in zip(ts, specs, strict=True) if not up
            )
            fields = {"algorithm": name, "slots": slots}
            if name == "consistent-hashing":
                fields |= {"hash_on": "header", "hash_on_header": "x-k"}
            balancer = registry.lookup(name).build(upstream(**fields), ts, health)
            for value, ok, flip in steps:
                eligible = {
                    t.key
                    for t in ts
                    if t.weight > 0
                    and t.key not in exclude
                    and t.key not in health.down
                }
                chosen = balancer.pick(context({"x-k": value}), exclude)
                if not eligible:
                    self.assertIsNone(chosen, name)
                else:
                    assert chosen is not None, name
                    self.assertIn(chosen.key, eligible, name)
                    balancer.started(chosen)
                    if ok:
                        balancer.finished(chosen, 0.01)
                if flip < len(ts):
                    health.down ^= {ts[flip].key}

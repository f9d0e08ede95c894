# -*- test-case-name: tests.test_roundrobin -*-
"""
Smooth weighted round-robin in O(log n) per pick.

nginx's smooth weighted round-robin visits every target on every pick, which
is O(targets).  Earliest-deadline-first scheduling (as Envoy does) gives the
same smooth interleaving from a heap: each target is due again C{1/weight}
after its last turn, so in any window each target's share tracks its
weight, not only on average.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Sequence

import attrs
from twisted.plugin import IPlugin
from zope.interface import implementer

from ..model import Target, Upstream
from .context import PickContext
from .interfaces import IBalancer, IBalancerFactory, IHealthView


@implementer(IBalancer)
class RoundRobinBalancer:
    """
    Weighted round-robin over the targets of positive weight.
    """

    def __init__(self, targets: Sequence[Target], health: IHealthView) -> None:
        self._health = health
        # (deadline, tie-breaker, target); the index keeps ordering total.
        self._heap = [
            (1.0 / t.weight, i, t) for i, t in enumerate(targets) if t.weight > 0
        ]
        heapq.heapify(self._heap)

    def pick(self, context: PickContext, exclude: Collection[str]) -> Target | None:
        heap = self._heap
        skipped = []
        chosen = None
        # Each entry is looked at most once per pick, so a pick with every
        # target unavailable is O(n log n) and ends.
        while heap:
            deadline, index, target = heap[0]
            if target.key not in exclude and self._health.available(target):
                heapq.heapreplace(heap, (deadline + 1.0 / target.weight, index, target))
                chosen = target
                break
            skipped.append(heapq.heappop(heap))
        for deadline, index, target in skipped:
            # A skipped target loses its turn, so it does not burst when back.
            heapq.heappush(heap, (deadline + 1.0 / target.weight, index, target))
        return chosen

    def started(self, target: Target) -> None:
        pass

    def finished(self, target: Target, first_byte: float | None) -> None:
        pass


@implementer(IPlugin, IBalancerFactory)
@attrs.frozen
class RoundRobin:
    """
    The C{round-robin} algorithm (the default).
    """

    name: str = "round-robin"

    def build(
        self, upstream: Upstream, targets: Sequence[Target], health: IHealthView
    ) -> IBalancer:
        return RoundRobinBalancer(targets, health)

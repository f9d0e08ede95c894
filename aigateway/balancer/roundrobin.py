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
import math
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
        # (deadline, index, turns, target).  A deadline is computed afresh as
        # turns / weight rather than summed up from 1 / weight: equal
        # rationals then make equal floats, so ties keep breaking by index
        # and the sequence is exactly periodic, not only on average.
        self._heap = [
            (1 / t.weight, i, 1, t) for i, t in enumerate(targets) if t.weight > 0
        ]
        heapq.heapify(self._heap)

    def pick(self, context: PickContext, exclude: Collection[str]) -> Target | None:
        heap = self._heap
        health = self._health
        tried = []
        skipped = []
        chosen = None
        now = 0.0
        # Each entry is looked at most once per pick, so a pick with every
        # target unavailable is O(n log n) and ends.
        while heap:
            target = heap[0][3]
            if target.key in exclude:
                tried.append(heapq.heappop(heap))
            elif not health.available(target):
                skipped.append(heapq.heappop(heap))
            else:
                chosen = target
                now, index, turns, _ = heap[0]
                if not exclude:
                    turns += 1
                    heapq.heapreplace(
                        heap, (turns / target.weight, index, turns, target)
                    )
                break
        # A retry (something excluded) borrows a turn without taking it, and
        # the target it retries from keeps its place: otherwise a target that
        # refuses every connection would be tried first by every request
        # instead of by its weight's share of them.
        for entry in tried:
            heapq.heappush(heap, entry)
        for _, index, turns, target in skipped:
            # An unavailable target loses its turn, and its place moves to
            # the present (the deadline of the turn taken now), so it does
            # not come back with a burst of the turns it missed: one turn a
            # pick falls behind a lighter target's pace, which is one turn
            # a pick too.
            turns = max(turns + 1, math.floor(now * target.weight) + 1)
            heapq.heappush(heap, (turns / target.weight, index, turns, target))
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

# -*- test-case-name: tests.test_leastconn -*-
"""
Least connections: the target with the fewest attempts in flight for its
weight, in O(log n) per pick.

Scanning every target for the lowest C{active / weight} is O(targets) on
every request.  A heap keyed on C{(active / weight, last pick)} finds it at
the top instead; C{started} and C{finished} change a target's load, and
rather than searching the heap for the target's old entry, they push a new
one and leave the old to be thrown away when it surfaces (each entry carries
the version of the target's state it was made from).  Keying ties on the
last pick makes them round-robin: of equally loaded targets, the one picked
longest ago goes first.

A configuration change builds a new balancer, which takes over the counts
of the one it replaces (L{ISuccessor}): a change of weight must not make
twenty long streams on one target look like none.  Attempts begun on the
replaced balancer still start (retries) and end there; it passes each on to
its successor, so the counts of the balancer in force stay exact.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Sequence

import attrs
from twisted.plugin import IPlugin
from zope.interface import implementer

from ..model import Target, Upstream
from ._eligible import usable
from ._succession import Place, may_succeed, move_places
from .context import PickContext
from .interfaces import IBalancer, IBalancerFactory, IHealthView, ISuccessor


@attrs.define(eq=False)
class _Load:
    """
    The mutable state of one target.

    @ivar owner: the balancer it is the state in.
    @ivar active: attempts begun and not yet finished.
    @ivar picked: the pick counter when this target was last picked.
    @ivar version: bumped on each change; heap entries of an older version
        are stale.
    @ivar place: where the target's state is now (L{Place}): this one,
        unless a balancer that replaced this one took it over.
    """

    index: int
    target: Target
    owner: LeastConnectionsBalancer
    active: int = 0
    picked: int = -1
    version: int = 0
    place: Place = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.place = Place(self)


# (active / weight, last picked, index, version)
_Entry = tuple[float, int, int, int]


@implementer(IBalancer, ISuccessor)
class LeastConnectionsBalancer:
    """
    Picks the target with the lowest C{active / weight}.

    @ivar _succeeded: a balancer took this one over: the attempts that
        start and end here count there (see L{Place}).
    """

    def __init__(self, targets: Sequence[Target], health: IHealthView) -> None:
        self._health = health
        self._loads = [
            _Load(i, t, self) for i, t in enumerate(t for t in targets if t.weight > 0)
        ]
        self._byKey = {load.target.key: load for load in self._loads}
        self._picks = 0
        self._heap: list[_Entry] = []
        self._succeeded = False
        self._rebuild()

    def _rebuild(self) -> None:
        """
        Make the heap anew from the current state, without stale entries.
        """
        self._heap = [self._entry(load) for load in self._loads]
        heapq.heapify(self._heap)

    @staticmethod
    def _entry(load: _Load) -> _Entry:
        return (
            load.active / load.target.weight,
            load.picked,
            load.index,
            load.version,
        )

    def _update(self, load: _Load) -> None:
        """
        Record a change of C{load}'s state by pushing its new entry.
        """
        load.version += 1
        heapq.heappush(self._heap, self._entry(load))
        # Stale entries are dropped as they surface, but a target whose load
        # only goes up never surfaces; rebuilding once the heap holds four
        # entries per target keeps it bounded, at O(1) amortised cost.
        if len(self._heap) > 4 * len(self._loads) + 8:
            self._rebuild()

    def pick(self, context: PickContext, exclude: Collection[str]) -> Target | None:
        heap = self._heap
        loads = self._loads
        skipped = []
        chosen = None
        while heap:
            entry = heap[0]
            load = loads[entry[2]]
            if entry[3] != load.version:
                heapq.heappop(heap)
            elif usable(load.target, exclude, self._health):
                self._picks += 1
                load.picked = self._picks
                load.version += 1
                heapq.heapreplace(heap, self._entry(load))
                chosen = load.target
                break
            else:
                # Kept aside (and put back unchanged) so that each target
                # is looked at once per pick.
                skipped.append(heapq.heappop(heap))
        for entry in skipped:
            heapq.heappush(heap, entry)
        return chosen

    def started(self, target: Target) -> None:
        load = self._byKey.get(target.key)
        if load is not None:
            # (Where the target's state is now: here, or in the balancer
            # that took this one over.)
            load = load.place.state
            load.active += 1
            load.owner._update(load)

    def finished(self, target: Target, first_byte: float | None) -> None:
        load = self._byKey.get(target.key)
        if load is not None:
            load = load.place.state
            # (More ends than starts leave 0.)
            if load.active > 0:
                load.active -= 1
                load.owner._update(load)

    def take_over(self, predecessor: IBalancer) -> bool:
        if not may_succeed(self, predecessor):
            return False
        assert isinstance(predecessor, LeastConnectionsBalancer)
        move_places(self, predecessor, _carry)
        self._picks = max(self._picks, predecessor._picks)
        self._rebuild()
        return True


def _carry(load: _Load, current: _Load) -> None:
    load.active = current.active
    # The order of the last picks too, so ties keep taking turns.
    load.picked = current.picked


@implementer(IPlugin, IBalancerFactory)
@attrs.frozen
class LeastConnections:
    """
    The C{least-connections} algorithm.
    """

    name: str = "least-connections"

    def build(
        self, upstream: Upstream, targets: Sequence[Target], health: IHealthView
    ) -> IBalancer:
        return LeastConnectionsBalancer(targets, health)

# -*- test-case-name: tests.test_latency -*-
"""
Latency-aware balancing: send attempts where the first byte comes soonest.

Each target keeps an exponentially weighted moving average (EWMA) of its
time to first byte.  A pick draws two candidates at random, in proportion
to weight, and takes the one of lower cost, C{ewma * (in flight + 1)}: the
"power of two choices" finds a good target in O(log n) without ranking all
of them, and counting attempts in flight keeps a fast target from being
buried under concurrent requests (the peak-EWMA cost of Finagle and
Linkerd).

Weight decides the draw rather than dividing the cost: when two targets
answer equally fast, the first candidate wins, and it was drawn by weight,
so equal latencies share exactly by weight.  Costs within L{TOLERANCE} of
each other count as equal, so noise does not make traffic flap, and a
target that got fast again, whose average only ever approaches the other's
from above, is given its share back once it is close.

A target that got slow is rarely picked, so nothing would tell us when it
is fast again.  With probability L{EXPLORE} a pick takes the first
candidate without comparing: a slow target still sees about C{EXPLORE *
weight / total weight} of the attempts, and each of them pulls its average
C{DECAY} of the way to the new time.  Recovering from C{slow} to within
L{TOLERANCE} of C{fast} therefore takes about C{log(0.1 * fast / (slow -
fast)) / log(1 - DECAY)} samples (11 for 60 ms back to 10 ms), that is
C{11 * total / (EXPLORE * weight)} picks: 220 for two equal targets.

Candidates are weighed with a look at their health that grants nothing
(L{peek}); only the target picked is asked L{IHealthView.available}, which
may hand it the one trial request of a target that failed.  Asking both
candidates would spend the loser's trial on a request it never gets, and
a target back from an outage would wait cooldown after cooldown.

A configuration change builds a new balancer, which takes over the
averages and in-flight counts of the one it replaces (L{ISuccessor}):
otherwise each change would send attempts to a slow target until it had
measured it again.  Attempts begun on the replaced balancer end there, and
it passes each on to its successor, sample and all.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Collection, Sequence
from itertools import accumulate
from random import Random

import attrs
from twisted.plugin import IPlugin
from zope.interface import implementer

from ..model import Target, Upstream
from ._eligible import peek
from ._succession import Place, may_succeed, move_places
from .context import PickContext
from .interfaces import IBalancer, IBalancerFactory, IHealthView, ISuccessor

#: The weight of a new sample in a target's average.
DECAY = 0.3
#: The chance that a pick explores (takes a random target by weight).
EXPLORE = 0.1
#: Costs within this ratio of each other are equal.
TOLERANCE = 1.1
#: The time to first byte counted for a failed attempt, in seconds, unless
#: twice the slowest success seen is longer: a failure must cost more than
#: any answer.
FAILURE = 1.0
#: The average assumed before any target has answered, in seconds.
_UNKNOWN = 0.001
#: Random draws tried before falling back to listing the eligible targets.
_DRAWS = 3


@attrs.define(eq=False)
class _Stats:
    """
    What is known of one target.

    @ivar owner: the balancer it is known in.
    @ivar ewma: the moving average of its time to first byte, or L{None}
        before its first sample.
    @ivar active: its attempts in flight.
    @ivar place: where what is known of the target is now (L{Place}):
        here, unless a balancer that replaced this one took it over.
    """

    target: Target
    owner: LatencyBalancer
    ewma: float | None = None
    active: int = 0
    place: Place = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.place = Place(self)


@implementer(IBalancer, ISuccessor)
class LatencyBalancer:
    """
    Picks the lower-cost of two targets drawn by weight.

    @ivar _succeeded: a balancer took this one over: the attempts that
        start and end here count there (see L{Place}).
    """

    def __init__(
        self,
        targets: Sequence[Target],
        health: IHealthView,
        random: Random | None = None,
    ) -> None:
        self._health = health
        self._eligible = peek(health)
        self._random = Random() if random is None else random
        self._stats = [_Stats(t, self) for t in targets if t.weight > 0]
        self._byKey = {s.target.key: s for s in self._stats}
        self._cumulative = list(accumulate(s.target.weight for s in self._stats))
        self._total = self._cumulative[-1] if self._cumulative else 0
        # The sum and count of the averages known, for the cost of targets
        # not yet measured: the typical average, neither a magnet nor
        # shunned.
        self._sum = 0.0
        self._measured = 0
        self._slowest = 0.0
        self._succeeded = False

    def pick(self, context: PickContext, exclude: Collection[str]) -> Target | None:
        while True:
            chosen = self._choose(exclude)
            if chosen is None:
                return None
            target = chosen.target
            if self._health.available(target):
                return target
            # Only a view whose look disagrees with its answer gets here;
            # pick again without that target rather than fail the request.
            exclude = {*exclude, target.key}

    def _choose(self, exclude: Collection[str]) -> _Stats | None:
        """
        The lower-cost of two eligible candidates, or one taken without
        comparing when exploring.
        """
        first = self._draw(exclude, None)
        if first is None or self._random.random() < EXPLORE:
            return first
        second = self._draw(exclude, first)
        if second is not None and self._cost(second) * TOLERANCE < self._cost(first):
            return second
        return first

    def _draw(self, exclude: Collection[str], other: _Stats | None) -> _Stats | None:
        """
        A random eligible target other than C{other}, drawn in proportion to
        weight.

        The two candidates must differ: drawing the same target twice
        would hand it the attempt without a comparison, a quarter of the
        attempts for the slower of two targets.
        """
        stats = self._stats
        cumulative = self._cumulative
        eligible = self._eligible
        for _ in range(_DRAWS):
            if not stats:
                return None
            drawn = stats[bisect_right(cumulative, self._random.random() * self._total)]
            target = drawn.target
            if drawn is not other and target.key not in exclude and eligible(target):
                return drawn
        # Most targets are out: draw among those that are not, in O(n).
        candidates = [
            s
            for s in stats
            if s is not other and s.target.key not in exclude and eligible(s.target)
        ]
        if not candidates:
            return None
        weights = [s.target.weight for s in candidates]
        return self._random.choices(candidates, weights)[0]

    def _cost(self, stats: _Stats) -> float:
        ewma = stats.ewma
        if ewma is None:
            ewma = self._sum / self._measured if self._measured else _UNKNOWN
        return ewma * (stats.active + 1)

    def started(self, target: Target) -> None:
        stats = self._byKey.get(target.key)
        if stats is not None:
            # (Where the target is known now: here, or in the balancer that
            # took this one over.)
            stats.place.state.active += 1

    def finished(self, target: Target, first_byte: float | None) -> None:
        stats = self._byKey.get(target.key)
        if stats is None:
            return
        stats = stats.place.state
        balancer = stats.owner
        # (Never below 0, should more end than began.)
        stats.active = max(0, stats.active - 1)
        if first_byte is None:
            sample = max(FAILURE, 2 * balancer._slowest)
        else:
            sample = first_byte
            balancer._slowest = max(balancer._slowest, first_byte)
        old = stats.ewma
        if old is None:
            stats.ewma = sample
            balancer._measured += 1
            balancer._sum += sample
        else:
            stats.ewma = old + DECAY * (sample - old)
            balancer._sum += stats.ewma - old

    def take_over(self, predecessor: IBalancer) -> bool:
        if not may_succeed(self, predecessor):
            return False
        assert isinstance(predecessor, LatencyBalancer)
        move_places(self, predecessor, _carry)
        # The typical average of the targets kept, not of those removed.
        known = [s.ewma for s in self._stats if s.ewma is not None]
        self._measured = len(known)
        self._sum = sum(known)
        self._slowest = max(self._slowest, predecessor._slowest)
        return True


def _carry(stats: _Stats, current: _Stats) -> None:
    stats.ewma = current.ewma
    stats.active = current.active


@implementer(IPlugin, IBalancerFactory)
@attrs.frozen
class Latency:
    """
    The C{latency} algorithm.
    """

    name: str = "latency"

    def build(
        self, upstream: Upstream, targets: Sequence[Target], health: IHealthView
    ) -> IBalancer:
        return LatencyBalancer(targets, health)

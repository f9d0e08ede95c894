"""
Carrying a balancer's per-target state over to the balancer that replaces
it (L{ISuccessor}).

Each target's state lives in one balancer at a time, and a L{Place}, shared
by every balancer that has held that target in one line of succession,
says which: the balancer in force.  An attempt begun on a replaced balancer
(an exchange keeps its own configuration's balancer) starts and ends on the
state its place points to, in one step however many changes it outlived,
and a replaced balancer is held by nothing but the exchanges that still use
it, not by a chain of successors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Place:
    """
    Where one target's state is now: in the balancer in force, or in the
    last one that had the target (a balancer without it took nothing over,
    and one that adds it again starts a new place).

    @ivar state: the state, whose C{owner} is its balancer.
    """

    __slots__ = ("state",)

    def __init__(self, state: Any) -> None:
        self.state = state


def may_succeed(successor: Any, predecessor: Any) -> bool:
    """
    Whether C{successor} may take over C{predecessor}: a balancer of the
    same kind, not taken over yet (its places move to one successor only),
    with at least one of C{successor}'s targets.

    Both keep their per-target state by target key in C{_byKey}, and
    whether they were taken over in C{_succeeded}.
    """
    return (
        type(predecessor) is type(successor)
        and not predecessor._succeeded
        and not predecessor._byKey.keys().isdisjoint(successor._byKey)
    )


def move_places(
    successor: Any, predecessor: Any, carry: Callable[[Any, Any], None]
) -> None:
    """
    Make C{successor} the balancer in force for each target it shares
    with C{predecessor}: its state takes the target's place, after
    C{carry(state, current)} copied what to keep from the state there.
    """
    for key, state in successor._byKey.items():
        old = predecessor._byKey.get(key)
        if old is not None:
            carry(state, old.place.state)
            state.place = old.place
            old.place.state = state
    predecessor._succeeded = True

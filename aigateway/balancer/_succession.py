"""
When a balancer may take over from the one it replaces (L{ISuccessor}).
"""

from __future__ import annotations

from typing import Any


def may_succeed(successor: Any, predecessor: Any) -> bool:
    """
    Whether C{successor} may take over C{predecessor}: a balancer of the
    same kind, not taken over yet (it passes its attempts on to one
    successor only), with at least one of C{successor}'s targets (of the
    two balancers of a backup split, the one with the same targets).

    Both keep their per-target state by target key in C{_byKey}, and
    their successor in C{_successor}.
    """
    return (
        type(predecessor) is type(successor)
        and predecessor._successor is None
        and not predecessor._byKey.keys().isdisjoint(successor._byKey)
    )

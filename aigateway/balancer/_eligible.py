# -*- test-case-name: tests.test_balancer_properties -*-
"""
What "may be picked" means, for every strategy.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from ..model import Target
from .interfaces import IHealthPeek, IHealthView


def usable(target: Target, exclude: Collection[str], health: IHealthView) -> bool:
    """
    Whether C{target} may be picked for this attempt: not yet tried for the
    request, and available on this node.

    Every strategy asks this one question, so what "may be picked" means
    cannot drift between them.  Weight is not asked here: strategies drop
    targets of weight 0 once, when they are built.  A yes may be a trial
    request granted to the caller (L{IHealthView.available}): ask only
    about the target you pick on a yes, and weigh candidates with
    L{peek}.
    """
    return target.key not in exclude and health.available(target)


def peek(health: IHealthView) -> Callable[[Target], bool]:
    """
    How to ask C{health} whether a target could be picked, granting
    nothing: L{IHealthPeek.eligible}, or, for a view without trials (whose
    C{available} grants nothing), C{available} itself.
    """
    if IHealthPeek.providedBy(health):
        return IHealthPeek(health).eligible
    return health.available

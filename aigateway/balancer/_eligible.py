# -*- test-case-name: tests.test_balancer_properties -*-
"""
What "may be picked" means, for every strategy.
"""

from __future__ import annotations

from collections.abc import Collection

from ..model import Target
from .interfaces import IHealthView


def usable(target: Target, exclude: Collection[str], health: IHealthView) -> bool:
    """
    Whether C{target} may be picked for this attempt: not yet tried for the
    request, and available on this node.

    Every strategy asks this one question, so what "may be picked" means
    cannot drift between them.  Weight is not asked here: strategies drop
    targets of weight 0 once, when they are built.
    """
    return target.key not in exclude and health.available(target)

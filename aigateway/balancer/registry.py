# -*- test-case-name: tests.test_balancer_properties -*-
"""
Balancing algorithms by name.

Strategies are found as C{twisted.plugin} drop-ins providing
L{IBalancerFactory} in the L{aigateway.plugins} package, so a third party
adds an algorithm by installing a module there; nothing here lists them.
"""

from __future__ import annotations

from functools import cache

from twisted.plugin import getPlugins

from .interfaces import IBalancerFactory


@cache
def factories() -> dict[str, IBalancerFactory]:
    """
    Every registered algorithm, by name (scanned once per process).
    """
    from .. import plugins

    found: dict[str, IBalancerFactory] = {}
    for factory in getPlugins(IBalancerFactory, plugins):
        found.setdefault(factory.name, factory)
    return found


def names() -> tuple[str, ...]:
    """
    The registered algorithm names, sorted.
    """
    return tuple(sorted(factories()))


def lookup(name: str) -> IBalancerFactory:
    """
    The factory registered as C{name}.

    @raise KeyError: when no algorithm has that name.
    """
    return factories()[name]

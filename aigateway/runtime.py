# -*- test-case-name: tests.test_runtime -*-
"""
What the proxy reads: the current configuration, compiled.

L{Runtime.apply} compiles a new snapshot into a router and per-upstream
balancers and swaps them in with one attribute assignment, so a request
sees either the old configuration or the new one, never a mix.  A balancer
is kept across snapshots while its upstream and targets are unchanged, so
round-robin positions and in-flight counts survive unrelated changes.  When
they change, the new balancer takes over what the old one knew of the
targets it still has, if its strategy can (L{ISuccessor}, by
L{carry_over}): twenty long streams in flight on a target still count after
a change of another target's weight.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs

from .balancer.backup import carry_over
from .balancer.interfaces import IBalancer, IHealthView
from .config import ConfigSnapshot
from .model import Target, Upstream
from .proxy.router import Router
from .records import with_defaults

BalancerBuilder = Callable[[Upstream, "tuple[Target, ...]", IHealthView], IBalancer]


@attrs.frozen
class Compiled:
    """
    One configuration, ready for the hot path.
    """

    snapshot: ConfigSnapshot
    router: Router
    balancers: Mapping[str, IBalancer]
    sources: Mapping[str, tuple[Upstream, tuple[Target, ...]]]


class Runtime:
    """
    The live, swappable configuration of one gateway node.

    @ivar current: the compiled configuration in force.
    """

    def __init__(self, health: Any, build: BalancerBuilder) -> None:
        self.health = health
        self._build = build
        self._observers: list[Callable[[ConfigSnapshot], None]] = []
        self.current = self._compile(ConfigSnapshot.empty(), None)

    def observe(self, observer: Callable[[ConfigSnapshot], None]) -> None:
        """
        Call C{observer} with every snapshot applied from now on.
        """
        self._observers.append(observer)

    @property
    def snapshot(self) -> ConfigSnapshot:
        """
        The configuration in force.
        """
        return self.current.snapshot

    def apply_stored(
        self, version: int, records: Mapping[str, Mapping[str, Mapping[str, Any]]]
    ) -> None:
        """
        Put in force the configuration read from (or just written to) the
        store at C{version}.
        """
        self.apply(ConfigSnapshot.build(version, with_defaults(records)))

    def check(
        self, records: Mapping[str, Mapping[str, Mapping[str, Any]]]
    ) -> ConfigSnapshot:
        """
        Build the snapshot and router C{records} would put in force, and
        put nothing in force: a write calls this before it stores
        anything, so that a record the checks let through but the gateway
        cannot load (a bug) is refused, rather than stored and then
        stopping every node that loads it.

        @return: the snapshot, at version 0, for L{apply_checked} once the
            records are stored.
        @raise Exception: what building them raised.
        """
        snapshot = ConfigSnapshot.build(0, with_defaults(records))
        _router(snapshot)
        return snapshot

    def apply_checked(self, version: int, snapshot: ConfigSnapshot) -> None:
        """
        Put in force a snapshot from L{check}, whose records the store now
        holds at C{version}: they are not built again.
        """
        self.apply(attrs.evolve(snapshot, version=version))

    def apply(self, snapshot: ConfigSnapshot) -> None:
        """
        Put C{snapshot} in force.
        """
        self.health.update(snapshot)
        self.current = self._compile(snapshot, self.current)
        for observer in self._observers:
            observer(snapshot)

    def _compile(self, snapshot: ConfigSnapshot, previous: Compiled | None) -> Compiled:
        balancers: dict[str, IBalancer] = {}
        sources = {}
        replaced: list[tuple[IBalancer, Any, IBalancer, Any]] = []
        for upstream in snapshot.upstreams.values():
            targets = snapshot.targets.get(upstream.id, ())
            source = (upstream, targets)
            sources[upstream.id] = source
            old = None
            if previous is not None and upstream.id in previous.balancers:
                old = previous.balancers[upstream.id]
                if previous.sources[upstream.id] == source:
                    balancers[upstream.id] = old
                    continue
            balancer = self._build(upstream, targets, self.health)
            balancers[upstream.id] = balancer
            if old is not None and previous is not None:
                before = previous.sources[upstream.id][1]
                replaced.append((balancer, targets, old, before))
        compiled = Compiled(
            snapshot=snapshot,
            router=_router(snapshot),
            balancers=balancers,
            sources=sources,
        )
        # Last, once nothing can fail: a replaced balancer passes its
        # attempts on to its successor, which must be the one in force.
        for balancer, targets, old, before in replaced:
            carry_over(balancer, targets, old, before)
        return compiled


def _router(snapshot: ConfigSnapshot) -> Router:
    """
    The router of C{snapshot}.  A disabled service's routes are as if they
    did not exist (Kong's rule): its requests get the proxy's 404.
    """
    return Router(
        snapshot.routes,
        {k: s for k, s in snapshot.services.items() if s.enabled},
    )

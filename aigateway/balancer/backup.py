# -*- test-case-name: tests.test_backup -*-
"""
Backup targets, and the one function the proxy calls to get a balancer.

A backup target receives traffic only while no non-backup target is
available (nginx's C{backup}, Kong Enterprise's C{failover}).  Rather than
teach every strategy about backups, the upstream's algorithm is built twice,
over the primary targets and over the backups, and the backups are asked
only when the primaries have nothing: several backups then share by the
same algorithm, and a third-party strategy gets backups for free.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from zope.interface import implementer

from ..model import Target, Upstream
from . import registry
from .context import PickContext
from .interfaces import IBalancer, IHealthView


@implementer(IBalancer)
class BackupBalancer:
    """
    Picks from C{primary}, and from C{backup} when C{primary} has none.
    """

    def __init__(self, primary: IBalancer, backup: IBalancer) -> None:
        self._primary = primary
        self._backup = backup

    def pick(self, context: PickContext, exclude: Collection[str]) -> Target | None:
        chosen = self._primary.pick(context, exclude)
        if chosen is None:
            chosen = self._backup.pick(context, exclude)
        return chosen

    def started(self, target: Target) -> None:
        (self._backup if target.backup else self._primary).started(target)

    def finished(self, target: Target, first_byte: float | None) -> None:
        (self._backup if target.backup else self._primary).finished(target, first_byte)


def build_balancer(
    upstream: Upstream, targets: Sequence[Target], health: IHealthView
) -> IBalancer:
    """
    The balancer of C{upstream} over C{targets}, by its algorithm, with
    backup targets used only while no other is available.

    Without backups (or with only backups) it is the algorithm's own
    balancer, so the common case pays nothing for the feature.

    @raise KeyError: when no algorithm is registered as
        C{upstream.algorithm}.
    """
    factory = registry.lookup(upstream.algorithm)
    primary = [t for t in targets if not t.backup]
    backup = [t for t in targets if t.backup]
    if not backup or not primary:
        return factory.build(upstream, targets, health)
    return BackupBalancer(
        factory.build(upstream, primary, health),
        factory.build(upstream, backup, health),
    )

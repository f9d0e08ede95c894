# -*- test-case-name: tests.test_backup -*-
"""
Backup targets, and the two functions the runtime calls: one to get a
balancer, one to hand it what the balancer it replaces knew.

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
from .interfaces import IBalancer, IHealthView, ISuccessor


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


def carry_over(
    balancer: IBalancer,
    targets: Sequence[Target],
    replaced: IBalancer,
    replaced_targets: Sequence[Target],
) -> None:
    """
    Let C{balancer}, over C{targets}, start from what C{replaced}, the
    balancer of the same upstream over C{replaced_targets} in the
    configuration before, knew (L{ISuccessor}).

    Either may be split by backup targets, and a change may add the split
    or remove it (the first backup target added, the last removed): the
    part for primary targets takes over the primary part before, and the
    backup part the backup part (a balancer not split is the part of its
    targets' kind).  A target whose C{backup} changed starts afresh in its
    new part, whichever way it went; the others keep what was known.  A
    balancer that does not provide L{ISuccessor}, or of another algorithm,
    starts afresh.
    """
    before = _roles(replaced, replaced_targets)
    for role, part in _roles(balancer, targets).items():
        predecessor = before.get(role)
        if predecessor is not None and ISuccessor.providedBy(part):
            ISuccessor(part).take_over(predecessor)


def _roles(balancer: IBalancer, targets: Sequence[Target]) -> dict[bool, IBalancer]:
    """
    C{balancer}'s parts by whether they balance backup targets.
    """
    if isinstance(balancer, BackupBalancer):
        return {False: balancer._primary, True: balancer._backup}
    # (build_balancer splits nothing when every target is of one kind.)
    return {bool(targets) and all(t.backup for t in targets): balancer}

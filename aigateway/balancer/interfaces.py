# -*- test-case-name: tests.test_balancer_properties -*-
"""
The balancer interfaces.

A balancer is built for one upstream from an immutable list of targets, and
lives until the upstream's configuration changes.  It may keep mutable
per-upstream state (a round-robin position, in-flight counts, latency
averages), but never touches the store or blocks: C{pick} is on the proxy's
hot path.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from ..model import Target, Upstream
    from .context import PickContext


class IHealthView(Interface):
    """
    What a balancer needs to know of target health on this node.
    """

    def available(target: Target) -> bool:
        """
        Whether C{target} may be given traffic now (healthy, or health checks
        off, and not in a rate-limit cooldown).

        A yes may hand out something rationed: the one trial request of a
        target that failed.  So ask only about a target you pick when the
        answer is yes; a strategy that weighs candidates it may then pass
        over asks L{IHealthPeek.eligible} about them first.
        """


class IHealthPeek(IHealthView):
    """
    A health view whose L{IHealthView.available} hands out trials, and which
    can say, granting nothing, what it would answer.
    """

    def eligible(target: Target) -> bool:
        """
        Whether C{available(target)} would say yes now, without granting
        a trial: for candidates that may not be picked.  Until an outcome
        is reported, a yes here stays a yes from C{available}.
        """


class IBalancer(Interface):
    """
    Chooses a target of one upstream for each proxied attempt.
    """

    def pick(context: PickContext, exclude: Collection[str]) -> Target | None:
        """
        Choose a target for one attempt.

        @param context: the request being proxied (headers, client address,
            path, query), for strategies that hash on it.
        @param exclude: the C{key}s of targets already tried for this
            request; they must not be returned.
        @return: an available target of positive weight, or L{None} when no
            target is available.
        """

    def started(target: Target) -> None:
        """
        An attempt on C{target} began (for strategies that count in-flight
        requests).
        """

    def finished(target: Target, first_byte: float | None) -> None:
        """
        An attempt on C{target} ended, after its last byte or with an error.

        @param first_byte: seconds from the attempt's start to the first
            response byte, or L{None} when no response came.
        """


class ISuccessor(Interface):
    """
    A balancer that can carry on from the one it replaces, for strategies
    whose state outlives a configuration change: in-flight counts, latency
    averages.

    Optional: the runtime offers the balancer it replaces to a new balancer
    that provides this, once the new configuration is compiled; any other
    balancer starts fresh.  Attempts begun on the replaced balancer keep
    starting (retries) and ending on it, as an exchange keeps the balancer
    of its configuration; their starts and ends must count in the balancer
    in force, however many changes they outlive, without keeping every
    balancer in between alive (the built-in strategies share a place per
    target between the balancers of one line, L{_succession.Place}).
    """

    def take_over(predecessor: IBalancer) -> bool:
        """
        Start from what C{predecessor} knows of the targets this balancer
        has (those it does not have start fresh), and have it pass on
        C{started} and C{finished} for them from now on.

        A predecessor passes on to one successor only, so it is taken over
        only when nothing took it over yet, it is of this balancer's kind,
        and it has at least one of this balancer's targets.  Of a split by
        backup targets, the runtime offers the primary part the primary
        part before, and the backup part the backup part.

        @return: whether C{predecessor} was taken over.
        """


class IBalancerFactory(Interface):
    """
    A named balancing algorithm, registered as a plugin.
    """

    name = Attribute("The algorithm's name, as given in C{upstream.algorithm}.")

    def build(
        upstream: Upstream, targets: Sequence[Target], health: IHealthView
    ) -> IBalancer:
        """
        Build a balancer over C{targets} (all of the same backup class).
        """

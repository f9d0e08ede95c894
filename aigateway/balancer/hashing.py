# -*- test-case-name: tests.test_hashing -*-
"""
Consistent hashing: requests with the same key (a header, the client
address, a cookie...) go to the same target, and a change of targets moves
as few keys as it can.

The ring
========

Each target owns points on a ring of 64-bit integers; a key goes to the
owner of the first point at or after the key's hash.  A target's points
depend on nothing but its own key, its weight and the upstream's C{slots}:
they are the first C{round(weight * slots / 1000)} 64-bit words of
SHAKE-128 of the target's key (at least 1, at most L{MAX_POINTS}).  So:

  - adding a target only adds points, and the keys that move all move to
    the new target; removing one moves only the keys it owned;
  - changing a target's weight adds or removes points at the end of its own
    stream, so only keys moving to or from that target move;
  - at the default C{slots} (10000) a target of the default weight (100)
    has 1000 points, which keeps each target's share within a few percent
    of its weight share.

Kong instead divides C{slots} among the targets by weight, which makes
every target's points depend on the total weight: one target added or
re-weighted reshuffles keys between all the others.

Targets that may not be picked (unavailable, excluded for this request,
weight 0) are passed over by walking on to the next point of an eligible
target, so their keys, and only theirs, spread over the others while they
are out, and come back when they return.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from array import array
from bisect import bisect_left
from collections.abc import Callable, Collection, Sequence
from random import Random, SystemRandom

import attrs
from twisted.plugin import IPlugin
from zope.interface import implementer

from ..model import Target, Upstream
from ._eligible import usable
from .context import PickContext
from .interfaces import IBalancer, IBalancerFactory, IHealthView
from .roundrobin import RoundRobinBalancer

#: The most points one target gets, whatever its weight: it bounds the
#: memory of a ring (12 bytes a point: the point and its owner's index) to
#: 0.75 MiB a target.  At the default C{slots}, weights above 6553 get no
#: larger share than 6553.
MAX_POINTS = 65536

#: How a request yields the value to hash, or L{None} when it has none.
_Source = Callable[[PickContext], "str | None"]


def points(key: str, weight: int, slots: int) -> tuple[int, ...]:
    """
    The ring points of a target, from its own key and weight only.
    """
    count = min(max(1, round(weight * slots / 1000)), MAX_POINTS)
    stream = hashlib.shake_128(key.encode("utf-8")).digest(8 * count)
    return struct.unpack(f"<{count}Q", stream)


def hashValue(value: str) -> int:
    """
    A stable 64-bit hash of a request's key (unlike L{hash}, the same in
    every process, so all gateway nodes agree).
    """
    digest = hashlib.blake2b(
        value.encode("utf-8", "surrogatepass"), digest_size=8
    ).digest()
    return int.from_bytes(digest, "little")


def _source(
    how: str,
    header: str | None,
    queryArg: str | None,
    capture: str | None,
    cookie: Callable[[PickContext], str] | None,
) -> _Source | None:
    """
    The function reading one C{hash_on} (or C{hash_fallback}) source from a
    request, or L{None} for C{none}.
    """
    if how == "header" and header:
        return lambda context: context.header(header)
    if how == "ip":
        return lambda context: context.client_ip
    if how == "path":
        return lambda context: context.path
    if how == "query_arg" and queryArg:
        return lambda context: context.query_arg(queryArg)
    if how == "uri_capture" and capture:
        return lambda context: context.uri_captures.get(capture)
    if how == "cookie" and cookie is not None:
        return cookie
    return None


@implementer(IBalancer)
class ConsistentHashingBalancer:
    """
    Picks by the hash of a value of the request, on a ring of the targets.

    Requests without a value to hash (C{hash_on} C{none}, or neither the
    primary nor the fallback value present) are balanced round-robin.
    """

    def __init__(
        self,
        upstream: Upstream,
        targets: Sequence[Target],
        health: IHealthView,
        random: Random | None = None,
    ) -> None:
        self._health = health
        self._random = SystemRandom() if random is None else random
        self._cookieName = upstream.hash_on_cookie
        self._cookiePath = upstream.hash_on_cookie_path
        self._primary = _source(
            upstream.hash_on,
            upstream.hash_on_header,
            upstream.hash_on_query_arg,
            upstream.hash_on_uri_capture,
            self._cookie if upstream.hash_on_cookie else None,
        )
        self._fallback = _source(
            upstream.hash_fallback,
            upstream.hash_fallback_header,
            upstream.hash_fallback_query_arg,
            upstream.hash_fallback_uri_capture,
            None,
        )
        self._roundRobin = RoundRobinBalancer(targets, health)
        # Sorted by key so that the rare tie of two targets' points breaks
        # the same way whatever order the targets come in.
        self._targets = sorted((t for t in targets if t.weight > 0), key=_byKey)
        self._points, self._owners = self._ring(upstream.slots)

    def _ring(self, slots: int) -> tuple[array[int], array[int]]:
        """
        Lay out the ring: the sorted points, and the index in
        C{self._targets} of each point's owner.
        """
        shift = max(1, len(self._targets).bit_length())
        # Owner index in the low bits: one sort of plain integers orders the
        # points and breaks ties by owner.
        tagged = [
            point << shift | index
            for index, target in enumerate(self._targets)
            for point in points(target.key, target.weight, slots)
        ]
        tagged.sort()
        mask = (1 << shift) - 1
        return (
            array("Q", [entry >> shift for entry in tagged]),
            array("I", [entry & mask for entry in tagged]),
        )

    def _cookie(self, context: PickContext) -> str:
        """
        The hash cookie's value; for a client without one, a new random
        value, which the proxy sets on the response so the client sticks
        from its next request.  A retry of the same request reuses it.
        """
        name = self._cookieName
        assert name is not None
        value = context.cookie(name)
        if value:
            return value
        if context.set_cookie is not None and context.set_cookie[0] == name:
            return context.set_cookie[1]
        value = uuid.UUID(int=self._random.getrandbits(128), version=4).hex
        context.set_cookie = (name, value, self._cookiePath)
        return value

    def pick(self, context: PickContext, exclude: Collection[str]) -> Target | None:
        value = self._primary(context) if self._primary is not None else None
        if not value and self._fallback is not None:
            value = self._fallback(context)
        if not value:
            return self._roundRobin.pick(context, exclude)
        return self._walk(hashValue(value), exclude)

    def _walk(self, key: int, exclude: Collection[str]) -> Target | None:
        """
        The owner of the first point at or after C{key} that may be picked.
        """
        owners = self._owners
        size = len(owners)
        if not size:
            return None
        targets = self._targets
        health = self._health
        position = bisect_left(self._points, key)
        owner = owners[position % size]
        if usable(targets[owner], exclude, health):
            return targets[owner]
        # Ask about each target once; give up when all have said no.
        rejected = {owner}
        for step in range(1, size):
            owner = owners[(position + step) % size]
            if owner in rejected:
                continue
            if usable(targets[owner], exclude, health):
                return targets[owner]
            rejected.add(owner)
            if len(rejected) == len(targets):
                break
        return None

    def started(self, target: Target) -> None:
        pass

    def finished(self, target: Target, first_byte: float | None) -> None:
        pass


def _byKey(target: Target) -> str:
    return target.key


@implementer(IPlugin, IBalancerFactory)
@attrs.frozen
class ConsistentHashing:
    """
    The C{consistent-hashing} algorithm.
    """

    name: str = "consistent-hashing"

    def build(
        self, upstream: Upstream, targets: Sequence[Target], health: IHealthView
    ) -> IBalancer:
        return ConsistentHashingBalancer(upstream, targets, health)

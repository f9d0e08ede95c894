"""
Tests for L{aigateway.balancer.hashing}.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from random import Random
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from aigateway.balancer.context import PickContext
from aigateway.balancer.hashing import (
    MAX_POINTS,
    ConsistentHashing,
    ConsistentHashingBalancer,
    points,
)
from aigateway.model import Target

from .balancing import FakeHealth, context, target, targets, upstream

_IDS = [f"user-{i}" for i in range(10000)]


def _balancer(
    ts: list[Target], *, health: FakeHealth | None = None, **fields: Any
) -> ConsistentHashingBalancer:
    fields.setdefault("hash_on", "header")
    if fields["hash_on"] == "header":
        fields.setdefault("hash_on_header", "x-user")
    return ConsistentHashingBalancer(
        upstream(algorithm="consistent-hashing", **fields),
        ts,
        health or FakeHealth(),
        Random(7),
    )


def _owners(
    balancer: ConsistentHashingBalancer, exclude: tuple[str, ...] = ()
) -> dict[str, str]:
    """
    The key of the target each id in L{_IDS} goes to, by id.
    """
    owners = {}
    for id in _IDS:
        chosen = balancer.pick(context({"x-user": id}), exclude)
        assert chosen is not None
        owners[id] = chosen.key
    return owners


class RingTests(SynchronousTestCase):
    """
    The ring spreads ids by weight and moves few of them when targets change.
    """

    def test_factory(self) -> None:
        """
        The factory is named C{consistent-hashing}.
        """
        factory = ConsistentHashing()
        self.assertEqual(factory.name, "consistent-hashing")
        built = factory.build(upstream(hash_on="ip"), targets(100), FakeHealth())
        self.assertIsInstance(built, ConsistentHashingBalancer)

    def test_points(self) -> None:
        """
        A target's points depend on its key and weight only; a heavier
        weight extends the same points; there is at least one and at most
        L{MAX_POINTS}.
        """
        self.assertEqual(len(points("a:1", 100, 10000)), 1000)
        self.assertEqual(points("a:1", 100, 10000)[:500], points("a:1", 50, 10000))
        self.assertNotEqual(points("a:1", 100, 10000), points("b:1", 100, 10000))
        self.assertEqual(len(points("a:1", 1, 10)), 1)
        self.assertEqual(len(points("a:1", 65535, 65536)), MAX_POINTS)

    def test_sticky(self) -> None:
        """
        The same id goes to the same target, whatever the target order.
        """
        ts = targets(100, 100, 100, 100)
        self.assertEqual(_owners(_balancer(ts)), _owners(_balancer(ts[::-1])))
        balancer = _balancer(ts)
        picks = {balancer.pick(context({"x-user": "alice"}), ()) for _ in range(20)}
        self.assertEqual(len(picks), 1)

    def test_spread(self) -> None:
        """
        10,000 ids spread over four equal targets within 5% of each one's
        share, and over unequal ones within 10% (a share of 1/6 is 1,667
        ids, whose sampling noise alone is over 2%).
        """
        for weights, within in [((100, 100, 100, 100), 0.05), ((100, 200, 300), 0.1)]:
            ts = targets(*weights)
            counts = Counter(_owners(_balancer(ts)).values())
            for t in ts:
                share = len(_IDS) * t.weight / sum(weights)
                self.assertLess(abs(counts[t.key] - share), within * share, weights)

    def test_add(self) -> None:
        """
        Adding a fifth target to four of equal weight moves at most 28% of
        the ids, all of them to the new target.
        """
        ts = targets(100, 100, 100, 100, 100)
        before = _owners(_balancer(ts[:4]))
        after = _owners(_balancer(ts))
        moved = {id for id in _IDS if before[id] != after[id]}
        self.assertLessEqual(len(moved), 0.28 * len(_IDS))
        self.assertEqual({after[id] for id in moved}, {ts[4].key})

    def test_remove(self) -> None:
        """
        Removing a target moves only the ids it had.
        """
        ts = targets(100, 100, 100, 100)
        before = _owners(_balancer(ts))
        after = _owners(_balancer(ts[:2] + ts[3:]))
        moved = {id for id in _IDS if before[id] != after[id]}
        self.assertEqual(moved, {id for id in _IDS if before[id] == ts[2].key})

    def test_reweight(self) -> None:
        """
        Raising one target's weight moves ids only to that target.
        """
        ts = targets(100, 100, 100)
        before = _owners(_balancer(ts))
        after = _owners(_balancer([*ts[:2], target(ts[2].key, 200)]))
        moved = {id for id in _IDS if before[id] != after[id]}
        self.assertTrue(moved)
        self.assertEqual({after[id] for id in moved}, {ts[2].key})

    def test_unavailable(self) -> None:
        """
        While a target is unavailable or excluded, only its ids move, and
        they come back when it does; a weight-0 target owns nothing.
        """
        ts = targets(100, 100, 100, 0)
        health = FakeHealth()
        balancer = _balancer(ts, health=health)
        before = _owners(balancer)
        self.assertNotIn(ts[3].key, before.values())
        for exclude, down in [((ts[1].key,), []), ((), [ts[1].key])]:
            health.down = set(down)
            during = _owners(balancer, exclude)
            moved = {id for id in _IDS if before[id] != during[id]}
            self.assertEqual(moved, {id for id in _IDS if before[id] == ts[1].key})
        health.down.clear()
        self.assertEqual(_owners(balancer), before)

    def test_none_available(self) -> None:
        """
        With no target to pick, a pick is L{None}.
        """
        ts = targets(100, 100)
        balancer = _balancer(ts, health=FakeHealth([ts[0].key]))
        self.assertIsNone(balancer.pick(context({"x-user": "a"}), [ts[1].key]))
        self.assertIsNone(_balancer([]).pick(context({"x-user": "a"}), ()))
        self.assertIsNone(_balancer(targets(0)).pick(context({"x-user": "a"}), ()))


class SourceTests(SynchronousTestCase):
    """
    Each C{hash_on} source decides the target, with C{hash_fallback} for
    requests without the primary value.
    """

    def assertSticky(
        self, balancer: ConsistentHashingBalancer, same: Any, other: Any
    ) -> None:
        """
        Requests made by C{same(i)} for the same C{i} go to one target, and
        those made by C{other(i)} are spread: the source is what decides.
        """
        for i in range(20):
            picked = {balancer.pick(same(i), ()) for _ in range(5)}
            self.assertEqual(len(picked), 1)
        spread = {balancer.pick(other(i), ()) for i in range(50)}
        self.assertGreater(len(spread), 1)

    def test_header(self) -> None:
        """
        C{hash_on=header} hashes on the named header.
        """
        balancer = _balancer(targets(100, 100, 100), hash_on_header="x-tenant")
        self.assertSticky(
            balancer,
            lambda i: context({"x-tenant": f"t{i}", "x-other": "z"}),
            lambda i: context({"x-tenant": f"t{i}"}),
        )

    def test_ip(self) -> None:
        """
        C{hash_on=ip} hashes on the client address.
        """
        balancer = _balancer(targets(100, 100, 100), hash_on="ip")
        self.assertSticky(
            balancer,
            lambda i: context(client_ip=f"10.1.0.{i}", path=f"/{i * 7}"),
            lambda i: context(client_ip=f"10.1.0.{i}"),
        )

    def test_path(self) -> None:
        """
        C{hash_on=path} hashes on the request path.
        """
        balancer = _balancer(targets(100, 100, 100), hash_on="path")
        self.assertSticky(
            balancer,
            lambda i: context(path=f"/v1/{i}"),
            lambda i: context(path=f"/v1/{i}", client_ip="1.2.3.4"),
        )

    def test_query_arg(self) -> None:
        """
        C{hash_on=query_arg} hashes on the named query argument.
        """
        balancer = _balancer(
            targets(100, 100, 100), hash_on="query_arg", hash_on_query_arg="s"
        )
        self.assertSticky(
            balancer,
            lambda i: context(query=f"s={i}&x=1".encode()),
            lambda i: context(query=f"x=1&s={i}".encode()),
        )

    def test_uri_capture(self) -> None:
        """
        C{hash_on=uri_capture} hashes on the named capture of the route.
        """
        balancer = _balancer(
            targets(100, 100, 100), hash_on="uri_capture", hash_on_uri_capture="m"
        )
        self.assertSticky(
            balancer,
            lambda i: context(uri_captures={"m": f"model-{i}"}),
            lambda i: context(uri_captures={"m": f"model-{i}", "n": "1"}),
        )

    def test_cookie(self) -> None:
        """
        C{hash_on=cookie} hashes on the named cookie; a client without it
        gets a generated one, set on the context for the proxy to send, and
        is sent where that value hashes, as it will be on its next request.
        """
        balancer = _balancer(
            targets(100, 100, 100),
            hash_on="cookie",
            hash_on_cookie="sticky",
            hash_on_cookie_path="/api",
        )
        self.assertSticky(
            balancer,
            lambda i: context({"cookie": f"a=1; sticky=v{i}"}),
            lambda i: context({"cookie": f"sticky=v{i}"}),
        )
        first = context({"cookie": "a=1"})
        chosen = balancer.pick(first, ())
        assert first.set_cookie is not None
        name, value, path = first.set_cookie
        self.assertEqual((name, path, len(value)), ("sticky", "/api", 32))
        # A retry of the same request keeps the value, and walks on.
        assert chosen is not None
        retried = balancer.pick(first, [chosen.key])
        self.assertEqual(first.set_cookie, (name, value, path))
        self.assertNotEqual(retried, chosen)
        later = context({"cookie": f"sticky={value}"})
        self.assertEqual(balancer.pick(later, ()), chosen)
        self.assertIsNone(later.set_cookie)

    def test_fallback(self) -> None:
        """
        Requests without the primary value hash on C{hash_fallback}; with
        neither, they are balanced round-robin.
        """
        ts = targets(100, 100, 100)
        balancer = _balancer(
            ts,
            hash_on_header="x-user",
            hash_fallback="query_arg",
            hash_fallback_query_arg="u",
        )
        for i in range(20):
            self.assertEqual(
                balancer.pick(context(query=f"u=a{i}".encode()), ()),
                balancer.pick(context({"x-user": f"a{i}"}), ()),
            )
        keys = [balancer.pick(context(), ()) for _ in range(6)]
        self.assertEqual(Counter(keys), {t: 2 for t in ts})

    def test_fallback_sources(self) -> None:
        """
        C{hash_fallback} reads its own header and URI capture fields.
        """
        ts = targets(100, 100, 100)
        cases: list[tuple[dict[str, Any], Callable[[str], PickContext]]] = [
            (
                {"hash_fallback": "header", "hash_fallback_header": "x-b"},
                lambda v: context({"x-b": v}),
            ),
            (
                {"hash_fallback": "uri_capture", "hash_fallback_uri_capture": "c"},
                lambda v: context(uri_captures={"c": v}),
            ),
            ({"hash_fallback": "ip"}, lambda v: context(client_ip=v)),
            ({"hash_fallback": "path"}, lambda v: context(path=v)),
        ]
        for fields, make in cases:
            balancer = _balancer(ts, **fields)
            for i in range(10):
                self.assertEqual(
                    balancer.pick(make(f"v{i}"), ()),
                    balancer.pick(context({"x-user": f"v{i}"}), ()),
                )

    def test_none(self) -> None:
        """
        C{hash_on=none} balances round-robin.
        """
        ts = targets(100, 100)
        balancer = _balancer(ts, hash_on="none")
        keys = [balancer.pick(context({"x-user": "a"}), ()) for _ in range(4)]
        self.assertEqual(keys, [ts[0], ts[1]] * 2)

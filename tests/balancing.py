"""
Values and fakes for balancer tests: upstreams built through the real schema
(so defaults match what the Admin API stores), targets, and a health view
that a test flips by hand.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from twisted.web.http_headers import Headers
from zope.interface import implementer

from aigateway.balancer.context import PickContext
from aigateway.balancer.interfaces import IBalancer, IHealthView
from aigateway.model import Target, Upstream
from aigateway.records import build_record


def upstream(**fields: Any) -> Upstream:
    """
    An upstream with the schema's defaults and C{fields} over them.
    """
    fields.setdefault("name", "u")
    record, errors = build_record("upstreams", fields, False)
    assert not errors, errors
    return Upstream.from_record(record | {"id": "u1"})


def target(key: str, weight: int = 100, backup: bool = False) -> Target:
    """
    A target of upstream C{u1} named C{key} (C{host:port}).
    """
    host, _, port = key.rpartition(":")
    return Target(
        id="t-" + key,
        upstream_id="u1",
        key=key,
        host=host,
        port=int(port),
        weight=weight,
        backup=backup,
    )


def targets(*weights: int, backup: bool = False) -> list[Target]:
    """
    One target per weight, named C{10.0.0.N:80} (backups on port 81).
    """
    port = 81 if backup else 80
    return [target(f"10.0.0.{i}:{port}", w, backup) for i, w in enumerate(weights)]


@implementer(IHealthView)
class FakeHealth:
    """
    A health view where every target is available except those marked down.
    """

    def __init__(self, down: Iterable[str] = ()) -> None:
        self.down = set(down)

    def available(self, target: Target) -> bool:
        return target.key not in self.down


def context(
    headers: dict[str, str] | None = None,
    client_ip: str = "",
    path: str = "/",
    query: bytes = b"",
    uri_captures: dict[str, str] | None = None,
) -> PickContext:
    """
    A request view with the given parts.
    """
    raw = Headers()
    for name, value in (headers or {}).items():
        raw.addRawHeader(name, value)
    return PickContext(
        headers=raw,
        client_ip=client_ip,
        path=path,
        query=query,
        uri_captures=uri_captures or {},
    )


def pick_keys(
    balancer: IBalancer, count: int, exclude: Sequence[str] = ()
) -> list[str | None]:
    """
    The keys of C{count} successive picks (L{None} for no target).
    """
    ctx = PickContext()
    picked = [balancer.pick(ctx, exclude) for _ in range(count)]
    return [t.key if t is not None else None for t in picked]

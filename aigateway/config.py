# -*- test-case-name: tests.test_runtime -*-
"""
The immutable configuration snapshot.

The Admin API never edits live configuration: it builds a new
L{ConfigSnapshot} from the records it just stored and swaps it in whole, so
a proxied request sees one consistent configuration from routing to
forwarding, and the hot path reads plain attributes without locks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from .cacerts import service_trusts
from .model import Route, Service, Target, Upstream

KINDS = ("upstreams", "targets", "services", "routes", "ca_certificates")
Records = Mapping[str, Mapping[str, Mapping[str, Any]]]


def empty_records() -> dict[str, dict[str, dict[str, Any]]]:
    """
    Records of an empty configuration, one dict by id per kind.
    """
    return {kind: {} for kind in KINDS}


@attrs.frozen
class ConfigSnapshot:
    """
    Every entity at one configuration version, indexed for the hot path.

    @ivar records: the Admin API's records by kind and id; never mutated.
    @ivar upstreams: upstream values by name.
    @ivar targets: each upstream's targets (weight 0 included) by upstream id.
    """

    version: int
    records: Records
    upstreams: Mapping[str, Upstream]
    upstreams_by_id: Mapping[str, Upstream]
    targets: Mapping[str, tuple[Target, ...]]
    services: Mapping[str, Service]
    routes: tuple[Route, ...]

    @classmethod
    def build(cls, version: int, records: Records) -> ConfigSnapshot:
        """
        Index C{records} into a snapshot.
        """
        upstreams = [Upstream.from_record(r) for r in records["upstreams"].values()]
        # Trust roots are made here, once per snapshot, so a request only
        # reads one off its service.  (Records from before CA
        # certificates existed have none.)
        trusts = service_trusts(
            records["services"].values(), records.get("ca_certificates", {})
        )
        targets: dict[str, list[Target]] = {u.id: [] for u in upstreams}
        for rec in records["targets"].values():
            target = Target.from_record(rec)
            targets.setdefault(target.upstream_id, []).append(target)
        return cls(
            version=version,
            records=records,
            upstreams={u.name: u for u in upstreams},
            upstreams_by_id={u.id: u for u in upstreams},
            targets={
                uid: tuple(sorted(ts, key=lambda t: t.key))
                for uid, ts in targets.items()
            },
            services={
                sid: Service.from_record(r, trusts.get(sid))
                for sid, r in records["services"].items()
            },
            routes=tuple(Route.from_record(r) for r in records["routes"].values()),
        )

    @classmethod
    def empty(cls) -> ConfigSnapshot:
        """
        A snapshot with nothing configured.
        """
        return cls.build(0, empty_records())

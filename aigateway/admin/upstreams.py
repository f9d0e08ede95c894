# -*- test-case-name: tests.test_admin -*-
"""
C{/upstreams}, their C{/targets}, and target health on this node.
"""

from __future__ import annotations

from typing import Any

from klein import Klein
from twisted.web.iweb import IRequest

from ..declarative import mask
from ..health.config import Healthchecks
from ..model import Target
from .app import crud, endpoint, paginate
from .entities import Entities, Record


def show_target(record: Record) -> Record:
    """
    A target as the API shows it: header values (credentials) masked.
    """
    headers = record.get("headers") or {}
    if not headers:
        return record
    return {**record, "headers": {k: mask(v) for k, v in headers.items()}}


def register(app: Klein, entities: Entities, health: Any, node_id: str) -> None:
    """
    Add the upstream and target endpoints to C{app}.
    """

    def upstream_id(kwargs: dict[str, Any]) -> str:
        return str(entities.find("upstreams", kwargs["u"])["id"])

    crud(app, entities, "upstreams", "/upstreams", "/upstreams/<ref>")
    crud(
        app,
        entities,
        "targets",
        "/upstreams/<u>/targets",
        "/upstreams/<u>/targets/<ref>",
        parent=upstream_id,
        show=show_target,
        listed=lambda record: record["weight"] > 0,
        post_updates=True,
    )

    @app.route("/upstreams/<u>/targets/all", methods=["GET"])
    @endpoint
    async def all_targets(request: IRequest, u: str) -> Any:
        owner = upstream_id({"u": u})
        return paginate(
            request, [show_target(r) for r in entities.list("targets", owner)]
        )

    def set_health(healthy: bool) -> Any:
        async def handler(request: IRequest, u: str, ref: str) -> Any:
            record = entities.find("targets", ref, upstream_id({"u": u}))
            health.set_manual(Target.from_record(record), healthy)
            return 204, None

        return endpoint(handler)

    for state, healthy in (("healthy", True), ("unhealthy", False)):
        app.route(
            f"/upstreams/<u>/targets/<ref>/{state}",
            methods=["PUT", "POST"],
            endpoint=f"target:{state}",
        )(set_health(healthy))

    @app.route("/upstreams/<u>/health", methods=["GET"])
    @endpoint
    async def upstream_health(request: IRequest, u: str) -> Any:
        upstream = entities.find("upstreams", u)
        targets = [
            Target.from_record(r)
            for r in entities.list("targets", upstream["id"])
            if r["weight"] > 0
        ]
        if request.args.get(b"balancer_health", [b"0"])[0] in (b"1", b"true"):
            return {
                "node_id": node_id,
                "data": _balancer_health(upstream, targets, health),
            }
        rows = []
        records = entities.snapshot.records["targets"]
        for target in targets:
            described = health.describe(target)
            state = described["health"]
            available = target.weight if health.is_available(target) else 0
            rows.append(
                {
                    **show_target(dict(records[target.id])),
                    **described,
                    "data": {
                        "host": target.host,
                        "port": target.port,
                        "weight": {
                            "total": target.weight,
                            "available": available,
                            "unavailable": target.weight - available,
                        },
                        # One per IP its name resolved to, as Kong lists
                        # them (each with the target's weight, as Kong gives
                        # an A record's); none before the name was looked
                        # up or when it did not resolve.
                        "addresses": [
                            {
                                "ip": ip,
                                "port": target.port,
                                "weight": target.weight,
                                "health": state,
                            }
                            for ip in health.addresses(target)
                        ],
                    },
                }
            )
        page = paginate(request, rows)
        return {"node_id": node_id, **page}


def _balancer_health(upstream: Record, targets: list[Target], health: Any) -> Record:
    """
    C{?balancer_health=1}: the upstream's health, and whether its available
    weight exceeds its threshold.

    Targets whose names are not looked up yet (C{DNS_PENDING}) are never
    available weight, checks on or off: nobody knows the names resolve.
    With checks off they count as C{HEALTHCHECKS_OFF} for the upstream's
    health, as they take traffic unchecked as much as resolved ones: else
    an upstream without checks would be C{UNHEALTHY} after every restart
    (and with every new name) until its lookups answer, its traffic
    flowing.  With checks on a pending target stands for a C{HEALTHY} one
    whose addresses nobody has seen: the upstream is C{UNHEALTHY} unless
    another target is available, as its threshold is reckoned.
    """
    total = sum(t.weight for t in targets)
    available = sum(t.weight for t in targets if health.is_available(t))
    states = {health.describe(t)["health"] for t in targets}
    if not Healthchecks.from_record(upstream["healthchecks"]).enabled:
        states = {"HEALTHCHECKS_OFF" if s == "DNS_PENDING" else s for s in states}
    if states == {"HEALTHCHECKS_OFF"}:
        overall = "HEALTHCHECKS_OFF"
    else:
        overall = "HEALTHY" if available > 0 else "UNHEALTHY"
    threshold = upstream["healthchecks"]["threshold"]
    share = 100.0 * available / total if total else 0.0
    balancer = "HEALTHY" if total and share > threshold else "UNHEALTHY"
    if overall == "HEALTHCHECKS_OFF":
        balancer = "HEALTHCHECKS_OFF" if total else "UNHEALTHY"
    return {
        "id": upstream["id"],
        "health": overall,
        "balancer_health": balancer,
        "details": {
            "weight": {
                "total": total,
                "available": available,
                "unavailable": total - available,
            },
            "threshold": threshold,
        },
    }

# -*- test-case-name: tests.test_runtime -*-
"""
The configuration values the proxy reads.

An entity lives in two forms.  Its I{record} (L{aigateway.records}) is the
JSON-able dict the Admin API returns and the store keeps.  Its I{value}
(L{Upstream}, L{Target}, L{Service}, L{Route}) is the frozen attrs object
built from a record for a L{aigateway.config.ConfigSnapshot}, holding only
what the hot path needs, already parsed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from .addresses import parse_target
from .cacerts import CATrust
from .health.config import Healthchecks


@attrs.frozen
class Upstream:
    """
    A named group of targets with a balancing algorithm.
    """

    id: str
    name: str
    algorithm: str
    hash_on: str
    hash_fallback: str
    hash_on_header: str | None
    hash_fallback_header: str | None
    hash_on_cookie: str | None
    hash_on_cookie_path: str
    hash_on_query_arg: str | None
    hash_fallback_query_arg: str | None
    hash_on_uri_capture: str | None
    hash_fallback_uri_capture: str | None
    slots: int
    host_header: str | None
    healthchecks: Healthchecks

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> Upstream:
        """
        Build from a stored record.
        """
        fields = {f.name for f in attrs.fields(cls)} - {"healthchecks"}
        return cls(
            healthchecks=Healthchecks.from_record(rec["healthchecks"]),
            **{k: rec[k] for k in fields},
        )


@attrs.frozen
class Target:
    """
    One C{host:port} of an upstream.

    @ivar key: C{host:port}, the target's identity within its upstream.
    @ivar headers: request headers added for this target (its credentials).
    """

    id: str
    upstream_id: str
    key: str
    host: str
    port: int
    weight: int
    backup: bool = False
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> Target:
        """
        Build from a stored record.
        """
        parsed = parse_target(rec["target"])
        assert parsed is not None
        return cls(
            id=rec["id"],
            upstream_id=rec["upstream"]["id"],
            key=rec["target"],
            host=parsed[0],
            port=parsed[1],
            weight=rec["weight"],
            backup=rec["backup"],
            headers=tuple(sorted(rec["headers"].items())),
        )


@attrs.frozen
class Service:
    """
    Where matched requests go: an upstream by name, or a plain host.

    @ivar ca_trust: the CAs its C{https} targets are verified against,
        instead of the system's (its C{ca_certificates}); L{None} for the
        system's, or when nothing is verified.
    """

    id: str
    name: str | None
    protocol: str
    host: str
    port: int
    path: str | None
    retries: int
    connect_timeout: float
    write_timeout: float
    read_timeout: float
    retry_on_statuses: frozenset[int]
    enabled: bool = True
    tls_verify: bool = True
    ca_trust: CATrust | None = None

    @classmethod
    def from_record(
        cls, rec: Mapping[str, Any], ca_trust: CATrust | None = None
    ) -> Service:
        """
        Build from a stored record; timeouts become seconds.

        @param ca_trust: its CA certificates, made for the snapshot (see
            L{aigateway.cacerts.service_trusts}).
        """
        return cls(
            id=rec["id"],
            name=rec["name"],
            protocol=rec["protocol"],
            host=rec["host"],
            port=rec["port"],
            path=rec["path"],
            retries=rec["retries"],
            connect_timeout=rec["connect_timeout"] / 1000,
            write_timeout=rec["write_timeout"] / 1000,
            read_timeout=rec["read_timeout"] / 1000,
            retry_on_statuses=frozenset(rec["retry_on_statuses"]),
            enabled=rec.get("enabled", True),
            tls_verify=rec.get("tls_verify", True),
            ca_trust=ca_trust,
        )


@attrs.frozen
class Route:
    """
    Which requests go to a service.
    """

    id: str
    name: str | None
    service_id: str
    paths: tuple[str, ...]
    hosts: tuple[str, ...]
    methods: frozenset[str]
    models: frozenset[str]
    strip_path: bool
    preserve_host: bool
    regex_priority: int
    #: The route's C{protocols} leave out C{http}: plain requests get 426.
    https_only: bool = False

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> Route:
        """
        Build from a stored record.
        """
        return cls(
            id=rec["id"],
            name=rec["name"],
            service_id=rec["service"]["id"],
            paths=tuple(rec["paths"] or ()),
            hosts=tuple(h.lower() for h in rec["hosts"] or ()),
            methods=frozenset(rec["methods"] or ()),
            models=frozenset(rec["models"] or ()),
            strip_path=rec["strip_path"],
            preserve_host=rec["preserve_host"],
            regex_priority=rec["regex_priority"],
            https_only="http" not in (rec.get("protocols") or ("http",)),
        )

# -*- test-case-name: tests.test_model -*-
"""
The configuration entities: their Admin API schemas, the cross-field rules
Kong applies, and the frozen values the proxy reads.

An entity lives in two forms.  Its I{record} is the JSON-able dict the Admin
API returns and the store keeps (every field, defaults filled in).  Its
I{value} (L{Upstream}, L{Target}, L{Service}, L{Route}) is the frozen attrs
object built from a record for a L{aigateway.config.ConfigSnapshot}, holding
only what the hot path needs, already parsed.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import attrs

from .balancer import registry
from .health.config import SCHEMA as HEALTHCHECKS
from .health.config import Healthchecks
from .schema import REQUIRED, Errors, Field, absolute_path, validate

MAX_INT = 2147483646
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)"
    r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)*\.?$"
)
_NAME = re.compile(r"^[A-Za-z0-9.\-_~]+$")
_HASH_ON = ("none", "header", "ip", "cookie", "path", "query_arg", "uri_capture")
_TAGS = Field("array", default=None, elements=Field("string"), unique=True)


def _name(value: str) -> str | None:
    if not _NAME.match(value):
        return (
            f"invalid value '{value}': it must only contain alphanumerics "
            "and '.', '-', '_', '~'"
        )
    return None


def _host(value: str) -> str | None:
    return None if _valid_host(value) else "invalid value: " + value


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return bool(_HOSTNAME.match(host))


def parse_target(value: str) -> tuple[str, int] | None:
    """
    Split a target string into host and port, as Kong accepts it:
    C{host}, C{host:port}, C{a.b.c.d:port}, C{[v6]:port} or a bare IPv6
    address; the port defaults to 8000.

    @return: C{(host, port)}, or L{None} when the string is not a target.
    """
    host, port = value, "8000"
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        host, rest = value[1:end], value[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                return None
            port = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return None
    elif value.count(":") == 1:
        host, port = value.split(":")
    elif value.count(":") > 1:
        try:
            ipaddress.IPv6Address(value)
        except ValueError:
            return None
    if not port.isdigit() or not 0 < int(port) < 65536 or not _valid_host(host):
        return None
    return host, int(port)


def format_target(host: str, port: int) -> str:
    """
    The canonical C{host:port} form of a target (IPv6 in brackets).
    """
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def host_header(host: str, port: int, scheme: str) -> str:
    """
    The C{Host} header for C{host} on C{port}: the port is left out when it
    is the scheme's default, as clients do (RFC 9110, section 7.2).
    """
    if ":" in host:
        host = f"[{host}]"
    if (scheme, port) in (("http", 80), ("https", 443)):
        return host
    return f"{host}:{port}"


def _target(value: str) -> str | None:
    return (
        None
        if parse_target(value)
        else "Invalid target; not a valid hostname or ip address"
    )


def _path(value: str) -> str | None:
    if value.startswith("~"):
        try:
            re.compile(route_regex(value))
        except re.error as e:
            return f"invalid regex: '{value[1:]}' ({e})"
        return None
    if not value.startswith("/"):
        return "should start with: / (fixed path) or ~/ (regex path)"
    return None


def route_regex(path: str) -> str:
    """
    Kong's (PCRE) regex path syntax, C{~/v1/(?<model>[^/]+)}, in Python's.
    """
    return (
        path[1:]
        .replace("(?<", "(?P<")
        .replace("(?P<=", "(?<=")
        .replace("(?P<!", "(?<!")
    )


UPSTREAM = {
    "id": Field("string"),
    "name": Field("string", default=REQUIRED, check=_name),
    "algorithm": Field("string", default="round-robin", one_of=registry.names),
    "hash_on": Field("string", default="none", one_of=_HASH_ON),
    "hash_fallback": Field("string", default="none", one_of=_HASH_ON),
    "hash_on_header": Field("string"),
    "hash_fallback_header": Field("string"),
    "hash_on_cookie": Field("string"),
    "hash_on_cookie_path": Field(
        "string",
        default="/",
        check=absolute_path,
    ),
    "hash_on_query_arg": Field("string"),
    "hash_fallback_query_arg": Field("string"),
    "hash_on_uri_capture": Field("string"),
    "hash_fallback_uri_capture": Field("string"),
    "slots": Field("integer", default=10000, between=(10, 65536)),
    "host_header": Field("string", check=_host),
    "healthchecks": HEALTHCHECKS,
    "tags": _TAGS,
    "created_at": Field("integer"),
    "updated_at": Field("integer"),
}

TARGET = {
    "id": Field("string"),
    "target": Field("string", default=REQUIRED, check=_target),
    "weight": Field("integer", default=100, between=(0, 65535)),
    "backup": Field("boolean", default=False),
    "headers": Field("map", default={}),
    "upstream": Field("record", fields={"id": Field("string")}),
    "tags": _TAGS,
    "created_at": Field("number"),
    "updated_at": Field("number"),
}

SERVICE = {
    "id": Field("string"),
    "name": Field("string", check=_name),
    "protocol": Field("string", default="http", one_of=("http", "https")),
    "host": Field("string", default=REQUIRED, check=_host),
    "port": Field("integer", default=80, between=(0, 65535)),
    "path": Field("string", check=absolute_path),
    "retries": Field("integer", default=5, between=(0, 32767)),
    "connect_timeout": Field("integer", default=60000, between=(1, MAX_INT)),
    "write_timeout": Field("integer", default=60000, between=(1, MAX_INT)),
    "read_timeout": Field("integer", default=60000, between=(1, MAX_INT)),
    "retry_on_statuses": Field(
        "array",
        default=[429, 500, 502, 503, 504],
        elements=Field("integer", between=(100, 999)),
        unique=True,
    ),
    "enabled": Field("boolean", default=True),
    "tags": _TAGS,
    "created_at": Field("integer"),
    "updated_at": Field("integer"),
}

ROUTE = {
    "id": Field("string"),
    "name": Field("string", check=_name),
    "protocols": Field(
        "array",
        default=["http", "https"],
        elements=Field("string", one_of=("http", "https")),
        unique=True,
    ),
    "methods": Field(
        "array",
        elements=Field(
            "string",
            check=lambda v: (
                None if v.isalpha() and v.isupper() else "invalid value: " + v
            ),
        ),
    ),
    "hosts": Field(
        "array", elements=Field("string", check=lambda v: _host(v.replace("*", "x", 1)))
    ),
    "paths": Field("array", elements=Field("string", check=_path)),
    "models": Field("array", elements=Field("string")),
    "strip_path": Field("boolean", default=True),
    "preserve_host": Field("boolean", default=False),
    "regex_priority": Field("integer", default=0),
    "service": Field("record", fields={"id": Field("string")}),
    "tags": _TAGS,
    "created_at": Field("integer"),
    "updated_at": Field("integer"),
}

SCHEMAS: Mapping[str, Mapping[str, Field]] = {
    "upstreams": UPSTREAM,
    "targets": TARGET,
    "services": SERVICE,
    "routes": ROUTE,
}


_HASH_PARAMETER = {
    "header": "header",
    "cookie": "cookie",
    "query_arg": "query_arg",
    "uri_capture": "uri_capture",
}


def check_upstream(rec: dict[str, Any], given: Mapping[str, Any]) -> Errors:
    """
    Kong's cross-field rules for upstream hashing.

    C{hash_on} other than C{none} implies consistent hashing when no
    algorithm was given; each hash source needs its parameter; a fallback
    needs a primary that can be missing (a cookie never is: the gateway
    sets one).
    """
    errors: Errors = {}
    on, fallback = rec["hash_on"], rec["hash_fallback"]
    if on != "none" and "algorithm" not in given:
        rec["algorithm"] = "consistent-hashing"
    if on != "none" and rec["algorithm"] != "consistent-hashing":
        errors["hash_on"] = "must be 'none' unless algorithm is 'consistent-hashing'"
    if fallback != "none":
        if on in ("none", "cookie"):
            errors["hash_fallback"] = f"must be 'none' when 'hash_on' is '{on}'"
        elif fallback == "cookie":
            errors["hash_fallback"] = "must not be 'cookie'"
        elif fallback == on and on not in ("header", "query_arg", "uri_capture"):
            errors["hash_fallback"] = "must differ from 'hash_on'"
    for side, how in (("on", on), ("fallback", fallback)):
        parameter = _HASH_PARAMETER.get(how)
        if parameter is None or (side == "fallback" and how == "cookie"):
            continue
        if not rec.get(f"hash_{side}_{parameter}"):
            errors[f"hash_{side}_{parameter}"] = "required field missing"
    parameter = _HASH_PARAMETER.get(on)
    if on == fallback and parameter and not errors:
        primary, secondary = (
            rec[f"hash_on_{parameter}"],
            rec[f"hash_fallback_{parameter}"],
        )
        if primary.lower() == secondary.lower():
            errors[f"hash_fallback_{parameter}"] = (
                f"must differ from 'hash_on_{parameter}'"
            )
    return errors


def check_route(rec: dict[str, Any], given: Mapping[str, Any]) -> Errors:
    """
    A route must match on something.
    """
    if not (rec["paths"] or rec["hosts"] or rec["methods"] or rec["models"]):
        return {"@entity": "must set one of 'methods', 'hosts', 'paths', 'models'"}
    return {}


def check_target(rec: dict[str, Any], given: Mapping[str, Any]) -> Errors:
    """
    Store targets in canonical C{host:port} form, so C{host} and
    C{host:8000} are the same target.
    """
    parsed = parse_target(rec["target"])
    assert parsed is not None
    rec["target"] = format_target(*parsed)
    return {}


def check_service(rec: dict[str, Any], given: Mapping[str, Any]) -> Errors:
    """
    A service on C{https} with no port given listens on 443.
    """
    if rec["protocol"] == "https" and "port" not in given:
        rec["port"] = 443
    return {}


CHECKS = {
    "upstreams": check_upstream,
    "targets": check_target,
    "services": check_service,
    "routes": check_route,
}


def expand_service_url(data: dict[str, Any]) -> Errors:
    """
    Kong's C{url} shorthand: C{url=https://host:port/path} sets C{protocol},
    C{host}, C{port} and C{path}.
    """
    url = data.pop("url", None)
    if url is None:
        return {}
    if not isinstance(url, str):
        return {"url": "expected a string"}
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return {
            "url": "missing host in url" if parts.scheme else "missing protocol in url"
        }
    data["protocol"] = parts.scheme
    data["host"] = parts.hostname
    try:
        port = parts.port
    except ValueError:
        return {"url": "invalid port in url"}
    data["port"] = port or (443 if parts.scheme == "https" else 80)
    if parts.path:
        data["path"] = parts.path
    return {}


def build_record(
    kind: str, data: Mapping[str, Any], coerce: bool
) -> tuple[dict[str, Any], Errors]:
    """
    Validate a full entity and fill in its defaults.

    @return: the record and an error tree (empty when valid).
    """
    data = dict(data)
    errors: Errors = {}
    if kind == "services":
        errors.update(expand_service_url(data))
    rec, more = validate(SCHEMAS[kind], data, coerce)
    errors.update(more)
    if not errors:
        errors.update(CHECKS[kind](rec, data))
    return rec, errors


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

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> Service:
        """
        Build from a stored record; timeouts become seconds.
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
        )

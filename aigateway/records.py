# -*- test-case-name: tests.test_schema -*-
"""
The Admin API's records: each entity kind's schema, the cross-field rules
Kong applies, and L{build_record}, which validates a body and fills in the
defaults.

A record is the JSON-able dict the Admin API returns and the store keeps;
L{aigateway.model} builds the frozen values the proxy reads from it.
"""

from __future__ import annotations

import copy
import ipaddress
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from .addresses import HOSTNAME, check_host, format_target, parse_target
from .balancer import registry
from .cacerts import cert_digest, check_cert
from .health.config import SCHEMA as HEALTHCHECKS
from .ids import is_uuid
from .schema import (
    REQUIRED,
    Errors,
    Field,
    absolute_path,
    defaults,
    header_map,
    no_controls,
    token,
    validate,
)

MAX_INT = 2147483646
_NAME = re.compile(r"[A-Za-z0-9.\-_~]{1,128}\Z")
_HASH_ON = ("none", "header", "ip", "cookie", "path", "query_arg", "uri_capture")
# Kong's tags: printable, without the "," and "/" its ?tags= filter splits on.
_TAG = re.compile(r"[^\x00-\x1f\x7f,/]{1,128}\Z")


def _tag(value: str) -> str | None:
    if not _TAG.match(value):
        return (
            f"invalid tag {value!r}: expected printable characters "
            "(except ',' and '/'), at most 128"
        )
    return None


_TAGS = Field("array", default=None, elements=Field("string", check=_tag), unique=True)


def _name(value: str) -> str | None:
    if not _NAME.match(value):
        return (
            f"invalid value {value!r}: it must only contain alphanumerics "
            "and '.', '-', '_', '~', at most 128"
        )
    return None


def _upstream_name(value: str) -> str | None:
    """
    An upstream is named by the host services send to it, so its name must
    be one (Kong's rule): a DNS name, without a port, not an IP address.
    """
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if HOSTNAME.match(value):
            return None
    return f"Invalid name ({value!r}); must be a valid hostname"


def _uuid(value: str) -> str | None:
    return None if is_uuid(value) else "expected a valid UUID"


def _route_host(value: str) -> str | None:
    """
    A route's host: a name or address, or a wildcard as the leftmost or
    rightmost label (C{*.example.com}, C{example.*}), as Kong's.
    """
    if value.startswith("*."):
        value = "x" + value[1:]
    elif value.endswith(".*"):
        value = value[:-1] + "x"
    return check_host(value)


def _method(value: str) -> str | None:
    if value.isascii() and value.isalpha() and value.isupper():
        return None
    return f"invalid value: {value!r}"


def _target(value: str) -> str | None:
    return (
        None
        if parse_target(value)
        else "Invalid target; not a valid hostname or ip address"
    )


def _path(value: str) -> str | None:
    if value.startswith("~"):
        if _BLANK.search(value):
            return f"invalid regex: {value[1:]!r} (spaces or control characters)"
        try:
            re.compile(route_regex(value))
        except re.error as e:
            return f"invalid regex: '{value[1:]}' ({e})"
        return None
    if not value.startswith("/"):
        return "should start with: / (fixed path) or ~/ (regex path)"
    return absolute_path(value)


_BLANK = re.compile(r"[\x00-\x20\x7f]")


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
    "name": Field("string", default=REQUIRED, check=_upstream_name),
    "algorithm": Field("string", default="round-robin", one_of=registry.names),
    "hash_on": Field("string", default="none", one_of=_HASH_ON),
    "hash_fallback": Field("string", default="none", one_of=_HASH_ON),
    "hash_on_header": Field("string", check=token),
    "hash_fallback_header": Field("string", check=token),
    "hash_on_cookie": Field("string", check=token),
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
    "host_header": Field("string", check=check_host),
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
    "headers": Field("map", default={}, check=header_map),
    "upstream": Field("record", fields={"id": Field("string")}),
    "tags": _TAGS,
    "created_at": Field("number"),
    "updated_at": Field("number"),
}

SERVICE = {
    "id": Field("string"),
    "name": Field("string", check=_name),
    "protocol": Field("string", default="http", one_of=("http", "https")),
    "host": Field("string", default=REQUIRED, check=check_host),
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
    "tls_verify": Field("boolean", default=True),
    "ca_certificates": Field(
        "array", elements=Field("string", check=_uuid), unique=True
    ),
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
    "methods": Field("array", elements=Field("string", check=_method), unique=True),
    "hosts": Field("array", elements=Field("string", check=_route_host), unique=True),
    "paths": Field("array", elements=Field("string", check=_path), unique=True),
    "models": Field("array", elements=Field("string", check=no_controls), unique=True),
    "strip_path": Field("boolean", default=True),
    "preserve_host": Field("boolean", default=False),
    "regex_priority": Field("integer", default=0),
    "service": Field("record", fields={"id": Field("string")}),
    "tags": _TAGS,
    "created_at": Field("integer"),
    "updated_at": Field("integer"),
}

CA_CERTIFICATE = {
    "id": Field("string"),
    "cert": Field("string", default=REQUIRED, check=check_cert),
    # Computed (check_ca_certificate): what a client sends is replaced.
    "cert_digest": Field("string"),
    "tags": _TAGS,
    "created_at": Field("integer"),
    "updated_at": Field("integer"),
}

SCHEMAS: Mapping[str, Mapping[str, Field]] = {
    "upstreams": UPSTREAM,
    "targets": TARGET,
    "services": SERVICE,
    "routes": ROUTE,
    "ca_certificates": CA_CERTIFICATE,
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


def check_ca_certificate(rec: dict[str, Any], given: Mapping[str, Any]) -> Errors:
    """
    A CA certificate's C{cert_digest} is the digest of its C{cert}, never
    what a client sent: it is the certificate's identity (unique, and how
    a declarative document finds the stored entity again).
    """
    rec["cert_digest"] = cert_digest(rec["cert"])
    return {}


#: Fields the gateway sets, never taken from a request body as they are.
SERVER_FIELDS = ("id", "created_at", "updated_at")
#: Each kind's unique key, within its parent for targets and routes.
UNIQUE = {
    "upstreams": "name",
    "services": "name",
    "routes": "name",
    "targets": "target",
    # Kong's: the same CA twice is one CA.
    "ca_certificates": "cert_digest",
}
#: The field by which a target or route refers to its parent.
PARENT = {"targets": "upstream", "routes": "service"}


def stamp(kind: str, now: float) -> float:
    """
    A record's C{created_at} / C{updated_at} for the time C{now}: targets'
    to the millisecond, the other kinds' to the second, as Kong keeps them.
    """
    return round(now, 3) if kind == "targets" else int(now)


def parent_id(kind: str, record: Mapping[str, Any]) -> str | None:
    """
    The id of the upstream or service a target or route belongs to.
    """
    parent = PARENT.get(kind)
    ref = record.get(parent) if parent else None
    return ref.get("id") if isinstance(ref, Mapping) else None


CHECKS = {
    "upstreams": check_upstream,
    "targets": check_target,
    "services": check_service,
    "routes": check_route,
    "ca_certificates": check_ca_certificate,
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
    try:
        parts = urlsplit(url)
    except ValueError:
        return {"url": "invalid url"}
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
    # A URL without a path sets none (Kong's rule): a PATCH of the URL must
    # not keep the old service's path.
    data["path"] = parts.path or None
    return {}


# Every kind's record with each field at its default.
_DEFAULTS = {kind: defaults(schema) for kind, schema in SCHEMAS.items()}


def with_defaults(
    records: Mapping[str, Mapping[str, Mapping[str, Any]]],
) -> dict[str, dict[str, Mapping[str, Any]]]:
    """
    C{records} (by kind, then id) as the current schema has them: a field
    added since a record was stored (a service's C{tls_verify},
    C{ca_certificates}) gets its default, as Kong shows every field, so
    neither Admin API clients nor the gateway meet a record without one.
    Records that lack nothing are kept as they are.
    """
    upgraded: dict[str, dict[str, Mapping[str, Any]]] = {}
    for kind, by_id in records.items():
        fields = _DEFAULTS.get(kind)
        upgraded[kind] = kept = dict(by_id)
        if fields is None:
            continue
        for id, record in by_id.items():
            missing = fields.keys() - record.keys()
            if missing:
                filled = {name: copy.deepcopy(fields[name]) for name in missing}
                kept[id] = {**record, **filled}
    return upgraded


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

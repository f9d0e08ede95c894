# -*- test-case-name: tests.test_declarative -*-
"""
Declarative configuration: Kong's format (a subset), as YAML or JSON.

    _format_version: "3.0"
    upstreams:
    - name: llm
      algorithm: least-connections
      targets:
      - target: 10.0.0.1:8000
        headers: {Authorization: Bearer sk-...}
    services:
    - name: chat
      host: llm
      routes:
      - paths: [/v1]
    ca_certificates:          # services name them by id
    - id: 6f1c55d6-5a3b-4d5e-9d1e-3f0b9c1f2a44
      cert: "-----BEGIN CERTIFICATE-----..."

A document is validated whole, every error reported with its place in the
document, before anything is stored; it then replaces the stored
configuration in one transaction.  The export is the same format, with
timestamps left out, ids left out of what a name identifies, and target
header values (credentials) masked, so that export, import and export again
give the same document.  Loading it
back keeps every entity's id, known by its name (see L{load}), and its
stored secrets (see L{keep_secrets}).  Ids given in a document must be
UUIDs, as through the Admin API.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import attrs
import yaml

from .config import empty_records
from .ids import is_uuid
from .records import SERVER_FIELDS, UNIQUE, build_record, parent_id, stamp
from .schema import flatten

FORMAT_VERSIONS = ("1.1", "2.1", "3.0")
_NESTED = {"upstreams": ("targets", "upstream"), "services": ("routes", "service")}
#: The top-level kind with no children: CA certificates, which services
#: name by id (so their ids are always in an export).
_FLAT = "ca_certificates"
_TOP = ("upstreams", "services", _FLAT)
MASK = "…"

#: What an entity is known by across loads: its kind, the name of its
#: upstream for a target (C{None} for the other kinds, whose names are
#: unique across the gateway) and its unique key; see L{_key}.
_Key = tuple[str, str | None, str]


class InvalidDocument(Exception):
    """
    A declarative document that cannot be loaded.

    @ivar errors: every problem, as C{"path: message"} lines.
    """

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


def parse(text: str | bytes) -> Any:
    """
    Read a YAML (or JSON, which is YAML) document.

    @raise InvalidDocument: when it is not well-formed.
    """
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InvalidDocument([f"cannot parse the document: {e}"]) from None
    except RecursionError:
        # PyYAML composes nested collections by recursion, one level of
        # nesting a few frames: some kilobytes of "[" exhaust the stack.
        raise InvalidDocument(
            ["cannot parse the document: nested too deeply"]
        ) from None
    except ValueError as e:
        # PyYAML's constructors let through what building a value raises:
        # datetime() on "2001-13-01", int() on more digits than Python
        # converts.
        raise InvalidDocument([f"cannot parse the document: {e}"]) from None


def mask(value: str) -> str:
    """
    Hide a secret header value, keeping enough to tell keys apart:
    C{"Bearer sk-abcdef0123456789"} becomes C{"Bearer sk-…6789"}.  A value
    already masked is left as it is, so masking is idempotent.
    """
    if MASK in value:
        return value
    if len(value) <= 12:
        return MASK
    return value[: min(10, len(value) // 3)] + MASK + value[-4:]


def load(
    document: Any, now: float, current: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, dict[str, dict[str, Any]]]:
    """
    Validate a document and turn it into records.

    An entry without an id takes the id, and the creation time, of the
    entity in force with the same unique key (see L{_key}), so that an
    unchanged export loaded back changes no id: ids are what users script
    against, and what per-target health state is kept by (an upstream's id
    and the target's address), as in Kong's DB-less mode.  An id given
    explicitly anywhere in the document is never taken that way, nor is one
    id taken twice, so no two records ever share one.

    @param current: the records in force; a masked header value that matches
        the current target's keeps that target's real secret, so an exported
        document can be edited and loaded back.
    @raise InvalidDocument: with every error found.
    """
    if not isinstance(document, dict):
        raise InvalidDocument(["the document must be a mapping"])
    loader = _Loader(now, current or {}, _given_ids(document))
    errors = loader.errors
    version = document.get("_format_version")
    if str(version) not in FORMAT_VERSIONS:
        errors.append(f"_format_version: expected one of: {', '.join(FORMAT_VERSIONS)}")
    for key in document:
        if key not in ("_format_version", "_transform", *_TOP):
            errors.append(f"{key}: unknown field")
    # CA certificates first: services name them.
    for where, entry in _entries(document.get(_FLAT), _FLAT, errors):
        loader.add(_FLAT, entry, where, None)
    for kind in ("upstreams", "services"):
        child_kind, parent_field = _NESTED[kind]
        for where, entry in _entries(document.get(kind), kind, errors):
            body = {k: v for k, v in entry.items() if k != child_kind}
            parent = loader.add(kind, body, where, None)
            if kind == "services" and parent is not None:
                loader.check_ca_certificates(parent, where)
            children = entry.get(child_kind)
            for there, child in _entries(children, f"{where}.{child_kind}", errors):
                child = dict(child)
                child[parent_field] = {
                    "id": parent["id"] if parent else str(uuid.uuid4())
                }
                loader.add(child_kind, child, there, body.get("name"))
    if errors:
        raise InvalidDocument(errors)
    return loader.records


def keep_secrets(
    headers: Mapping[str, str] | None, stored: Mapping[str, str] | None
) -> dict[str, str] | None:
    """
    C{headers} as given for a target, with each value that is the mask of
    the stored value of the same header (names compared without regard to
    case, as HTTP does) replaced by that stored value.

    Target header values are credentials, shown only masked; this is what
    lets a client send back what it was shown (an exported document, a
    target read and written back) without overwriting the secret with its
    mask.  A masked value that is not the mask of the stored one is kept as
    given: a mask never names some other secret.

    @param stored: the headers of the target in force, if there is one.
    @return: C{None} when C{headers} is.
    """
    if headers is None:
        return None
    secrets = {name.lower(): value for name, value in (stored or {}).items()}
    kept = {}
    for name, value in headers.items():
        secret = secrets.get(name.lower())
        kept[name] = secret if secret is not None and value == mask(secret) else value
    return kept


def _entries(
    value: Any, where: str, errors: list[str]
) -> Iterator[tuple[str, dict[str, Any]]]:
    """
    The records of an array in the document, each with its place; what is
    not an array or not a record is reported in C{errors} and skipped.
    """
    if not value:
        return
    if not isinstance(value, list):
        errors.append(f"{where}: expected an array")
        return
    for i, entry in enumerate(value):
        if isinstance(entry, dict):
            yield f"{where}[{i}]", entry
        else:
            errors.append(f"{where}[{i}]: expected a record")


def _given_ids(document: Mapping[str, Any]) -> set[str]:
    """
    Every id the document gives explicitly, of any kind: the store keeps
    all kinds under one primary key, so an id taken over from the entity in
    force must differ from all of them.
    """
    given = [entry.get("id") for _, entry in _entries(document.get(_FLAT), _FLAT, [])]
    for kind, (child_kind, _) in _NESTED.items():
        for _, entry in _entries(document.get(kind), kind, []):
            given.append(entry.get("id"))
            for _, child in _entries(entry.get(child_kind), child_kind, []):
                given.append(child.get("id"))
    return {i for i in given if isinstance(i, str)}


def _key(kind: str, value: Any, parent: Any) -> _Key | None:
    """
    What identifies a record of C{kind} whose unique key (L{UNIQUE}) is
    C{value}; C{parent} is the name of its upstream, for a target.

    Targets are known by their upstream's name and their address; the other
    kinds by name alone, routes included (Kong's route names are unique
    across the gateway, so a route moved to another service is still the
    same route).  A record with no unique key (a route or service without a
    name) has no identity to keep.
    """
    if not isinstance(value, str):
        return None
    if kind != "targets":
        return (kind, None, value)
    return (kind, parent, value) if isinstance(parent, str) else None


def _by_key(
    current: Mapping[str, Mapping[str, Mapping[str, Any]]],
) -> dict[_Key, Mapping[str, Any]]:
    """
    The records in force by L{_key}.  A key that two records share names
    neither: guessing would give one entity the other's id.  (None should:
    but a database written before route names were unique across services
    can hold two routes of one name.)
    """
    upstreams = {u["id"]: u["name"] for u in current.get("upstreams", {}).values()}
    found: dict[_Key, Mapping[str, Any]] = {}
    shared = set()
    for kind, key in UNIQUE.items():
        for record in current.get(kind, {}).values():
            owner = parent_id(kind, record) if kind == "targets" else None
            parent = upstreams.get(owner) if owner else None
            identity = _key(kind, record.get(key), parent)
            if identity in found:
                shared.add(identity)
            if identity is not None:
                found[identity] = record
    for identity in shared:
        del found[identity]
    return found


@attrs.define
class _Loader:
    """
    The records a document makes, built entry by entry, with what building
    them has to remember to report every error in one pass and never give
    two records one id.

    @ivar in_force: the records in force, by kind and id.
    @ivar taken: ids an entry without one must not take over from the
        entity in force: those given in the document, and those taken over
        already.
    @ivar seen: C{(kind, upstream id or None, unique key)} of every entry so
        far.
    """

    now: float
    in_force: Mapping[str, Mapping[str, Mapping[str, Any]]]
    taken: set[str]
    by_key: dict[_Key, Mapping[str, Any]] = attrs.field(
        default=attrs.Factory(lambda self: _by_key(self.in_force), takes_self=True)
    )
    errors: list[str] = attrs.Factory(list)
    records: dict[str, dict[str, dict[str, Any]]] = attrs.Factory(empty_records)
    seen: set[tuple[str, Any, str]] = attrs.Factory(set)

    def add(
        self, kind: str, data: dict[str, Any], where: str, parent: Any
    ) -> dict[str, Any] | None:
        """
        Validate one entry and, if it is valid, add its record.

        @param parent: the name its upstream or service is given in the
            document, for a target or route.
        @return: the record, or C{None} when the entry is invalid (its
            errors are in L{errors}).
        """
        data = {k: v for k, v in data.items() if k not in ("created_at", "updated_at")}
        record, problems = build_record(kind, data, coerce=False)
        key = UNIQUE[kind]
        # Duplicates are looked for even among invalid entries, so that every
        # error is reported in one pass; a key that is not a string is
        # reported by the schema, and could not be hashed.  Targets are
        # unique within their upstream, names across the gateway, as through
        # the Admin API.
        value = record.get(key, data.get(key))
        if isinstance(value, str):
            scope = parent_id(kind, data) if kind == "targets" else None
            unique = (kind, scope, value)
            if unique in self.seen:
                problems[key] = f"duplicate {key} {value!r}"
            self.seen.add(unique)
        given_id = data.get("id")
        if isinstance(given_id, str) and "id" not in problems:
            if not is_uuid(given_id):
                problems["id"] = "expected a valid UUID"
            elif any(given_id in by_id for by_id in self.records.values()):
                problems["id"] = f"duplicate id {given_id}"
        if problems:
            self.errors.extend(f"{where}.{line}" for line in flatten(problems))
            return None
        identity = _key(kind, record.get(key), parent)
        match = None if identity is None else self.by_key.get(identity)
        record["id"] = given_id or self._take(match)
        now = stamp(kind, self.now)
        old = self.in_force.get(kind, {}).get(record["id"])
        record["created_at"] = old.get("created_at", now) if old else now
        record["updated_at"] = now
        if kind == "targets" and match is not None:
            record["headers"] = keep_secrets(record["headers"], match.get("headers"))
        self.records[kind][record["id"]] = record
        return record

    def check_ca_certificates(self, service: Mapping[str, Any], where: str) -> None:
        """
        Report each CA certificate id C{service} names that no entry of
        the document has (they are all loaded before the services).
        """
        known = self.records[_FLAT]
        for i, id in enumerate(service.get("ca_certificates") or ()):
            if id not in known:
                self.errors.append(
                    f"{where}.ca_certificates[{i}]: {id} does not reference an "
                    "existing 'ca_certificates' entity"
                )

    def _take(self, match: Mapping[str, Any] | None) -> str:
        """
        The id of C{match}, the entity in force an entry without an id is,
        unless another entry has it; else a new one.
        """
        if match is not None and match["id"] not in self.taken:
            self.taken.add(match["id"])
            return str(match["id"])
        return str(uuid.uuid4())


def export(records: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """
    The configuration as a declarative document (secrets masked).
    """

    def clean(
        record: Mapping[str, Any], kind: str, drop: str | None = None
    ) -> dict[str, Any]:
        out = {k: v for k, v in record.items() if k not in SERVER_FIELDS and k != drop}
        if kind == _FLAT or record.get(UNIQUE[kind]) is None:
            # Nothing else names it (a route or service without a name),
            # or services name it by id (a CA certificate): its id is how
            # loading the document back finds it again, so its id, metric
            # series and the references to it stay.
            out["id"] = record["id"]
        if "headers" in out and drop == "upstream":
            out["headers"] = {k: mask(v) for k, v in out["headers"].items()}
        return out

    def ordered(items: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
        return sorted(
            items, key=lambda r: (str(r.get(key) or ""), json.dumps(r, sort_keys=True))
        )

    document: dict[str, Any] = {"_format_version": "3.0"}
    for kind, (child_kind, parent_field) in _NESTED.items():
        entries = []
        for parent in records[kind].values():
            entry = clean(parent, kind)
            children = [
                clean(child, child_kind, parent_field)
                for child in records[child_kind].values()
                if child[parent_field]["id"] == parent["id"]
            ]
            entry[child_kind] = ordered(children, UNIQUE[child_kind])
            entries.append(entry)
        document[kind] = ordered(entries, "name")
    certificates = [clean(r, _FLAT) for r in records.get(_FLAT, {}).values()]
    if certificates:
        # Left out when there are none, so a configuration without them
        # exports as it did before they existed.
        document[_FLAT] = ordered(certificates, UNIQUE[_FLAT])
    return document


def dump(document: Mapping[str, Any]) -> str:
    """
    A document as YAML, keys in a stable order.
    """
    return yaml.safe_dump(dict(document), sort_keys=True, allow_unicode=True)

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

A document is validated whole, every error reported with its place in the
document, before anything is stored; it then replaces the stored
configuration in one transaction.  The export is the same format, with ids
and timestamps left out and target header values (credentials) masked, so
that export, import and export again give the same document.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import yaml

from .config import empty_records
from .records import SERVER_FIELDS, UNIQUE, build_record, parent_id
from .schema import flatten

FORMAT_VERSIONS = ("1.1", "2.1", "3.0")
_NESTED = {"upstreams": ("targets", "upstream"), "services": ("routes", "service")}
MASK = "…"


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

    @param current: the records in force; a masked header value that matches
        the current target's keeps that target's real secret, so an exported
        document can be edited and loaded back.
    @raise InvalidDocument: with every error found.
    """
    errors: list[str] = []
    records = empty_records()
    if not isinstance(document, dict):
        raise InvalidDocument(["the document must be a mapping"])
    version = document.get("_format_version")
    if str(version) not in FORMAT_VERSIONS:
        errors.append(f"_format_version: expected one of: {', '.join(FORMAT_VERSIONS)}")
    for key in document:
        if key not in ("_format_version", "_transform", "upstreams", "services"):
            errors.append(f"{key}: unknown field")
    secrets = _secrets(current or {})
    seen: set[tuple[str, Any, Any]] = set()
    for kind in ("upstreams", "services"):
        child_kind, parent_field = _NESTED[kind]
        for where, entry in _entries(document.get(kind), kind, errors):
            body = {k: v for k, v in entry.items() if k != child_kind}
            parent = _record(kind, body, now, where, errors, records, seen)
            children = entry.get(child_kind)
            for there, child in _entries(children, f"{where}.{child_kind}", errors):
                child = dict(child)
                child[parent_field] = {
                    "id": parent["id"] if parent else str(uuid.uuid4())
                }
                if child_kind == "targets":
                    _restore_secrets(child, body.get("name"), secrets)
                _record(child_kind, child, now, there, errors, records, seen)
    if errors:
        raise InvalidDocument(errors)
    return records


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


def _record(
    kind: str,
    data: dict[str, Any],
    now: float,
    where: str,
    errors: list[str],
    records: dict[str, dict[str, dict[str, Any]]],
    seen: set[tuple[str, Any, Any]],
) -> dict[str, Any] | None:
    data = {k: v for k, v in data.items() if k not in ("created_at", "updated_at")}
    record, problems = build_record(kind, data, coerce=False)
    key = UNIQUE[kind]
    # Duplicates are looked for even among invalid entries, so that every
    # error is reported in one pass.
    unique = (kind, parent_id(kind, data), record.get(key, data.get(key)))
    if unique[2] is not None and unique in seen:
        problems[key] = f"duplicate {key} {unique[2]!r}"
    seen.add(unique)
    given_id = data.get("id")
    if given_id is not None and given_id in records[kind]:
        problems["id"] = f"duplicate id {given_id}"
    if problems:
        errors.extend(f"{where}.{line}" for line in flatten(problems))
        return None
    record["id"] = record.get("id") or str(uuid.uuid4())
    record["created_at"] = record["updated_at"] = (
        round(now, 3) if kind == "targets" else int(now)
    )
    records[kind][record["id"]] = record
    return record


def _secrets(
    current: Mapping[str, Mapping[str, Any]],
) -> dict[tuple[str, str, str], str]:
    names = {u["id"]: u["name"] for u in current.get("upstreams", {}).values()}
    found = {}
    for target in current.get("targets", {}).values():
        upstream = names.get(target["upstream"]["id"], "")
        for header, value in (target.get("headers") or {}).items():
            found[(upstream, target["target"], header.lower())] = value
    return found


def _restore_secrets(
    target: dict[str, Any], upstream: Any, secrets: Mapping[tuple[str, str, str], str]
) -> None:
    headers = target.get("headers")
    if not isinstance(headers, dict):
        return
    restored = dict(headers)
    for header, value in headers.items():
        if isinstance(value, str) and MASK in value:
            real = secrets.get(
                (str(upstream), str(target.get("target")), header.lower())
            )
            if real is not None and mask(real) == value:
                restored[header] = real
    target["headers"] = restored


def export(records: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """
    The configuration as a declarative document (secrets masked).
    """

    def clean(record: Mapping[str, Any], drop: str | None = None) -> dict[str, Any]:
        out = {k: v for k, v in record.items() if k not in SERVER_FIELDS and k != drop}
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
            entry = clean(parent)
            children = [
                clean(child, parent_field)
                for child in records[child_kind].values()
                if child[parent_field]["id"] == parent["id"]
            ]
            entry[child_kind] = ordered(children, UNIQUE[child_kind])
            entries.append(entry)
        document[kind] = ordered(entries, "name")
    return document


def dump(document: Mapping[str, Any]) -> str:
    """
    A document as YAML, keys in a stable order.
    """
    return yaml.safe_dump(dict(document), sort_keys=True, allow_unicode=True)

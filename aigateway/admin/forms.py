# -*- test-case-name: tests.test_schema -*-
"""
Reading Admin API request bodies.

Kong accepts C{application/x-www-form-urlencoded} with dotted keys for
nested records (C{healthchecks.active.http_path=/health}) and C{x[]=} or
repeated keys for arrays, as well as JSON.  Both are read into the same
nested dict; only form values need type coercion, which the schema does.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl

from .errors import bad_request


def parse_body(content_type: str, body: bytes) -> tuple[dict[str, Any], bool]:
    """
    Parse a request body.

    @return: the data and whether it came from a form (so strings must be
        coerced to the schema's types).
    @raise AdminError: when the body cannot be read.
    """
    if not body.strip():
        return {}, True
    if content_type.split(";")[0].strip().lower() == "application/json":
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            # RecursionError: a body nested deeper than the parser goes.
            raise bad_request("Cannot parse JSON body") from None
        if not isinstance(data, dict):
            raise bad_request("Cannot parse JSON body")
        return data, False
    if content_type.startswith("multipart/"):
        raise bad_request("multipart bodies are not supported: use a form or JSON")
    try:
        # Empty fields ("a=1&", "a=1&&b=2") are skipped, as curl users and
        # browsers expect; anything else without a "=" is an error.
        text = "&".join(field for field in body.decode("utf-8").split("&") if field)
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=True)
    except (UnicodeDecodeError, ValueError):
        raise bad_request("Cannot parse form body") from None
    return unflatten(pairs), True


def unflatten(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """
    Turn form pairs into a nested dict: dotted keys nest, C{[]} suffixes
    and repeated keys make arrays.
    """
    result: dict[str, Any] = {}
    for key, value in pairs:
        is_array = key.endswith("[]")
        if is_array:
            key = key[:-2]
        *parents, leaf = key.split(".")
        node = result
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        if leaf in node:
            existing = node[leaf]
            node[leaf] = (existing if isinstance(existing, list) else [existing]) + [
                value
            ]
        elif is_array:
            node[leaf] = [] if value == "" else [value]
        else:
            node[leaf] = value
    return result

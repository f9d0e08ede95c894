# -*- test-case-name: tests.test_admin -*-
"""
Kong-shaped Admin API errors.

Tooling written for Kong's Admin API (decK, Terraform providers, scripts)
reads C{code}, C{name} and C{fields}; keeping the shape lets it read ours.
"""

from __future__ import annotations

from typing import Any

from ..schema import Errors, flatten


class AdminError(Exception):
    """
    An Admin API request that cannot be served.

    @ivar status: the HTTP status to answer with.
    @ivar body: the JSON body.
    """

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(body.get("message"))
        self.status = status
        self.body = body


def schema_violation(errors: Errors) -> AdminError:
    """
    Code 2: the entity does not fit its schema; every field is reported.
    """
    lines = flatten(errors)
    if len(lines) == 1:
        message = f"schema violation ({lines[0]})"
    else:
        message = f"{len(lines)} schema violations ({'; '.join(lines)})"
    return AdminError(
        400,
        {"code": 2, "name": "schema violation", "message": message, "fields": errors},
    )


def unique_violation(kind: str, field: str, value: str, hint: str) -> AdminError:
    """
    Code 5: another entity already has this unique value.
    """
    return AdminError(
        409,
        {
            "code": 5,
            "name": "unique constraint violation",
            "message": f"UNIQUE violation detected on '{{{field}=\"{value}\"}}': {hint}",
            "fields": {field: value},
        },
    )


def foreign_key_violation(message: str, fields: Errors) -> AdminError:
    """
    Code 4 (Kong's; 3 is a primary key taken): a reference to an entity
    that does not exist, or a delete of an entity still referenced.
    """
    return AdminError(
        400,
        {
            "code": 4,
            "name": "foreign key violation",
            "message": message,
            "fields": fields,
        },
    )


def not_found() -> AdminError:
    """
    The addressed entity does not exist.
    """
    return AdminError(404, {"message": "Not found"})


def bad_request(message: str) -> AdminError:
    """
    A request that cannot be read at all.
    """
    return AdminError(400, {"message": message})

# -*- test-case-name: tests.test_admin,tests.test_feed_hang,tests.test_admin_input -*-
"""
Kong-shaped Admin API errors.

Tooling written for Kong's Admin API (decK, Terraform providers, scripts)
reads C{code}, C{name} and C{fields}; keeping the shape lets it read ours.
"""

from __future__ import annotations

from typing import Any

from ..schema import Errors, flatten
from ..store.interfaces import StoreUnavailable


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


def uri_too_long(limit: int) -> AdminError:
    """
    A request line longer than the HTTP server reads (Kong's, nginx's,
    message).
    """
    return AdminError(
        414,
        {"message": f"URI too long: the request line is longer than {limit} bytes"},
    )


def header_too_large(limit: int) -> AdminError:
    """
    A header line longer than the HTTP server reads (Kong's, nginx's,
    message; the status is HTTP's own, not nginx's 494).
    """
    return AdminError(
        431,
        {
            "message": "Request header or cookie too large: a header line is "
            f"longer than {limit} bytes"
        },
    )


class WriteUnanswered(AdminError, StoreUnavailable):
    """
    A write the store did not answer in time: 503 to an Admin API client,
    and the store out of reach (L{StoreUnavailable}) to code that handles
    the store's outages.  (Start-up's C{--config} is not timed: it waits
    for the store.)
    """


def write_unanswered(patience: float, started: bool) -> WriteUnanswered:
    """
    A write the store has not answered within C{patience} seconds.

    @param started: whether the write reached the store.  If it did, it
        may still land (the store holds it, and the gateway puts it in
        force when it does), and the client is told so rather than that
        nothing changed; if it was still waiting for a write before it, it
        is dropped, and nothing changed.
    """
    if started:
        outcome = (
            "the change may or may not have been saved, and may still be: "
            "read it back before trying again"
        )
    else:
        outcome = "a change before this one still waits on it; nothing was changed"
    message = f"the configuration store did not answer within {patience:g} s; {outcome}"
    return WriteUnanswered(503, {"message": message})

# -*- test-case-name: tests.test_declarative -*-
"""
C{GET /config} and C{POST /config}: the whole configuration as one
declarative document.
"""

from __future__ import annotations

from typing import Any

from klein import Klein
from twisted.web.iweb import IRequest

from .. import declarative
from .app import endpoint
from .entities import Entities
from .errors import AdminError


def invalid(error: declarative.InvalidDocument) -> AdminError:
    """
    Kong's answer to a document that cannot be loaded: every error listed.
    """
    return AdminError(
        400,
        {
            "code": 14,
            "name": "invalid declarative configuration",
            "message": "declarative config is invalid: " + "; ".join(error.errors),
            "fields": {"errors": error.errors},
        },
    )


async def apply_document(
    entities: Entities, clock: Any, document: Any, bounded: bool = True
) -> None:
    """
    Validate C{document} whole and, only if it is valid, replace the
    configuration with it in one transaction.

    @param bounded: whether to give up waiting on a store that does not
        answer in time (see L{Entities.replace}).
    @raise declarative.InvalidDocument: with every error found.
    """
    # Validated now, so an invalid document is refused before the store is
    # touched, and again on the records in force at each attempt: the ids
    # kept and the secrets restored are those of the configuration replaced.
    declarative.load(document, clock.seconds(), entities.snapshot.records)
    await entities.replace(
        lambda current: declarative.load(document, clock.seconds(), current),
        bounded,
    )


def register(app: Klein, entities: Entities, clock: Any) -> None:
    """
    Add the declarative endpoints to C{app}.
    """

    @app.route("/config", methods=["GET"])
    @endpoint
    async def export(request: IRequest) -> Any:
        document = declarative.export(entities.snapshot.records)
        if request.args.get(b"format", [b"yaml"])[0] == b"json":
            return document
        request.setHeader(b"content-type", b"application/yaml; charset=utf-8")
        return declarative.dump(document).encode("utf-8")

    @app.route("/config", methods=["POST"])
    @endpoint
    async def load(request: IRequest) -> Any:
        request.content.seek(0)
        try:
            document = declarative.parse(request.content.read())
            await apply_document(entities, clock, document)
        except declarative.InvalidDocument as e:
            raise invalid(e) from None
        return 201, declarative.export(entities.snapshot.records)

# -*- test-case-name: tests.test_admin -*-
"""
C{/services} and C{/routes}: which requests go where.
"""

from __future__ import annotations

from typing import Any

from klein import Klein

from .app import crud
from .entities import Entities


def register(app: Klein, entities: Entities) -> None:
    """
    Add the service and route endpoints to C{app}.
    """

    def service_id(kwargs: dict[str, Any]) -> str:
        return str(entities.find("services", kwargs["s"])["id"])

    crud(app, entities, "services", "/services", "/services/<ref>")
    crud(
        app,
        entities,
        "routes",
        "/services/<s>/routes",
        "/services/<s>/routes/<ref>",
        parent=service_id,
    )
    crud(app, entities, "routes", "/routes", "/routes/<ref>")

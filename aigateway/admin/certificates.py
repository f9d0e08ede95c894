# -*- test-case-name: tests.test_ca_certificates -*-
"""
C{/ca_certificates}: the private CAs services may trust for their targets
(see L{aigateway.cacerts}).
"""

from __future__ import annotations

from klein import Klein

from .app import crud
from .entities import Entities


def register(app: Klein, entities: Entities) -> None:
    """
    Add the CA certificate endpoints to C{app}.
    """
    crud(
        app,
        entities,
        "ca_certificates",
        "/ca_certificates",
        "/ca_certificates/<ref>",
    )

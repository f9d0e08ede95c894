"""
The Admin API's twisted.web site.
"""

from __future__ import annotations

from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Site


class AdminSite(Site):
    """
    A site without twisted.web's per-request C{Site.log}: admin calls are
    few, and the gateway logs what matters (configuration changes) itself.
    """

    def __init__(self, resource: Resource, **kwargs: Any) -> None:
        # Bodies are read as bytes (the Admin API parses JSON and forms
        # itself); parsing form posts into request.args through the email
        # package would be work done for nothing.
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(resource, **kwargs)

    def log(self, request: Any) -> None:
        pass

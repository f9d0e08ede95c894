# -*- test-case-name: tests.test_feed -*-
"""
The Admin API's twisted.web site.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from ..feed import Outage

_log = Logger()


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


class FreshResource(Resource):
    """
    Answers every admin call from the stored configuration: if another
    process sharing the store changed it, it is loaded (and put in force)
    before the call is handled.

    The proxy learns of other processes' changes within the change feed's
    interval, but an operator who created an upstream through one node and
    adds a target to it through another must not be told it does not
    exist: as with Kong, the Admin API reads what the database holds.  It
    costs one small query per admin call, never a proxied request.  If the
    store does not answer, the call is handled from the configuration in
    force (a write will then fail with the store's error).
    """

    isLeaf = True

    def __init__(
        self,
        inner: Resource,
        refresh: Callable[[], Deferred[bool]],
        outage: Outage,
    ) -> None:
        super().__init__()
        self._inner = inner
        self._refresh = refresh
        self._outage = outage

    def render(self, request: Any) -> Any:
        def handle(_: object) -> None:
            result = self._inner.render(request)
            if result is not NOT_DONE_YET:
                request.write(result)
                request.finish()

        outage = self._outage
        d = self._refresh()
        d.addCallbacks(lambda _: outage.answered(), outage.failed)
        d.addCallback(handle)
        d.addErrback(lambda failure: _log.failure("admin call failed", failure))
        return NOT_DONE_YET

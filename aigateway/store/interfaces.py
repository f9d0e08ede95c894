# -*- test-case-name: tests.test_store -*-
"""
The store interface.

The store is the durable copy of the configuration.  Only the Admin API
(and start-up) touch it; the proxy reads the in-memory snapshot.  Every
method returns a L{Deferred} so that an implementation can run its blocking
database calls off the reactor thread.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import Interface

Record = Mapping[str, Any]


class IStore(Interface):
    """
    Durable configuration storage.
    """

    def load() -> Deferred[tuple[int, dict[str, dict[str, dict[str, Any]]]]]:
        """
        Read everything.

        @return: a L{Deferred} firing with the configuration version and the
            records by kind and id.
        """

    def write(
        puts: Sequence[tuple[str, Record]], deletes: Sequence[tuple[str, str]]
    ) -> Deferred[int]:
        """
        Insert or replace C{puts} (kind, record) and delete C{deletes}
        (kind, id) in one transaction, durable when the L{Deferred} fires.

        @return: a L{Deferred} firing with the new configuration version.
        """

    def replace(records: Mapping[str, Mapping[str, Record]]) -> Deferred[int]:
        """
        Replace the whole configuration in one transaction.

        @return: a L{Deferred} firing with the new configuration version.
        """

    def ping() -> Deferred[bool]:
        """
        Whether the store answers.
        """

    def close() -> Deferred[None]:
        """
        Release the database.
        """

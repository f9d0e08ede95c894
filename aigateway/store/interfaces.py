# -*- test-case-name: tests.test_store -*-
"""
The store interface.

The store is the durable copy of the configuration.  Only the Admin API,
start-up and the change feed touch it; the proxy reads the in-memory
snapshot.  Every method returns a L{Deferred} so that an implementation can
run its blocking database calls off the reactor thread.

Several gateway processes (one per core, or one per machine) may share one
store.  Each keeps its own snapshot, so a write says which configuration
version it was validated against, and the store refuses it with
L{StaleConfiguration} when another process wrote in between: the writer
then reloads, validates again and retries, and no change made elsewhere is
lost or bypasses a uniqueness check.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import Interface

Record = Mapping[str, Any]


class StoreUnavailable(Exception):
    """
    The database could not be reached or could not take the call (a
    server that is down, a file locked past the wait): nothing was
    written.  The Admin API answers 503; the proxy is not affected.
    """


class StaleConfiguration(Exception):
    """
    A write was validated against a configuration version that is no
    longer the stored one: another process changed the configuration.
    Nothing was written.
    """


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

    def version() -> Deferred[int]:
        """
        The stored configuration version, read cheaply: the change feed
        asks for it every few seconds and loads everything only when it
        moved.
        """

    def write(
        puts: Sequence[tuple[str, Record]],
        deletes: Sequence[tuple[str, str]],
        expected: int | None = None,
    ) -> Deferred[int]:
        """
        Insert or replace C{puts} (kind, record) and delete C{deletes}
        (kind, id) in one transaction, durable when the L{Deferred} fires.

        @param expected: the configuration version the change was validated
            against, or L{None} to write whatever is stored.
        @return: a L{Deferred} firing with the new configuration version,
            or failing with L{StaleConfiguration} (nothing written) when
            the stored version is not C{expected}.
        """

    def replace(
        records: Mapping[str, Mapping[str, Record]], expected: int | None = None
    ) -> Deferred[int]:
        """
        Replace the whole configuration in one transaction.

        @param expected: as for L{write}.
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

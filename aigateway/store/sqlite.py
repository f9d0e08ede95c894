# -*- test-case-name: tests.test_store -*-
"""
The embedded SQLite store, the default.

Calls run on one dedicated database thread through L{adbapi.ConnectionPool}
(SQLite has one writer anyway), so the reactor never waits on disk; each
write is one transaction committed with C{synchronous=FULL}, so a change is
on disk when the Admin API answers.

Several gateway processes on one machine may open the same file: WAL mode
lets them read while one writes, and a writer that finds the file locked
waits for it (C{timeout}, 5 s) rather than failing.
"""

from __future__ import annotations

import os
import sqlite3
import time
from contextlib import suppress

from twisted.enterprise import adbapi
from twisted.internet.interfaces import IReactorThreads

from .sql import MIGRATIONS, Dialect, SQLStore

# Result codes that mean the file is busy or cannot be read or written now
# (another process's lock held past the wait, a full or read-only disk).
_UNAVAILABLE = (
    "SQLITE_BUSY",
    "SQLITE_LOCKED",
    "SQLITE_IOERR",
    "SQLITE_CANTOPEN",
    "SQLITE_FULL",
    "SQLITE_READONLY",
    "SQLITE_PROTOCOL",
)


def _unavailable(error: BaseException) -> bool:
    if not isinstance(error, sqlite3.OperationalError):
        return False
    name = getattr(error, "sqlite_errorname", None)  # Python 3.11+
    if name is None:
        message = str(error)
        return "locked" in message or "disk" in message or "unable to open" in message
    return str(name).startswith(_UNAVAILABLE)


SQLITE = Dialect(
    placeholder="?",
    upsert="INSERT OR REPLACE INTO entities (kind, id, data) VALUES (?, ?, ?)",
    # Two processes started together on a new file would otherwise both
    # see schema version 0 and both create the tables.
    migration_lock=("BEGIN IMMEDIATE",),
    consistent_read=("BEGIN",),
    unavailable=_unavailable,
)


def _open(connection: sqlite3.Connection) -> None:
    """
    Set up a new connection (on the database thread).

    Turning a new file to WAL takes its lock, and SQLite answers "locked"
    at once rather than waiting when another process is doing the same, so
    processes started together on a new file try again for a few seconds.
    """
    for attempt in range(_WAL_TRIES):
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as e:
            if attempt == _WAL_TRIES - 1 or not _unavailable(e):
                raise
            time.sleep(0.02)
    connection.execute("PRAGMA synchronous=FULL")


_WAL_TRIES = 250


def _create_private(path: str) -> None:
    """
    Create a new database file readable by its owner only: it holds the
    targets' credentials (provider API keys).  SQLite takes an empty file
    for a new database, and gives its WAL and shared-memory files the same
    mode.  An existing file keeps the mode its owner gave it.
    """
    if path == ":memory:" or path.startswith("file:"):
        return
    with suppress(FileExistsError):
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))


class SQLiteStore(SQLStore):
    """
    Configuration in one SQLite file.
    """

    def __init__(
        self, reactor: IReactorThreads, path: str, timeout: float = 5.0
    ) -> None:
        """
        @param timeout: seconds a write waits for another process's lock on
            the file before the store is reported unavailable.
        """
        self.path = path
        _create_private(path)
        super().__init__(
            adbapi.ConnectionPool(
                "sqlite3",
                path,
                timeout=timeout,
                check_same_thread=False,
                cp_min=1,
                cp_max=1,
                cp_openfun=_open,
                cp_reactor=reactor,
            ),
            SQLITE,
        )


__all__ = ["MIGRATIONS", "SQLiteStore"]

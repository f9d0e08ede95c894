# -*- test-case-name: tests.test_store -*-
"""
The embedded SQLite store, the default.

Calls run on one dedicated database thread through L{adbapi.ConnectionPool}
(SQLite has one writer anyway), so the reactor never waits on disk; each
write is one transaction committed with C{synchronous=FULL}, so a change is
on disk when the Admin API answers.

Several gateway processes on one machine may open the same file (WAL mode
lets them read while one writes): every write transaction starts by moving
the configuration version on only if it is still the one the writer
validated against, so the compare and the write are one atomic step, and a
writer that finds the file locked waits for it (C{timeout}) rather than
failing.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads
from zope.interface import implementer

from ..config import empty_records
from .interfaces import IStore, Record, StaleConfiguration

# Forward migrations, applied in order; the index + 1 is the schema version.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        "CREATE TABLE entities ("
        " kind TEXT NOT NULL,"
        " id TEXT NOT NULL PRIMARY KEY,"
        " data TEXT NOT NULL)",
        "CREATE INDEX entities_kind ON entities (kind)",
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
        "INSERT INTO meta VALUES ('config_version', 0)",
    ),
)


def migrate(cursor: Any) -> int:
    """
    Bring the schema up to date.

    The whole check-and-migrate is one immediate transaction: two
    processes started together on a new file would otherwise both see
    version 0 and both create the tables.

    @return: the schema version.
    """
    cursor.execute("BEGIN IMMEDIATE")
    cursor.execute(
        "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"
    )
    cursor.execute("SELECT version FROM schema_version")
    row = cursor.fetchone()
    current = row[0] if row else 0
    if row is None:
        cursor.execute("INSERT INTO schema_version VALUES (0)")
    if current > len(MIGRATIONS):
        raise RuntimeError(
            f"database schema version {current} is newer than this aigateway "
            f"({len(MIGRATIONS)}): upgrade aigateway"
        )
    for version in range(current, len(MIGRATIONS)):
        for statement in MIGRATIONS[version]:
            cursor.execute(statement)
        cursor.execute("UPDATE schema_version SET version = ?", (version + 1,))
    return len(MIGRATIONS)


def _version(cursor: Any) -> int:
    cursor.execute("SELECT value FROM meta WHERE key = 'config_version'")
    return int(cursor.fetchone()[0])


def _bump(cursor: Any, expected: int | None) -> int:
    """
    Move the configuration version on, first thing in a write transaction
    (it takes SQLite's write lock, so nobody else writes until commit).

    @raise StaleConfiguration: the stored version is not C{expected}.
    """
    if expected is None:
        cursor.execute("UPDATE meta SET value = value + 1 WHERE key = 'config_version'")
    else:
        cursor.execute(
            "UPDATE meta SET value = value + 1"
            " WHERE key = 'config_version' AND value = ?",
            (expected,),
        )
        if cursor.rowcount != 1:
            raise StaleConfiguration(expected)
    return _version(cursor)


def _put(cursor: Any, kind: str, record: Record) -> None:
    cursor.execute(
        "INSERT OR REPLACE INTO entities (kind, id, data) VALUES (?, ?, ?)",
        (kind, record["id"], json.dumps(record, sort_keys=True)),
    )


def _open(connection: sqlite3.Connection) -> None:
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")


@implementer(IStore)
class SQLiteStore:
    """
    Configuration in one SQLite file.
    """

    def __init__(self, reactor: IReactorThreads, path: str) -> None:
        self.path = path
        self._pool = adbapi.ConnectionPool(
            "sqlite3",
            path,
            check_same_thread=False,
            cp_min=1,
            cp_max=1,
            cp_openfun=_open,
            cp_reactor=reactor,
        )

    def start(self) -> Deferred[int]:
        """
        Open the database and apply pending migrations.
        """
        return self._pool.runInteraction(migrate)

    def load(self) -> Deferred[tuple[int, dict[str, dict[str, dict[str, Any]]]]]:
        def read(cursor: Any) -> tuple[int, dict[str, dict[str, dict[str, Any]]]]:
            records = empty_records()
            cursor.execute("SELECT kind, id, data FROM entities")
            # One read transaction, so the version is that of the records
            # even while another process writes.
            cursor.execute("BEGIN")
            cursor.execute("SELECT kind, id, data FROM entities")
            for kind, id, data in cursor.fetchall():
                records.setdefault(kind, {})[id] = json.loads(data)
            return _version(cursor), records

        return self._pool.runInteraction(read)

    def version(self) -> Deferred[int]:
        return self._pool.runInteraction(_version)

    def write(
        self,
        puts: Sequence[tuple[str, Record]],
        deletes: Sequence[tuple[str, str]],
        expected: int | None = None,
    ) -> Deferred[int]:
        def transaction(cursor: Any) -> int:
            version = _bump(cursor, expected)
            for kind, record in puts:
                _put(cursor, kind, record)
            for kind, id in deletes:
                cursor.execute(
                    "DELETE FROM entities WHERE kind = ? AND id = ?", (kind, id)
                )
            return version

        return self._pool.runInteraction(transaction)

    def replace(
        self, records: Mapping[str, Mapping[str, Record]], expected: int | None = None
    ) -> Deferred[int]:
        def transaction(cursor: Any) -> int:
            version = _bump(cursor, expected)
            cursor.execute("DELETE FROM entities")
            for kind, by_id in records.items():
                for record in by_id.values():
                    _put(cursor, kind, record)
            return version

        return self._pool.runInteraction(transaction)

    def ping(self) -> Deferred[bool]:
        d = self._pool.runQuery("SELECT 1")
        d.addCallbacks(lambda rows: rows == [(1,)], lambda failure: False)
        return d

    def close(self) -> Deferred[None]:
        d: Deferred[None] = self._pool.runInteraction(lambda cursor: None)
        d.addBoth(lambda _: self._pool.close())
        return d

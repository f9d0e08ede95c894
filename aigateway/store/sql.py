# -*- test-case-name: tests.test_store,tests.test_feed -*-
"""
The configuration store over SQL, for any database with a DB-API module:
the transactions are the same for SQLite and PostgreSQL, and a L{Dialect}
says what differs (placeholders, upsert, how to serialise migrations and
take a consistent read).

Entities are kept as JSON documents in one table, keyed by id, with the
configuration version in a C{meta} row.  Calls run on Twisted's thread pool
through L{adbapi.ConnectionPool}, so the reactor never waits on the
database, and every write is one transaction, durable when it returns.

A write transaction starts by moving the configuration version on only if
it is still the version the write was validated against.  That UPDATE
takes the version row's lock (SQLite's write lock, a PostgreSQL row lock),
so the compare and the write are one atomic step across every process that
shares the database: a second writer waits for the first to commit, then
finds the version moved and writes nothing (L{StaleConfiguration}).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from zope.interface import implementer

from ..config import empty_records
from .interfaces import IStore, Record, StaleConfiguration, StoreUnavailable

# Forward migrations, applied in order; the index + 1 is the schema version.
# Written with "?" placeholders and types both databases read alike.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        "CREATE TABLE entities ("
        " kind TEXT NOT NULL,"
        " id TEXT NOT NULL PRIMARY KEY,"
        " data TEXT NOT NULL)",
        "CREATE INDEX entities_kind ON entities (kind)",
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL)",
        "INSERT INTO meta VALUES ('config_version', 0)",
    ),
)


@attrs.frozen
class Dialect:
    """
    What one database says differently.

    @ivar placeholder: the DB-API parameter marker (C{?} or C{%s}).
    @ivar upsert: insert-or-replace of C{(kind, id, data)}, with C{?}.
    @ivar migration_lock: statements that open the migration transaction
        so that only one process migrates at a time.
    @ivar consistent_read: statements that open a transaction whose reads
        all see one committed state.
    @ivar unavailable: whether an error the driver raised means the
        database is out of reach or busy (a server down, a lock held past
        the wait), as opposed to a bug in a statement, which must not be
        taken for an outage.
    """

    placeholder: str
    upsert: str
    migration_lock: tuple[str, ...]
    consistent_read: tuple[str, ...]
    unavailable: Callable[[BaseException], bool]

    def sql(self, statement: str) -> str:
        """
        C{statement}, written with C{?}, in this database's parameter style.
        """
        return statement.replace("?", self.placeholder)


def _version(cursor: Any) -> int:
    cursor.execute("SELECT value FROM meta WHERE key = 'config_version'")
    return int(cursor.fetchone()[0])


@implementer(IStore)
class SQLStore:
    """
    Configuration in a SQL database reached through C{pool}.
    """

    def __init__(self, pool: adbapi.ConnectionPool, dialect: Dialect) -> None:
        self._pool = pool
        self._dialect = dialect

    def _run(self, interaction: Callable[..., Any]) -> Deferred[Any]:
        """
        Run C{interaction} in one transaction on the pool's thread, with
        the database's being out of reach reported as L{StoreUnavailable}.
        """
        return self._pool.runInteraction(interaction).addErrback(self._failed)

    def _failed(self, failure: Failure) -> Failure:
        error = failure.value
        if error is not None and self._dialect.unavailable(error):
            raise StoreUnavailable(
                f"{type(error).__name__}: {failure.getErrorMessage()}"
            ) from error
        return failure

    def start(self) -> Deferred[int]:
        """
        Open the database and apply pending migrations.

        @return: a L{Deferred} firing with the schema version.
        """
        return self._run(self._migrate)

    def _migrate(self, cursor: Any) -> int:
        sql = self._dialect.sql
        for statement in self._dialect.migration_lock:
            cursor.execute(statement)
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
            cursor.execute(sql("UPDATE schema_version SET version = ?"), (version + 1,))
        return len(MIGRATIONS)

    def load(self) -> Deferred[tuple[int, dict[str, dict[str, dict[str, Any]]]]]:
        def read(cursor: Any) -> tuple[int, dict[str, dict[str, dict[str, Any]]]]:
            # One consistent read, so the version is that of the records
            # even while another process writes.
            for statement in self._dialect.consistent_read:
                cursor.execute(statement)
            records = empty_records()
            cursor.execute("SELECT kind, id, data FROM entities")
            for kind, id, data in cursor.fetchall():
                records.setdefault(kind, {})[id] = json.loads(data)
            return _version(cursor), records

        return self._run(read)

    def version(self) -> Deferred[int]:
        return self._run(_version)

    def write(
        self,
        puts: Sequence[tuple[str, Record]],
        deletes: Sequence[tuple[str, str]],
        expected: int | None = None,
    ) -> Deferred[int]:
        sql = self._dialect.sql

        def transaction(cursor: Any) -> int:
            version = self._bump(cursor, expected)
            for kind, record in puts:
                self._put(cursor, kind, record)
            for kind, id in deletes:
                cursor.execute(
                    sql("DELETE FROM entities WHERE kind = ? AND id = ?"), (kind, id)
                )
            return version

        return self._run(transaction)

    def replace(
        self, records: Mapping[str, Mapping[str, Record]], expected: int | None = None
    ) -> Deferred[int]:
        def transaction(cursor: Any) -> int:
            version = self._bump(cursor, expected)
            cursor.execute("DELETE FROM entities")
            for kind, by_id in records.items():
                for record in by_id.values():
                    self._put(cursor, kind, record)
            return version

        return self._run(transaction)

    def _bump(self, cursor: Any, expected: int | None) -> int:
        """
        Move the configuration version on, first thing in a write
        transaction (it takes the version row's lock, so nobody else writes
        until commit).

        @raise StaleConfiguration: the stored version is not C{expected}.
        """
        if expected is None:
            cursor.execute(
                "UPDATE meta SET value = value + 1 WHERE key = 'config_version'"
            )
        else:
            cursor.execute(
                self._dialect.sql(
                    "UPDATE meta SET value = value + 1"
                    " WHERE key = 'config_version' AND value = ?"
                ),
                (expected,),
            )
            if cursor.rowcount != 1:
                raise StaleConfiguration(expected)
        return _version(cursor)

    def _put(self, cursor: Any, kind: str, record: Record) -> None:
        cursor.execute(
            self._dialect.sql(self._dialect.upsert),
            (kind, record["id"], json.dumps(record, sort_keys=True)),
        )

    def ping(self) -> Deferred[bool]:
        d = self._pool.runQuery("SELECT 1")
        d.addCallbacks(lambda rows: list(rows) == [(1,)], lambda failure: False)
        return d

    def close(self) -> Deferred[None]:
        d: Deferred[None] = self._run(lambda cursor: None)
        d.addBoth(lambda _: self._pool.close())
        return d

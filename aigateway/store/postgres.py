# -*- test-case-name: tests.test_store,tests.test_feed -*-
"""
The PostgreSQL store, for several gateway nodes sharing one configuration
(C{--database postgresql://user:password@host:5432/dbname}).

The same transactions as the embedded store (L{aigateway.store.sql}),
through psycopg on Twisted's thread pool.  Nodes learn of each other's
changes through the change feed (L{aigateway.feed}), and a write validated
against a configuration that another node has since changed is refused by
the version row's lock and retried, so nodes never overwrite each other.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from twisted.enterprise import adbapi
from twisted.internet.interfaces import IReactorThreads

from .sql import Dialect, SQLStore

SCHEMES = ("postgresql", "postgres")

POSTGRES = Dialect(
    placeholder="%s",
    upsert=(
        "INSERT INTO entities (kind, id, data) VALUES (?, ?, ?)"
        " ON CONFLICT (id) DO UPDATE SET kind = EXCLUDED.kind, data = EXCLUDED.data"
    ),
    # A transaction-scoped advisory lock (the key is "aigw" in ASCII): nodes
    # started together migrate one after another.
    migration_lock=("SELECT pg_advisory_xact_lock(1634297719)",),
    consistent_read=("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ",),
)


def is_postgres(database: str) -> bool:
    """
    Whether C{--database} names a PostgreSQL server rather than a file.
    """
    return urlsplit(database).scheme in SCHEMES


def redacted(url: str) -> str:
    """
    C{url} without its password, for logs and status answers.
    """
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username or ''}:***@{host}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


class PostgresStore(SQLStore):
    """
    Configuration in a PostgreSQL database.
    """

    def __init__(self, reactor: IReactorThreads, url: str) -> None:
        self.url = redacted(url)
        options = {} if "connect_timeout" in url else {"connect_timeout": 10}
        super().__init__(
            adbapi.ConnectionPool(
                "psycopg",
                url,
                # One connection a node: its writes are serialised anyway,
                # and a cluster of many nodes stays light on the server.
                cp_min=1,
                cp_max=1,
                # A connection the server dropped (a restart, a failover) is
                # replaced on the next call instead of failing every call.
                cp_reconnect=True,
                cp_reactor=reactor,
                **options,
            ),
            POSTGRES,
        )

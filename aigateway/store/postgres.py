# -*- test-case-name: tests.test_store,tests.test_feed,tests.test_store_outage -*-
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


def _unavailable(error: BaseException) -> bool:
    """
    A connection that failed or was lost (no SQLSTATE, or class 08), a
    server short of resources (53) or shutting down (57, which also holds
    a statement cancelled by C{statement_timeout}), or a lock not had in
    time (55P03).
    """
    import psycopg

    if not isinstance(error, (psycopg.OperationalError, psycopg.InterfaceError)):
        return False
    state = getattr(error, "sqlstate", None)
    return state is None or state[:2] in ("08", "53", "57") or state == "55P03"


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
    unavailable=_unavailable,
)


def is_postgres(database: str) -> bool:
    """
    Whether C{--database} names a PostgreSQL server rather than a file.
    """
    return urlsplit(database).scheme in SCHEMES


def redacted(url: str) -> str:
    """
    C{url} without its password (in the authority or as a C{password=}
    parameter), for logs, errors and status answers.
    """
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        host = netloc.rpartition("@")[2]
        netloc = f"{parts.username or ''}:***@{host}"
    query = "&".join(
        "password=***" if item.lower().startswith("password=") else item
        for item in parts.query.split("&")
    )
    return urlunsplit(parts._replace(netloc=netloc, query=query))


# Connection settings a gateway node wants unless the URL says otherwise:
# a server that stops answering is found out in seconds (the change feed
# and Admin API wait on it, never the proxy), and a node that vanished
# while holding the version row's lock does not block the others for long.
_DEFAULTS = {
    "connect_timeout": "10",
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
    # Keepalives only probe an idle connection: a query waiting on a server
    # that went silent would otherwise wait for TCP's retransmissions
    # (about 15 minutes on Linux).
    "tcp_user_timeout": "15000",
    "options": (
        "-c lock_timeout=5000 -c statement_timeout=30000"
        " -c idle_in_transaction_session_timeout=60000"
    ),
}


def connection_settings(url: str) -> dict[str, str]:
    """
    What to add to C{url} when connecting: L{_DEFAULTS} it does not set.

    @raise ValueError: C{url} is not a valid PostgreSQL URL (the message
        names it without its password).
    """
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    try:
        given = conninfo_to_dict(url)
    except ProgrammingError:
        raise ValueError(f"{redacted(url)} is not a valid PostgreSQL URL") from None
    return {k: v for k, v in _DEFAULTS.items() if k not in given}


class _Connection(adbapi.Connection):
    """
    adbapi's connection, quiet about a connection the server dropped.

    adbapi rolls back a failed call, and when the rollback fails it logs a
    traceback twice (here and in the pool) before taking a new connection.
    During an outage every call fails that way on every node, and the
    tracebacks say nothing that the gateway's own line ("the configuration
    store is unavailable", then "answers again") does not.  A transaction
    whose connection is lost is lost with it (the server rolls it back), so
    there is nothing to roll back: the connection is let go quietly, the
    call fails with its own error (which its caller gets as
    L{aigateway.store.interfaces.StoreUnavailable}), and the next call
    opens a new connection, as with adbapi.  A rollback that fails on a
    connection still up (or one lost during the rollback itself) is
    another matter, and adbapi logs it as before.
    """

    def rollback(self) -> None:
        connection = self._connection
        # psycopg's closed: libpq saw the connection fail (the server ended
        # it, the network reset it or timed out), or it was closed.
        if connection is not None and connection.closed:
            self._pool.disconnect(connection)
            return
        super().rollback()


class _ConnectionPool(adbapi.ConnectionPool):
    """
    adbapi's pool, with connections that are quiet about an outage.
    """

    connectionFactory = _Connection


class PostgresStore(SQLStore):
    """
    Configuration in a PostgreSQL database.
    """

    def __init__(self, reactor: IReactorThreads, url: str) -> None:
        self.url = redacted(url)
        options = connection_settings(url)
        super().__init__(
            _ConnectionPool(
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

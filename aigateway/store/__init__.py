"""
Where configuration is kept: L{IStore} and its implementations.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorThreads

from .postgres import PostgresStore, is_postgres
from .sql import SQLStore
from .sqlite import SQLiteStore


def open_store(reactor: IReactorThreads, database: str) -> SQLStore:
    """
    The store C{--database} names: a C{postgresql://} URL, or else an
    SQLite file path.
    """
    if is_postgres(database):
        return PostgresStore(reactor, database)
    return SQLiteStore(reactor, database)

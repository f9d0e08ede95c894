"""
The SQLite store: migrations, one transaction per write, durability.
"""

import sqlite3
import stat

import pytest
import pytest_twisted
from twisted.internet import reactor
from zope.interface.verify import verifyObject

from aigateway.store.interfaces import IStore
from aigateway.store.sqlite import MIGRATIONS, SQLiteStore


@pytest_twisted.ensureDeferred
async def test_write_load_and_reopen(tmp_path):
    path = str(tmp_path / "s.db")
    store = SQLiteStore(reactor, path)
    verifyObject(IStore, store)
    assert await store.start() == len(MIGRATIONS)
    version, records = await store.load()
    assert version == 0 and records["upstreams"] == {}
    up = {"id": "u1", "name": "a"}
    assert (
        await store.write(
            [("upstreams", up), ("targets", {"id": "t1", "target": "x:1"})], []
        )
        == 1
    )
    assert await store.write([], [("targets", "t1")]) == 2
    assert await store.ping() is True
    await store.close()

    # Durable on disk, readable without aigateway.
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version FROM schema_version").fetchone() == (
            len(MIGRATIONS),
        )
        assert db.execute("SELECT kind, id FROM entities").fetchall() == [
            ("upstreams", "u1")
        ]

    again = SQLiteStore(reactor, path)
    await again.start()
    version, records = await again.load()
    assert version == 2
    assert records["upstreams"] == {"u1": up}
    assert records["targets"] == {}
    assert await again.replace({"services": {"s1": {"id": "s1"}}}) == 3
    version, records = await again.load()
    assert records["upstreams"] == {} and list(records["services"]) == ["s1"]
    await again.close()


@pytest_twisted.ensureDeferred
async def test_newer_schema_refused(tmp_path):
    path = str(tmp_path / "new.db")
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        db.execute("INSERT INTO schema_version VALUES (99)")
    store = SQLiteStore(reactor, path)
    with pytest.raises(RuntimeError, match="newer than this aigateway"):
        await store.start()
    await store.close()


@pytest_twisted.ensureDeferred
async def test_a_new_database_is_its_owners_alone(tmp_path):
    """
    The file holds provider credentials: created for its owner only, with
    its WAL file alike; an existing file keeps the mode it has.
    """
    path = tmp_path / "private.db"
    store = SQLiteStore(reactor, str(path))
    await store.start()
    await store.write([("upstreams", {"id": "u1", "name": "a"})], [])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    wal = tmp_path / "private.db-wal"
    assert not wal.exists() or stat.S_IMODE(wal.stat().st_mode) == 0o600
    await store.close()

    shared = tmp_path / "shared.db"
    shared.touch(mode=0o640)
    shared.chmod(0o640)
    again = SQLiteStore(reactor, str(shared))
    await again.start()
    await again.close()
    assert stat.S_IMODE(shared.stat().st_mode) == 0o640

"""
A PostgreSQL outage in the log: the gateway says once that the store is
out of reach and once that it answers again, and twisted.enterprise.adbapi
adds no "Rollback failed" tracebacks for the connections the outage broke;
a rollback that fails on a connection still up is still logged.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import succeed
from twisted.logger import formatEvent

from aigateway.store.interfaces import StoreUnavailable
from aigateway.store.postgres import PostgresStore

from .gatewaykit import Gateway, log_events, wait_for
from .test_feed import _admit


def _tracebacks(events: list[dict]) -> list[str]:
    """
    The events that carry a traceback, or say a rollback failed.
    """
    return [
        formatEvent(e)
        for e in events
        if "log_failure" in e
        or e.get("isError")
        or "Rollback failed" in (formatEvent(e) or "")
    ]


@pytest_twisted.ensureDeferred
async def test_a_lost_connection_is_replaced_without_tracebacks(postgres_url):
    """
    The server ends the store's connection and refuses new ones for a
    while: calls fail as L{StoreUnavailable}, nothing is logged, and the
    store works again once the server lets it in.
    """
    store = PostgresStore(reactor, postgres_url)
    try:
        await store.start()
        assert await store.write([("upstreams", {"id": "u1", "name": "a"})], []) == 1
        with log_events() as logged:
            _admit(postgres_url, False)
            try:
                # The connection is found dead, then new ones are refused.
                for _ in range(3):
                    with pytest.raises(StoreUnavailable):
                        await store.version()
                    assert await store.ping() is False
            finally:
                _admit(postgres_url, True)
            assert await store.version() == 1
            assert (
                await store.write([("upstreams", {"id": "u2", "name": "b"})], []) == 2
            )
        assert _tracebacks(logged) == []

        # Ended once more, and let in at once: the next call but one works.
        with log_events() as logged:
            _admit(postgres_url, False)
            _admit(postgres_url, True)
            with pytest.raises(StoreUnavailable):
                await store.version()
            version, records = await store.load()
            assert version == 2 and sorted(records["upstreams"]) == ["u1", "u2"]
        assert _tracebacks(logged) == []
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_a_rollback_failing_on_a_live_connection_is_still_logged(postgres_url):
    """
    A real rollback failure (psycopg refuses a rollback inside its own
    transaction block) is not an outage: it is logged as before, the
    caller gets the call's own error, and the next call gets a new
    connection.
    """
    store = PostgresStore(reactor, postgres_url)

    def broken(cursor):
        cursor.execute("SELECT 1")
        # psycopg's own transaction block, left open (and held: one nobody
        # holds ends with it): psycopg refuses a rollback() within it.
        block = cursor._connection._connection.transaction()
        block.__enter__()
        raise ValueError("the call's own error")

    try:
        await store.start()
        with log_events() as logged, pytest.raises(ValueError, match="own"):
            await store._run(broken)
        assert any("Rollback failed" in text for text in _tracebacks(logged))
        assert await store.version() == 0
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_a_node_logs_an_outage_in_two_lines(postgres_url):
    """
    A gateway node over PostgreSQL through an outage: its feed and Admin
    API meet the broken connection and the refused ones; the log has the
    outage's line and the recovery's, and no traceback.
    """
    node = await Gateway(postgres_url, db_update_frequency=0.1).start()
    outage = node.service.parts.outage
    try:
        assert (await node.admin.post("/upstreams", form={"name": "a"})).code == 201
        with log_events() as logged:
            _admit(postgres_url, False)
            try:
                await wait_for(lambda: succeed(outage.failing), 5.0, 0.05)
                reply = await node.admin.post("/upstreams", form={"name": "b"})
                assert reply.code == 503
            finally:
                _admit(postgres_url, True)
            await wait_for(lambda: succeed(not outage.failing), 10.0, 0.05)
            reply = await node.admin.post("/upstreams", form={"name": "b"})
            assert reply.code == 201, reply.body
        assert _tracebacks(logged) == []
        feed = [e for e in logged if e.get("log_namespace") == "aigateway.feed"]
        assert len(feed) == 2
        assert "unavailable" in feed[0]["log_format"]
        assert "answers again" in feed[1]["log_format"]
    finally:
        await node.stop()

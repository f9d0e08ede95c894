"""
A configuration store that stops answering instead of refusing (a
database server stopped, or cut off without a reset): the node records the
outage once a look has gone unanswered for L{PATIENCE} seconds (the metric
says 0, one warning is logged), does not queue a look per change-feed tick
or admin call behind the one in flight, and puts the late answer in force,
which ends the outage (logged once).  A write it holds is answered 503
after L{WRITE_PATIENCE} seconds, and lands (in the store and in force
alike) if the store answers later.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from aigateway.admin.declarative import apply_document
from aigateway.admin.entities import PATIENCE, WRITE_PATIENCE, Entities
from aigateway.admin.errors import AdminError
from aigateway.balancer.backup import build_balancer
from aigateway.feed import ConfigFeed
from aigateway.health.hook import build_health
from aigateway.runtime import Runtime
from aigateway.store.sqlite import SQLiteStore

from .gatewaykit import (
    Gateway,
    TargetResource,
    address,
    listen,
    log_events,
    sample,
    scrape,
    sleep,
    wait_for,
)
from .test_server import connect


class _Holding:
    """
    Calls on the store held unanswered while C{hung}, as a stopped database
    server holds them, until L{answer}.
    """

    def __init__(self) -> None:
        self.hung = False
        self.held: list[tuple[Deferred[Any], Callable[[], Deferred[Any]]]] = []

    def hold(self, call: Callable[[], Deferred[Any]]) -> Deferred[Any]:
        if not self.hung:
            return call()
        waiting: Deferred[Any] = Deferred()
        self.held.append((waiting, call))
        return waiting

    def answer(self) -> None:
        """
        The server answers again: every held call is made now, and answers
        with what the store holds now.
        """
        self.hung = False
        held, self.held = self.held, []
        for waiting, call in held:
            call().chainDeferred(waiting)


class _Hung(SQLiteStore):
    """
    An SQLite store whose version looks and writes can be held.
    """

    def __init__(self, path: str) -> None:
        super().__init__(reactor, path)
        self.holding = _Holding()

    def version(self):
        return self.holding.hold(lambda: SQLiteStore.version(self))

    def write(self, puts, deletes, expected=None):
        return self.holding.hold(
            lambda: SQLiteStore.write(self, puts, deletes, expected)
        )

    def replace(self, records, expected=None):
        return self.holding.hold(lambda: SQLiteStore.replace(self, records, expected))


async def _write_elsewhere(path: str, name: str, **fields: Any) -> None:
    """
    Another node creates upstream C{name} (or sets C{fields} on it) in the
    store at C{path}.
    """
    other = SQLiteStore(reactor, path)
    await other.start()
    writer = Entities(other, Runtime(build_health(reactor), build_balancer), reactor)
    try:
        await writer.create_or_update("upstreams", {"name": name, **fields}, True)
    finally:
        await writer.close()
        await other.close()


def _messages(logged: list[dict]) -> list[str]:
    return [
        "unavailable" if "unavailable" in e["log_format"] else "answers again"
        for e in logged
    ]


@attrs.frozen
class _Node:
    """
    A node's L{Entities} and change feed (every second) on a clock, over a
    store whose calls can be held.
    """

    store: _Hung
    clock: Clock
    entities: Entities


@pytest_twisted.async_yield_fixture
async def on_clock(tmp_path) -> AsyncIterator[_Node]:
    store = _Hung(str(tmp_path / "hung.db"))
    await store.start()
    clock = Clock()
    entities = Entities(store, Runtime(build_health(reactor), build_balancer), clock)
    feed = ConfigFeed(clock, entities.refresh, 1.0)
    feed.start()
    yield _Node(store, clock, entities)
    feed.stop()
    store.holding.answer()  # (a failed test must not hold close())
    await entities.close()
    await store.close()


@pytest_twisted.ensureDeferred
async def test_a_look_left_unanswered_is_an_outage_until_it_answers(on_clock):
    store, clock, entities = on_clock.store, on_clock.clock, on_clock.entities
    with log_events("aigateway.feed") as logged:
        store.holding.hung = True
        clock.advance(1.0)  # the feed's first look
        assert len(store.holding.held) == 1
        clock.advance(PATIENCE - 0.1)
        assert not entities.outage.failing and logged == []
        clock.advance(0.1)
        assert entities.outage.failing
        assert _messages(logged) == ["unavailable"]
        assert "no answer within 2 s" in str(logged[0]["error"])
        # Ticks and admin calls meanwhile share the look in flight.
        waits = [entities.refresh() for _ in range(3)]
        clock.pump([1.0] * 30)
        assert len(store.holding.held) == 1
        assert _messages(logged) == ["unavailable"]

        # Another node wrote meanwhile; the store answers at last.
        await _write_elsewhere(store.path, "a")
        store.holding.answer()
        assert await waits[0] is True
        names = [u.name for u in entities.snapshot.upstreams.values()]
        assert names == ["a"]
        assert not entities.outage.failing
        assert _messages(logged) == ["unavailable", "answers again"]
        # The feed looks again an interval later, and finds nothing new.
        clock.advance(1.0)
        await wait_for(lambda: succeed(not entities._lock.locked), 5.0, 0.01)
        assert store.holding.held == [] and not entities.outage.failing
    assert _messages(logged) == ["unavailable", "answers again"]
    # Nothing left on the clock but the feed's next look.
    assert len(clock.getDelayedCalls()) == 1


@pytest_twisted.ensureDeferred
async def test_a_write_left_unanswered_holds_the_feed_and_is_noticed(on_clock):
    """
    A write the store does not answer holds the lock the feed's look waits
    for: the look's wait is timed from the tick, so the outage is noticed
    all the same, and the write's late answer ends it.
    """
    store, clock, entities = on_clock.store, on_clock.clock, on_clock.entities
    with log_events("aigateway.feed") as logged:
        store.holding.hung = True
        created = entities.create("upstreams", {"name": "b"}, True)
        clock.advance(1.0)  # the feed's look, behind the write
        assert len(store.holding.held) == 1 and entities._lock.locked
        clock.advance(PATIENCE)
        assert entities.outage.failing
        store.holding.answer()
        assert (await created)["name"] == "b"
        await wait_for(lambda: succeed(not entities._lock.locked), 5.0, 0.01)
        assert not entities.outage.failing
    assert _messages(logged) == ["unavailable", "answers again"]


@pytest_twisted.ensureDeferred
async def test_the_metric_says_a_silent_store_is_unreachable(
    tmp_path, servers, monkeypatch
):
    """
    End to end, on the real reactor: the feed (every 0.1 s) meets a store
    that stops answering; the metric drops to 0 after the patience while
    the proxy serves on, and is back to 1 once the store answers.
    """
    holding = _Holding()
    looks = SQLiteStore.version
    monkeypatch.setattr(
        SQLiteStore, "version", lambda self: holding.hold(lambda: looks(self))
    )
    servers.append(port := listen(TargetResource("t")))
    node = await Gateway(str(tmp_path / "silent.db"), db_update_frequency=0.1).start()
    outage = node.service.parts.outage

    async def reachable() -> float:
        return sample(await scrape(node), "aigateway_datastore_reachable")

    try:
        await node.configure("up", {address(port): 100})
        with log_events("aigateway.feed") as logged:
            holding.hung = True
            took = await wait_for(lambda: succeed(outage.failing), 5.0, 0.05)
            assert took >= PATIENCE - 0.2
            assert await reachable() == 0
            assert (await node.proxy.get("/v1/models")).code == 200
            assert len(holding.held) == 1  # not one look per tick
            holding.answer()
            await wait_for(lambda: succeed(not outage.failing), 5.0, 0.05)
            assert await reachable() == 1
        assert _messages(logged) == ["unavailable", "answers again"]
    finally:
        holding.answer()
        await node.stop()


@pytest_twisted.ensureDeferred
async def test_postgres_that_stops_answering_is_noticed(postgres_url):
    """
    A real PostgreSQL look held by a lock another session keeps on the
    version's table (as a stopped server holds it, but for the server's
    own lock wait of 5 s): noticed after the patience, not after the
    server gives up, and over once the lock is let go.
    """
    import psycopg

    node = await Gateway(postgres_url, db_update_frequency=0.1).start()
    outage = node.service.parts.outage
    try:
        assert (await node.admin.post("/upstreams", form={"name": "a"})).code == 201
        with log_events("aigateway.feed") as logged:
            with psycopg.connect(postgres_url) as holder:
                holder.execute("LOCK TABLE meta IN ACCESS EXCLUSIVE MODE")
                took = await wait_for(lambda: succeed(outage.failing), 4.5, 0.05)
                assert PATIENCE - 0.2 <= took < 4.5
                assert "no answer within 2 s" in str(logged[0]["error"])
                scraped = await scrape(node)
                assert sample(scraped, "aigateway_datastore_reachable") == 0
                holder.rollback()
            await wait_for(lambda: succeed(not outage.failing), 5.0, 0.05)
            scraped = await scrape(node)
            assert sample(scraped, "aigateway_datastore_reachable") == 1
        assert _messages(logged) == ["unavailable", "answers again"]
    finally:
        await node.stop()


# -- a write the store does not answer ------------------------------------------


def _outcome(d: Deferred[Any]) -> list[Any]:
    """
    A list that gets C{d}'s result (or L{Failure}) when it has one.
    """
    outcome: list[Any] = []
    d.addBoth(outcome.append)
    return outcome


def _refusal(outcome: list[Any]) -> dict:
    """
    The body of the 503 that C{outcome} (of L{_outcome}) holds.
    """
    assert len(outcome) == 1 and isinstance(outcome[0], Failure), outcome
    error = outcome[0].value
    assert isinstance(error, AdminError) and error.status == 503
    return error.body


@pytest_twisted.ensureDeferred
async def test_a_write_left_unanswered_is_answered_503_and_lands_later(on_clock):
    """
    A write the store holds is answered after L{WRITE_PATIENCE} (503: it
    may or may not have been saved); a write queued behind it is dropped
    (nothing changed).  When the store answers, the first lands in the
    store and in force alike, and the log says so.
    """
    store, clock, entities = on_clock.store, on_clock.clock, on_clock.entities
    with log_events("aigateway.feed"), log_events("aigateway.admin.entities") as logged:
        store.holding.hung = True
        first = _outcome(entities.create("upstreams", {"name": "b"}, True))
        clock.advance(WRITE_PATIENCE - 0.1)
        assert first == []
        clock.advance(0.1)
        error = _refusal(first)
        assert "did not answer within 10 s" in error["message"]
        assert "may or may not have been saved" in error["message"]
        assert entities.outage.failing

        second = _outcome(entities.create("upstreams", {"name": "c"}, True))
        clock.advance(WRITE_PATIENCE)
        assert "nothing was changed" in _refusal(second)["message"]
        assert len(store.holding.held) == 1  # the second never reached it

        store.holding.answer()
        await _in_force(store, entities, ["b"])
        assert not entities.outage.failing
    assert ["saved after all" in e["log_format"] for e in logged] == [True]


@pytest_twisted.ensureDeferred
async def test_a_write_its_caller_gave_up_on_lands_in_force_too(on_clock):
    """
    A caller that stops waiting (an Admin API client that hangs up) does
    not stop a write the store holds: when it lands, it is in force too,
    not only in the store.
    """
    store, entities = on_clock.store, on_clock.entities
    store.holding.hung = True
    created = entities.create("upstreams", {"name": "b"}, True)
    created.addErrback(lambda failure: failure.trap(CancelledError))
    created.cancel()
    store.holding.answer()
    await _in_force(store, entities, ["b"])


@pytest.mark.parametrize("answered", ["timed out", "hung up"])
@pytest_twisted.ensureDeferred
async def test_a_write_whose_caller_was_answered_is_not_tried_again(on_clock, answered):
    """
    A write the store holds, whose caller was answered before it was over
    (told it may or may not have been saved, or gone), and that meets
    another node's change once the store answers: it is not validated and
    committed again on top of a change its caller never saw (which it
    would overwrite), but fails, and the log says it was not saved.
    """
    store, clock, entities = on_clock.store, on_clock.clock, on_clock.entities
    await entities.create("upstreams", {"name": "u", "tags": ["first"]}, True)
    with log_events("aigateway.feed"), log_events("aigateway.admin.entities") as logged:
        store.holding.hung = True
        late = entities.update("upstreams", "u", {"tags": ["late"]}, True)
        if answered == "timed out":
            told = _outcome(late)
            clock.advance(WRITE_PATIENCE)
            assert "may or may not have been saved" in _refusal(told)["message"]
        else:
            late.addErrback(lambda failure: failure.trap(CancelledError))
            late.cancel()
        # Its client reads it back on another node, and writes there.
        await _write_elsewhere(store.path, "u", tags=["newer"])
        store.holding.answer()
        for _ in range(100):  # (waits between attempts are on the clock)
            if not entities._lock.locked:
                break
            clock.advance(0.05)
            await sleep(0.01)
        assert not entities._lock.locked
        _, records = await store.load()
        assert [r["tags"] for r in records["upstreams"].values()] == [["newer"]]
        assert entities.find("upstreams", "u")["tags"] == ["newer"]
        assert not entities.outage.failing
    (event,) = [e for e in logged if "no longer waited" in e["log_format"]]
    assert "was not saved" in event["log_format"]
    assert "not tried again" in str(event["error"])


@pytest.mark.parametrize("write", ["create", "replace"])
@pytest_twisted.ensureDeferred
async def test_a_write_that_lands_once_closed_is_not_put_in_force(on_clock, write):
    """
    A write the store answers only after the node closed (the service
    stops waiting for it) is stored, for the next start to load, but not
    put in force: that would start health checks again on a stopped node.
    """
    store, clock, entities = on_clock.store, on_clock.clock, on_clock.entities
    before = entities.snapshot.version
    with log_events("aigateway.feed"), log_events("aigateway.admin.entities") as logged:
        store.holding.hung = True
        if write == "create":
            late = entities.create("upstreams", {"name": "b"}, True)
        else:
            document = {"_format_version": "3.0", "upstreams": [{"name": "b"}]}
            late = Deferred.fromCoroutine(apply_document(entities, clock, document))
        told = _outcome(late)
        clock.advance(WRITE_PATIENCE)
        _refusal(told)
        closed = entities.close()
        store.holding.answer()
        await closed
        _, records = await store.load()
    assert [r["name"] for r in records["upstreams"].values()] == ["b"]
    assert entities.snapshot.version == before
    assert entities.snapshot.upstreams == {}
    assert ["once this node had closed" in e["log_format"] for e in logged] == [True]


async def _in_force(store: Any, entities: Entities, names: list[str]) -> None:
    """
    Once the writes are over, the store holds the upstreams C{names}, and
    so does the configuration in force, at the store's version.
    """
    await wait_for(lambda: succeed(not entities._lock.locked), 5.0, 0.01)
    version, records = await store.load()
    assert [r["name"] for r in records["upstreams"].values()] == names
    assert entities.snapshot.version == version
    assert [u.name for u in entities.snapshot.upstreams.values()] == names


@pytest_twisted.ensureDeferred
async def test_an_admin_write_the_store_holds_is_answered_in_time(
    tmp_path, monkeypatch
):
    """
    End to end, on the real reactor: a POST whose write the store holds
    is answered 503 in Kong's shape after the write patience instead of
    waiting for the store, and lands once the store answers.
    """
    holding, node = await _held_node(tmp_path, monkeypatch)
    node.service.parts.entities.write_patience = 0.5
    try:
        holding.hung = True
        start = reactor.seconds()
        posted = Deferred.fromCoroutine(
            node.admin.post("/upstreams", form={"name": "b"})
        )
        reply = await posted.addTimeout(5.0, reactor)
        assert 0.4 <= reactor.seconds() - start < 2.0
        assert reply.code == 503, reply.body
        assert reply.headers.getRawHeaders("content-type") == [
            "application/json; charset=utf-8"
        ]
        assert "may or may not have been saved" in reply.json["message"]
        holding.answer()

        async def landed() -> bool:
            reply = await node.admin.get("/upstreams")
            return [u["name"] for u in reply.json["data"]] == ["b"]

        await wait_for(landed, 5.0, 0.05)
        _, records = await node.service.store.load()
        assert [r["name"] for r in records["upstreams"].values()] == ["b"]
    finally:
        holding.answer()
        await node.stop()


@pytest_twisted.ensureDeferred
async def test_an_admin_client_hanging_up_mid_write_is_not_an_error(
    tmp_path, monkeypatch
):
    """
    A client that hangs up while its write waits on the store: the write
    lands, and nothing is logged as a failed request (it did not fail).
    """
    holding, node = await _held_node(tmp_path, monkeypatch)
    try:
        with log_events("aigateway.admin.app") as logged:
            holding.hung = True
            client = await connect(node.service.admin_port.getHost().port)
            client.transport.write(
                b"POST /upstreams HTTP/1.1\r\nHost: a\r\n"
                b"Content-Type: application/x-www-form-urlencoded\r\n"
                b"Content-Length: 6\r\n\r\nname=b"
            )
            await wait_for(lambda: succeed(bool(holding.held)), 5.0, 0.01)
            client.transport.loseConnection()
            await client.closed
            holding.answer()

            async def landed() -> bool:
                reply = await node.admin.get("/upstreams")
                return [u["name"] for u in reply.json["data"]] == ["b"]

            await wait_for(landed, 5.0, 0.05)
        assert [e["log_format"] for e in logged] == []
    finally:
        holding.answer()
        await node.stop()


async def _held_node(tmp_path: Any, monkeypatch: Any) -> tuple[_Holding, Gateway]:
    """
    A gateway node on a SQLite store whose writes the returned holding can
    hold (C{hung}) and let go (C{answer}).
    """
    holding = _Holding()
    writes = SQLiteStore.write
    monkeypatch.setattr(
        SQLiteStore,
        "write",
        lambda self, *a: holding.hold(lambda: writes(self, *a)),
    )
    return holding, await Gateway(str(tmp_path / "held.db")).start()

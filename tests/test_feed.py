"""
Several gateway processes sharing one configuration store: the change
feed that brings other processes' writes in force, writes validated
against a stale snapshot refused by the store and retried, and start-up of
several processes on one new database file.
"""

from __future__ import annotations

import sqlite3
from typing import Any
from urllib.parse import urlsplit

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from aigateway.admin.entities import Entities
from aigateway.admin.errors import AdminError
from aigateway.admin.site import FreshResource
from aigateway.balancer.backup import build_balancer
from aigateway.feed import ConfigFeed, Outage
from aigateway.health.hook import build_health
from aigateway.runtime import Runtime
from aigateway.store import open_store
from aigateway.store.interfaces import StaleConfiguration, StoreUnavailable
from aigateway.store.sqlite import SQLiteStore

from .gatewaykit import (
    Gateway,
    TargetResource,
    address,
    listen,
    log_events,
    sample,
    scrape,
    wait_for,
)

# -- the feed, on a clock -------------------------------------------------


class _Refresh:
    """
    A stand-in for L{Entities.refresh} that records its calls and answers
    with what the test queues.
    """

    def __init__(self) -> None:
        self.calls = 0
        self.answers: list[Deferred[bool]] = []

    def __call__(self) -> Deferred[bool]:
        self.calls += 1
        return self.answers.pop(0) if self.answers else succeed(False)


def test_feed_looks_every_interval_from_one_interval_after_start():
    clock, refresh = Clock(), _Refresh()
    feed = ConfigFeed(clock, refresh, 2.0)
    feed.start()
    assert refresh.calls == 0
    clock.advance(1.9)
    assert refresh.calls == 0
    clock.advance(0.1)
    assert refresh.calls == 1
    clock.pump([2.0] * 4)
    assert refresh.calls == 5
    feed.stop()
    clock.advance(10)
    assert refresh.calls == 5
    assert clock.getDelayedCalls() == []


def test_feed_looks_one_at_a_time():
    """
    A look that has not answered yet (a slow database) is not overlapped
    by the next: the next comes an interval after it answers.
    """
    clock, refresh = Clock(), _Refresh()
    slow: Deferred[bool] = Deferred()
    refresh.answers.append(slow)
    feed = ConfigFeed(clock, refresh, 1.0)
    feed.start()
    clock.advance(1.0)
    assert refresh.calls == 1
    clock.pump([1.0] * 5)
    assert refresh.calls == 1
    slow.callback(True)
    clock.advance(1.0)
    assert refresh.calls == 2
    feed.stop()


def test_feed_survives_a_failing_store():
    """
    A look that fails (the node's L{Outage} has been told, by the look
    itself) does not end the loop.
    """
    clock, refresh = Clock(), _Refresh()
    for _ in range(3):
        refresh.answers.append(fail(StoreUnavailable("server gone")))
    feed = ConfigFeed(clock, refresh, 1.0)
    feed.start()
    clock.pump([1.0] * 5)
    assert refresh.calls == 5
    feed.stop()


def test_an_outage_is_logged_once_and_its_end_once():
    outage = Outage()
    with log_events("aigateway.feed") as logged:
        for _ in range(3):
            outage.failed(Failure(StoreUnavailable("server gone")))
        assert outage.failing
        outage.answered()
        outage.answered()
        assert not outage.failing
    assert len(logged) == 2
    assert "unavailable" in logged[0]["log_format"]
    assert "answers again" in logged[1]["log_format"]


@pytest.mark.parametrize("interval", [0, -1])
def test_feed_needs_a_positive_interval(interval):
    with pytest.raises(ValueError):
        ConfigFeed(Clock(), _Refresh(), interval)


# -- the store: compare and write in one step ---------------------------------


@pytest_twisted.ensureDeferred
async def test_a_write_validated_against_a_stale_version_is_refused(database):
    one, two = open_store(reactor, database), open_store(reactor, database)
    try:
        await one.start()
        await two.start()
        assert await one.write([("upstreams", {"id": "u1", "name": "a"})], [], 0) == 1
        assert await two.version() == 1
        with pytest.raises(StaleConfiguration):
            await two.write([("upstreams", {"id": "u2", "name": "a"})], [], 0)
        with pytest.raises(StaleConfiguration):
            await two.replace({"upstreams": {}}, 0)
        version, records = await two.load()
        assert version == 1 and list(records["upstreams"]) == ["u1"]
        assert await two.write([("upstreams", {"id": "u2", "name": "b"})], [], 1) == 2
        assert await one.version() == 2
        # Without an expected version, a write applies whatever is stored.
        assert await one.write([], [("upstreams", "u1")]) == 3
        version, records = await two.load()
        assert version == 3 and list(records["upstreams"]) == ["u2"]
    finally:
        await one.close()
        await two.close()


@pytest_twisted.ensureDeferred
async def test_stores_started_together_on_a_new_database_migrate_once(database):
    stores = [open_store(reactor, database) for _ in range(4)]
    try:
        results = await DeferredList([s.start() for s in stores], consumeErrors=True)
        assert [ok for ok, _ in results] == [True] * 4, results
        assert {await s.version() for s in stores} == {0}
        pool = stores[0]._pool
        assert await pool.runQuery("SELECT COUNT(*) FROM schema_version") == [(1,)]
        assert await pool.runQuery("SELECT COUNT(*) FROM meta") == [(1,)]
    finally:
        for store in stores:
            await store.close()


# -- two nodes on one database -------------------------------------------------


@pytest_twisted.async_yield_fixture
async def pair(database):
    """
    Two nodes sharing one database (an SQLite file, then PostgreSQL):
    C{first} looks for changes every 0.1 s, C{second} never (so its proxy
    stays stale until its Admin API is called).
    """
    first = await Gateway(database, db_update_frequency=0.1).start()
    second = await Gateway(database, db_update_frequency=0).start()
    yield first, second
    await first.stop()
    await second.stop()


async def _version(node: Gateway) -> int:
    return (await node.admin.get("/status")).json["configuration_version"]


@pytest_twisted.ensureDeferred
async def test_a_change_on_one_node_is_served_by_the_other(pair, servers):
    first, second = pair
    servers.append(port := listen(TargetResource("t")))
    await second.configure("up", {address(port): 100})

    async def served() -> bool:
        return (await first.proxy.get("/v1/models")).code == 200

    await wait_for(served, 5.0, 0.05)
    # /metrics never reads the store: its version is what the feed brought.
    versions = [
        sample(await scrape(node), "aigateway_configuration_version")
        for node in (first, second)
    ]
    assert versions == [second.service.runtime.snapshot.version] * 2 == [4.0] * 2
    assert await _version(first) == await _version(second)
    listed = (await first.admin.get("/upstreams/up/targets")).json["data"]
    assert [t["target"] for t in listed] == [address(port)]


@pytest_twisted.ensureDeferred
async def test_the_admin_api_answers_from_the_store(pair):
    """
    The second node's change feed is off, yet its Admin API sees what the
    first one wrote, at once.
    """
    first, second = pair
    assert (await first.admin.post("/upstreams", form={"name": "a"})).code == 201
    assert (await second.admin.get("/upstreams/a")).code == 200
    reply = await second.admin.post("/upstreams", form={"name": "a"})
    assert reply.code == 409, reply.body
    reply = await second.admin.post(
        "/upstreams/a/targets", form={"target": "127.0.0.1:9"}
    )
    assert reply.code == 201, reply.body
    listed = (await first.admin.get("/upstreams/a/targets")).json["data"]
    assert [t["target"] for t in listed] == ["127.0.0.1:9"]


@pytest_twisted.ensureDeferred
async def test_a_write_validated_on_a_stale_view_is_validated_again(pair):
    """
    A write that was validated against a configuration another node has
    since changed (the race the Admin API's look at the store cannot
    close) is refused by the store, then validated again on the stored
    configuration: a name taken there is a 409, and nothing the other node
    wrote is overwritten.
    """
    first, second = pair
    stale = second.service.parts.entities
    assert (await first.admin.post("/upstreams", form={"name": "a"})).code == 201
    assert stale.snapshot.upstreams == {}  # not looked at the store yet
    with pytest.raises(AdminError) as caught:
        await stale.create("upstreams", {"name": "a"}, coerce=True)
    assert caught.value.status == 409
    assert [u.name for u in stale.snapshot.upstreams.values()] == ["a"]

    upstream = (await first.admin.get("/upstreams/a")).json["id"]
    assert (await first.admin.post("/upstreams", form={"name": "b"})).code == 201
    created = await stale.create(
        "targets", {"target": "127.0.0.1:9"}, coerce=True, parent=upstream
    )
    assert created["upstream"]["id"] == upstream
    names = sorted(
        u["name"] for u in (await first.admin.get("/upstreams")).json["data"]
    )
    assert names == ["a", "b"]
    listed = (await first.admin.get("/upstreams/a/targets")).json["data"]
    assert [t["target"] for t in listed] == ["127.0.0.1:9"]


@pytest_twisted.ensureDeferred
async def test_a_write_under_an_owner_deleted_elsewhere_is_not_found(pair):
    """
    A target created under an upstream that another node deleted while
    the write was on its way is a 404 (the URL names nothing now), not a
    foreign-key error about an id the client never sent.
    """
    first, second = pair
    stale = second.service.parts.entities
    assert (await first.admin.post("/upstreams", form={"name": "a"})).code == 201
    assert (await second.admin.get("/upstreams/a")).code == 200
    upstream = stale.find("upstreams", "a")["id"]
    assert (await first.admin.delete("/upstreams/a")).code == 204
    with pytest.raises(AdminError) as caught:
        await stale.create(
            "targets", {"target": "127.0.0.1:9"}, coerce=True, parent=upstream
        )
    assert caught.value.status == 404
    assert stale.snapshot.upstreams == {}
    assert (await first.admin.get("/upstreams/a/targets")).code == 404


@pytest_twisted.ensureDeferred
async def test_concurrent_writes_on_both_nodes_all_land(pair):
    first, second = pair
    assert (await first.admin.post("/upstreams", form={"name": "a"})).code == 201
    writes = [
        (first if n % 2 else second).admin.post(
            "/upstreams/a/targets", form={"target": f"127.0.0.1:{1000 + n}"}
        )
        for n in range(20)
    ]
    replies = await DeferredList(
        [Deferred.fromCoroutine(w) for w in writes], consumeErrors=True
    )
    assert [(ok, r.code) for ok, r in replies] == [(True, 201)] * 20
    await second.admin.post("/upstreams", form={"name": "b"})  # brings it up to date

    async def converged() -> bool:
        return await _version(first) == await _version(second)

    await wait_for(converged, 5.0, 0.05)
    for node in (first, second):
        listed = (await node.admin.get("/upstreams/a/targets")).json["data"]
        assert sorted(t["target"] for t in listed) == sorted(
            f"127.0.0.1:{1000 + n}" for n in range(20)
        )


@pytest_twisted.ensureDeferred
async def test_a_declarative_import_elsewhere_replaces_this_nodes_view(pair):
    first, second = pair
    assert (await first.admin.post("/upstreams", form={"name": "old"})).code == 201
    document = {"_format_version": "3.0", "upstreams": [{"name": "new"}]}
    reply = await second.admin.post("/config", json_body=document)
    assert reply.code in (200, 201), reply.body

    async def replaced() -> bool:  # through the first node's feed
        upstreams = first.service.runtime.snapshot.upstreams.values()
        return [u.name for u in upstreams] == ["new"]

    await wait_for(replaced, 5.0, 0.05)


@pytest_twisted.ensureDeferred
async def test_a_node_started_later_serves_the_stored_configuration(database, servers):
    servers.append(port := listen(TargetResource("t")))
    first = await Gateway(database).start()
    try:
        await first.configure("up", {address(port): 100})
    finally:
        await first.stop()
    later = await Gateway(database).start()
    try:
        reply = await later.proxy.get("/v1/models")
        assert reply.code == 200, reply.body
        assert reply.body == b"t"
    finally:
        await later.stop()


# -- the store out of reach -----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_locked_sqlite_file_is_unavailable_then_usable(tmp_path):
    """
    Another process holding the file's lock past the wait: the write is
    refused as unavailable, nothing is written, and the next write after
    the lock is released goes through.
    """
    path = str(tmp_path / "locked.db")
    store = SQLiteStore(reactor, path, timeout=0.1)
    try:
        await store.start()
        await store.write([("upstreams", {"id": "u1", "name": "a"})], [], 0)
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        try:
            with pytest.raises(StoreUnavailable, match="locked"):
                await store.write([("upstreams", {"id": "u2", "name": "b"})], [], 1)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        version, records = await store.load()
        assert version == 1 and list(records["upstreams"]) == ["u1"]
        assert await store.write([("upstreams", {"id": "u2", "name": "b"})], [], 1) == 2
    finally:
        await store.close()


def _admit(url: str, allowed: bool) -> None:
    """
    Let connections to the database of C{url} in, or cut the ones open and
    keep new ones out (as a server that went away would).
    """
    import psycopg

    name = urlsplit(url).path.lstrip("/")
    server = urlsplit(url)._replace(path="/postgres").geturl()
    with psycopg.connect(server, autocommit=True) as db:
        db.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(allowed).lower()}')
        if not allowed:
            db.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )


@pytest_twisted.ensureDeferred
async def test_postgres_out_of_reach_admin_503_proxy_serves_then_recovers(
    postgres_url, servers
):
    servers.append(port := listen(TargetResource("t")))
    node = await Gateway(postgres_url, db_update_frequency=0.1).start()
    with log_events("aigateway.feed") as logged:
        await _outage_and_recovery(node, port, postgres_url)
    outages = [e for e in logged if "unavailable" in e.get("log_format", "")]
    assert len(outages) == 1


async def _outage_and_recovery(node: Gateway, port: Any, postgres_url: str) -> None:
    try:
        await node.configure("up", {address(port): 100})
        _admit(postgres_url, False)
        outage = node.service.parts.outage
        # The change feed finds the outage by itself...
        await wait_for(lambda: succeed(outage.failing), 5.0, 0.05)
        # ...the proxy serves on, reads answer from the configuration in
        # force, a write is refused and changes nothing...
        for _ in range(3):
            assert (await node.proxy.get("/v1/models")).code == 200
        assert (await node.admin.get("/upstreams/up")).code == 200
        reply = await node.admin.post("/upstreams", form={"name": "b"})
        assert reply.code == 503, reply.body
        assert "configuration store is unavailable" in reply.json["message"]
        # ...but a target's health set by hand (this node's memory) is not...
        by_hand = f"/upstreams/up/targets/{address(port)}/unhealthy"
        assert (await node.admin.put(by_hand)).code in (200, 204)
        health = (await node.admin.get("/upstreams/up/health")).json["data"]
        assert [t["health"] for t in health] == ["UNHEALTHY"]
        assert (
            await node.admin.put(by_hand.replace("/unhealthy", "/healthy"))
        ).code in (200, 204)
        # ...and the status and metrics are answered without waiting on it.
        status = await node.admin.get("/status")
        assert status.code == 200 and status.json["database"]["reachable"] is False
        assert sample(await scrape(node), "aigateway_datastore_reachable") == 0

        _admit(postgres_url, True)

        async def recovered() -> bool:
            reply = await node.admin.post("/upstreams", form={"name": "b"})
            assert reply.code in (201, 503), reply.body
            return reply.code == 201

        await wait_for(recovered, 10.0, 0.1)
        names = sorted(
            u["name"] for u in (await node.admin.get("/upstreams")).json["data"]
        )
        assert names == ["b", "up"]
        assert not node.service.parts.outage.failing
        assert sample(await scrape(node), "aigateway_datastore_reachable") == 1
    finally:
        _admit(postgres_url, True)
        await node.stop()


# -- retries, timeouts and shutting down -----------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_retried_create_keeps_the_id_it_was_given(pair):
    first, second = pair
    stale = second.service.parts.entities
    assert (await first.admin.post("/upstreams", form={"name": "a"})).code == 201
    wanted = "0b9c6a52-7d3e-4c1f-9a61-2f8d4e7b5c10"
    created = await stale.create("upstreams", {"id": wanted, "name": "b"}, True)
    assert created["id"] == wanted
    assert (await first.admin.get(f"/upstreams/{wanted}")).json["name"] == "b"
    # And a retried create of an id that exists elsewhere is refused.
    assert (await first.admin.post("/upstreams", form={"name": "c"})).code == 201
    with pytest.raises(AdminError) as caught:
        await stale.create("upstreams", {"id": wanted, "name": "d"}, True)
    assert caught.value.status == 409


class _OutRaced(SQLiteStore):
    """
    A node that loses every race: another node writes just before each of
    its writes.
    """

    def __init__(self, path: str, rival: SQLiteStore) -> None:
        super().__init__(reactor, path)
        self.rival = rival
        self.attempts = 0

    def write(self, puts, deletes, expected=None):
        self.attempts += 1
        d = self.rival.write([], [], None)
        return d.addCallback(lambda _: SQLiteStore.write(self, puts, deletes, expected))


@pytest_twisted.ensureDeferred
async def test_a_write_that_never_wins_gives_up_with_a_clear_error(tmp_path):
    path = str(tmp_path / "raced.db")
    rival = SQLiteStore(reactor, path)
    store = _OutRaced(path, rival)
    entities = Entities(store, Runtime(build_health(reactor), build_balancer), reactor)
    try:
        await rival.start()
        await store.start()
        with pytest.raises(StoreUnavailable, match="kept changing"):
            await entities.create("upstreams", {"name": "a"}, True)
        assert store.attempts == 10
        version, records = await store.load()
        assert records["upstreams"] == {} and version == 10
    finally:
        await entities.close()
        await store.close()
        await rival.close()


class _Inner(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.rendered = 0

    def render(self, request):
        self.rendered += 1
        return b"inner"


def _admin_call(method: bytes, path: bytes) -> DummyRequest:
    request = DummyRequest([])
    request.method, request.path, request.uri = method, path, path
    return request


class _Silent(SQLiteStore):
    """
    A store whose version look never answers (a database server gone
    silent), until the test answers it.
    """

    def __init__(self, path: str) -> None:
        super().__init__(reactor, path)
        self.looks: list[Deferred[int]] = []

    def version(self):
        self.looks.append(Deferred())
        return self.looks[-1]


@pytest_twisted.ensureDeferred
async def test_admin_calls_while_the_store_does_not_answer(tmp_path):
    """
    Admin calls that wait on a look at the store stop waiting after the
    timeout: a read is answered from the configuration in force, a write is
    refused with 503.  They share the one look in flight (no look queued
    per call), status and metrics do not wait, and when the store answers
    at last the look's result is put in force and the lock let go.
    """
    store = _Silent(str(tmp_path / "silent.db"))
    await store.start()
    clock, inner = Clock(), _Inner()
    entities = Entities(store, Runtime(build_health(reactor), build_balancer), clock)
    resource = FreshResource(inner, entities.refresh, clock, timeout=2.0)
    try:
        read = _admin_call(b"GET", b"/upstreams")
        write = _admin_call(b"POST", b"/upstreams")
        status = _admin_call(b"GET", b"/status")
        assert resource.render(read) is NOT_DONE_YET
        resource.render(write)
        assert resource.render(status) == b"inner"  # at once, no look
        assert len(store.looks) == 1 and inner.rendered == 1
        clock.advance(1.9)
        assert not read.finished and not write.finished
        clock.advance(0.1)
        assert read.written == [b"inner"] and read.finished
        assert write.responseCode == 503 and write.finished
        assert b"no answer within 2 s" in b"".join(write.written)
        assert inner.rendered == 2
        assert entities._lock.locked  # the look still holds it
        # Unanswered for as long as the call waited: the store is out of
        # reach for the node too (its metric and log), not only for the call.
        assert entities.outage.failing
        # Another node wrote meanwhile; the store answers at last.
        other = SQLiteStore(reactor, store.path)
        await other.start()
        writer = Entities(
            other, Runtime(build_health(reactor), build_balancer), reactor
        )
        await writer.create("upstreams", {"name": "a"}, True)
        await writer.close()
        await other.close()
        store.looks[0].callback(1)
        await wait_for(lambda: succeed(not entities._lock.locked), 5.0, 0.01)
        assert [u.name for u in entities.snapshot.upstreams.values()] == ["a"]
        assert not entities.outage.failing
    finally:
        for look in store.looks:  # (a failed test must not hold close())
            if not look.called:
                look.callback(0)
        await entities.close()
        await store.close()


def test_an_admin_call_that_fails_is_answered_500():
    class Broken(Resource):
        isLeaf = True

        def render(self, request):
            raise RuntimeError("bug")

    resource = FreshResource(Broken(), lambda: succeed(False), Clock())
    request = _admin_call(b"GET", b"/upstreams")
    resource.render(request)
    assert request.responseCode == 500 and request.finished


def test_failures_that_are_not_outages_are_logged_every_time():
    outage = Outage()
    with log_events("aigateway.feed") as logged:
        for _ in range(3):
            outage.failed(Failure(ValueError("a record this node cannot read")))
        assert not outage.failing
    assert len(logged) == 3 and all("log_failure" in e for e in logged)


@pytest_twisted.ensureDeferred
async def test_a_closed_node_puts_nothing_in_force(pair):
    first, second = pair
    entities = second.service.parts.entities
    await entities.close()
    assert (await first.admin.post("/upstreams", form={"name": "a"})).code == 201
    assert await entities.refresh() is False
    assert entities.snapshot.upstreams == {}
    with pytest.raises(StoreUnavailable, match="shutting down"):
        await entities.create("upstreams", {"name": "b"}, True)


@pytest_twisted.ensureDeferred
async def test_status_does_not_wait_on_a_silent_store(tmp_path, monkeypatch):
    """
    A database that stops answering does not hold a liveness probe: the
    status says it is unreachable after a second, and probes that come
    meanwhile share the one ping in flight.
    """
    pings: list[Deferred[bool]] = []

    def silent(self):
        pings.append(Deferred())
        return pings[-1]

    monkeypatch.setattr(SQLiteStore, "ping", silent)
    node = await Gateway(str(tmp_path / "silent.db")).start()
    try:
        replies = await DeferredList(
            [Deferred.fromCoroutine(node.admin.get("/status")) for _ in range(3)]
        )
        assert [r.json["database"]["reachable"] for _, r in replies] == [False] * 3
        assert len(pings) == 1
        pings[0].callback(True)
        reply = await node.admin.get("/status")
        assert reply.json["database"]["reachable"] is False  # (a new, silent ping)
        assert len(pings) == 2
    finally:
        pings[-1].callback(True)
        await node.stop()

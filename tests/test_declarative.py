"""
Declarative configuration: load, export, round trip, and all-or-nothing.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import pytest_twisted
import yaml
from twisted.internet import reactor
from twisted.internet.task import deferLater

from aigateway import declarative
from aigateway.admin.entities import Entities
from aigateway.ids import is_uuid
from aigateway.store.sqlite import SQLiteStore

from .gatewaykit import Gateway, TargetResource, address, health_of, listen, wait_for

DOCUMENT = """
_format_version: "3.0"
upstreams:
- name: llm
  algorithm: least-connections
  healthchecks:
    passive:
      unhealthy:
        http_failures: 3
  targets:
  - target: 127.0.0.1:{port}
    weight: 100
    headers:
      Authorization: Bearer sk-live-0123456789abcdef
  - target: 127.0.0.1:1
    weight: 0
services:
- name: chat
  host: llm
  retries: 2
  routes:
  - name: chat-route
    paths: [/v1]
    strip_path: false
"""


def test_every_error_is_listed():
    document = yaml.safe_load(
        """
_format_version: "9.9"
colour: red
upstreams:
- name: ok
  algorithm: fastest
  targets:
  - target: ":::"
  - {target: "a:1", weight: 70000}
- name: ok
services:
- routes: [{paths: [x]}]
"""
    )
    with pytest.raises(declarative.InvalidDocument) as caught:
        declarative.load(document, 0)
    errors = "\n".join(caught.value.errors)
    for expected in (
        "_format_version",
        "colour: unknown field",
        "upstreams[0].algorithm: expected one of",
        "upstreams[0].targets[0].target",
        "upstreams[0].targets[1].weight: value should be between 0 and 65535",
        "upstreams[1].name: duplicate name 'ok'",
        "services[0].host: required field missing",
        "services[0].routes[0].paths",
    ):
        assert expected in errors, errors


def test_ids_must_be_uuids():
    """
    An id given in a document is a UUID, for every kind, as through the
    Admin API; one that is not a string is refused by the schema, and a key
    that is not a string is reported, not hashed.
    """
    document = yaml.safe_load(
        """
_format_version: "3.0"
upstreams:
- name: u
  id: not-a-uuid
  targets: [{target: "a:1", id: "1234"}]
- {name: [1], id: [2]}
services:
- name: s
  id: s
  host: u
  routes: [{paths: [/], id: "{r}"}]
"""
    )
    with pytest.raises(declarative.InvalidDocument) as caught:
        declarative.load(document, 0)
    assert sorted(caught.value.errors) == [
        "services[0].id: expected a valid UUID",
        "services[0].routes[0].id: expected a valid UUID",
        "upstreams[0].id: expected a valid UUID",
        "upstreams[0].targets[0].id: expected a valid UUID",
        "upstreams[1].id: expected a string",
        "upstreams[1].name: expected a string",
    ]
    assert is_uuid(str(uuid.uuid4()))
    assert not is_uuid("not-a-uuid")
    assert not is_uuid(5)


def test_ids_are_unique_across_kinds():
    """
    The store keeps every kind under one primary key, so one id given to
    an upstream and to a service is a duplicate.
    """
    same = str(uuid.uuid4())
    document = {
        "_format_version": "3.0",
        "upstreams": [{"name": "u", "id": same}],
        "services": [{"name": "s", "host": "u", "id": same}],
    }
    with pytest.raises(declarative.InvalidDocument) as caught:
        declarative.load(document, 0)
    assert caught.value.errors == [f"services[0].id: duplicate id {same}"]


def ids(records):
    """
    C{records} as C{{(kind, parent name, key): (id, created_at)}}: each
    entity under what a reload knows it by.
    """
    names = {
        r["id"]: r.get("name")
        for kind in ("upstreams", "services")
        for r in records[kind].values()
    }
    found = {}
    for kind, by_id in records.items():
        for record in by_id.values():
            parent = (record.get("upstream") or record.get("service") or {}).get("id")
            key = (kind, names.get(parent), record.get("target") or record.get("name"))
            assert key not in found, key
            found[key] = (record["id"], record["created_at"])
    return found


def test_reload_keeps_ids():
    """
    An unchanged export loaded back keeps every id and creation time, and
    only the update time moves; an entity with nothing to be known by (a
    route with no name) is exported with its id, and keeps it too.
    """
    document = yaml.safe_load(DOCUMENT.format(port=5))
    document["services"].append(
        {
            "name": "other",
            "host": "llm",
            "routes": [{"name": "other-route", "paths": ["/o"]}, {"paths": ["/n"]}],
        }
    )
    first = declarative.load(document, 100)
    exported = declarative.export(first)
    again = declarative.load(exported, 200, current=first)
    before, after = ids(first), ids(again)
    assert len(before) == 8
    (other,) = [s for s in exported["services"] if s["name"] == "other"]
    unnamed = [r for r in other["routes"] if r["name"] is None]
    assert [r["id"] for r in unnamed] == [before[("routes", "other", None)][0]]
    assert all("id" not in r for r in other["routes"] if r["name"] is not None)
    assert after == before
    stamps = {r["updated_at"] for by_id in again.values() for r in by_id.values()}
    assert stamps == {200}
    assert declarative.export(again) == exported


def test_routes_are_known_by_name():
    """
    Route names are unique across the gateway, as through the Admin API, so
    a route is known by its name alone: one moved to another service keeps
    its id.  A name two routes in force share (a database written before
    names were unique across services) names neither.
    """
    first = declarative.load(yaml.safe_load(DOCUMENT.format(port=5)), 0)
    (route,) = first["routes"].values()
    document = declarative.export(first)
    moved = document["services"][0].pop("routes")
    document["services"].append({"name": "other", "host": "llm", "routes": moved})
    second = declarative.load(document, 1, current=first)
    (again,) = second["routes"].values()
    assert again["id"] == route["id"]
    assert again["service"]["id"] != route["service"]["id"]

    document["services"][0]["routes"] = [{"name": "chat-route", "paths": ["/c"]}]
    with pytest.raises(declarative.InvalidDocument) as caught:
        declarative.load(document, 2, current=second)
    assert caught.value.errors == [
        "services[1].routes[0].name: duplicate name 'chat-route'"
    ]

    twin = {**again, "id": str(uuid.uuid4()), "service": route["service"]}
    legacy = {**second, "routes": {again["id"]: again, twin["id"]: twin}}
    del document["services"][0]["routes"]
    third = declarative.load(document, 3, current=legacy)
    (route,) = third["routes"].values()
    assert route["id"] not in legacy["routes"]


def test_reused_id_is_never_given_twice():
    """
    An id given explicitly in a document is never taken over by another
    entry, wherever it stands in the document and whatever its kind: that
    entry gets a new id instead, and no two records share one.
    """
    first = declarative.load(yaml.safe_load(DOCUMENT.format(port=5)), 0)
    (llm,) = first["upstreams"]
    (chat,) = first["services"]
    document = declarative.export(first)
    document["upstreams"].append({"name": "renamed", "id": llm})
    document["services"].insert(0, {"name": "first", "host": "llm", "id": chat})
    again = declarative.load(document, 1, current=first)
    everything = [r["id"] for by_id in again.values() for r in by_id.values()]
    assert len(everything) == len(set(everything)) == 7
    by_name = {r["name"]: r["id"] for r in again["upstreams"].values()}
    assert by_name["renamed"] == llm
    assert by_name["llm"] not in first["upstreams"]
    by_name = {r["name"]: r["id"] for r in again["services"].values()}
    assert by_name["first"] == chat
    assert by_name["chat"] not in first["services"]
    # The created time goes with the id.
    assert (
        again["upstreams"][llm]["created_at"] == first["upstreams"][llm]["created_at"]
    )


def test_keep_secrets():
    """
    A header value that is the mask of the stored value of the same header,
    names compared without regard to case, is that stored value; any other
    value is kept as given.
    """
    stored = {"Authorization": "Bearer sk-live-0123456789abcdef", "X-Key": "short"}
    given = {
        "authorization": "Bearer sk-…cdef",
        "x-key": "…",
        "X-Other": "…",
        "X-New": "Bearer sk-…0000",
    }
    assert declarative.keep_secrets(given, stored) == {
        "authorization": "Bearer sk-live-0123456789abcdef",
        "x-key": "short",
        "X-Other": "…",
        "X-New": "Bearer sk-…0000",
    }
    assert declarative.keep_secrets({"X-Key": "Bearer sk-…cdef"}, stored) == {
        "X-Key": "Bearer sk-…cdef"
    }
    assert declarative.keep_secrets(given, None) == given
    assert declarative.keep_secrets(None, stored) is None


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100000 + "]" * 100000,
        "- " * 100000 + "x",
        "when: 2001-13-01",
        "count: " + "9" * 5000,
    ],
    ids=["deep-flow", "deep-block", "bad-date", "huge-int"],
)
def test_hostile_text_is_an_invalid_document(text):
    """
    What PyYAML raises on hostile input besides its own errors (a
    RecursionError, a ValueError) is an invalid document too.
    """
    with pytest.raises(declarative.InvalidDocument) as caught:
        declarative.parse(text)
    assert caught.value.errors[0].startswith("cannot parse the document: ")


def test_mask_is_idempotent():
    masked = declarative.mask("Bearer sk-live-0123456789abcdef")
    assert masked == "Bearer sk-…cdef"
    assert declarative.mask(masked) == masked
    assert declarative.mask("short") == "…"


def test_export_restores_secrets_it_masked():
    document = yaml.safe_load(DOCUMENT.format(port=5))
    records = declarative.load(document, 0)
    exported = declarative.export(records)
    (target,) = [t for t in exported["upstreams"][0]["targets"] if t["weight"]]
    assert target["headers"] == {"Authorization": "Bearer sk-…cdef"}
    again = declarative.load(exported, 1, current=records)
    (stored,) = [t for t in again["targets"].values() if t["weight"]]
    assert stored["headers"]["Authorization"] == "Bearer sk-live-0123456789abcdef"
    assert declarative.export(again) == exported


@pytest_twisted.ensureDeferred
async def test_config_at_start_and_round_trip(tmp_path, servers):
    """
    --config loads the document at start; GET /config exports it with the
    secret masked; export, wipe, import, export gives the same document;
    an invalid document changes nothing.
    """
    target = TargetResource("t")
    servers.append(port := listen(target))
    path = tmp_path / "gateway.yaml"
    path.write_text(DOCUMENT.format(port=port.getHost().port))
    node = await Gateway(str(tmp_path / "d.db"), config=str(path)).start()
    try:
        reply = await node.proxy.get(
            "/v1/x", headers={"Authorization": "Bearer client"}
        )
        assert reply.code == 200
        assert target.requests[-1]["headers"].getRawHeaders(b"authorization") == [
            b"Bearer sk-live-0123456789abcdef"
        ]

        first = await node.admin.get("/config")
        assert first.code == 200
        assert first.headers.getRawHeaders(b"content-type")[0].startswith(
            b"application/yaml"
        )
        assert b"sk-live-0123456789abcdef" not in first.body
        exported = yaml.safe_load(first.body)
        assert exported["upstreams"][0]["algorithm"] == "least-connections"
        assert exported["services"][0]["routes"][0]["paths"] == ["/v1"]

        bad = await node.admin.post(
            "/config",
            body=b"_format_version: '3.0'\nservices:\n- name: x\n- host: '::bad::'\n",
        )
        assert bad.code == 400
        assert bad.json["name"] == "invalid declarative configuration"
        assert len(bad.json["fields"]["errors"]) == 2
        assert (await node.admin.get("/config")).body == first.body
        broken = await node.admin.post("/config", body=b"{{{")
        assert broken.code == 400

        wiped = await node.admin.post("/config", body=b"_format_version: '3.0'\n")
        assert wiped.code == 201
        assert (await node.admin.get("/upstreams")).json["data"] == []
        assert (await node.proxy.get("/v1/x")).code == 404

        loaded = await node.admin.post("/config", body=first.body)
        assert loaded.code == 201, loaded.body
        assert (await node.admin.get("/config")).body == first.body
    finally:
        await node.stop()


@pytest_twisted.ensureDeferred
async def test_invalid_config_file_stops_start(tmp_path):
    """
    A gateway whose --config file is invalid does not start, and the
    database keeps what it had.
    """
    database = str(tmp_path / "keep.db")
    node = await Gateway(database).start()
    await node.admin.post("/upstreams", form={"name": "kept"})
    await node.stop()
    path = tmp_path / "bad.yaml"
    path.write_text("_format_version: '3.0'\nupstreams:\n- name: 'bad name'\n")
    broken = Gateway(database, config=str(path))
    with pytest.raises(declarative.InvalidDocument):
        await broken.start()
    await broken.service.stopService()
    node = await Gateway(database).start()
    try:
        names = [u["name"] for u in (await node.admin.get("/upstreams")).json["data"]]
        assert names == ["kept"]
    finally:
        await node.stop()


@pytest_twisted.ensureDeferred
async def test_a_slow_store_delays_the_start_but_not_a_post(tmp_path, monkeypatch):
    """
    A store slower than an admin write's patience (a big document on a
    remote database): start-up's --config waits for it, instead of failing
    the start while the replacement lands all the same; POST /config is
    still answered 503 in time, and lands later.
    """
    monkeypatch.setattr(Entities, "write_patience", 0.2)
    replace = SQLiteStore.replace

    def slow(self: SQLiteStore, *args: Any) -> Any:
        waited = deferLater(reactor, 0.5, lambda: None)
        return waited.addCallback(lambda _: replace(self, *args))

    monkeypatch.setattr(SQLiteStore, "replace", slow)
    path = tmp_path / "gateway.yaml"
    path.write_text("_format_version: '3.0'\nupstreams:\n- name: at-start\n")
    node = await Gateway(str(tmp_path / "slow.db"), config=str(path)).start()

    async def names() -> list[str]:
        reply = await node.admin.get("/upstreams")
        return [u["name"] for u in reply.json["data"]]

    try:
        assert await names() == ["at-start"]
        posted = await node.admin.post(
            "/config", body=b"_format_version: '3.0'\nupstreams:\n- name: posted\n"
        )
        assert posted.code == 503, posted.body
        assert "may or may not have been saved" in posted.json["message"]

        async def landed() -> bool:
            return await names() == ["posted"]

        await wait_for(landed, 5.0, 0.05)
    finally:
        await node.stop()


async def identities(node):
    """
    Every entity the Admin API lists, as C{{id: (list, key, created_at)}}.
    """
    found = {}
    for path in ("/upstreams", "/upstreams/llm/targets/all", "/services", "/routes"):
        reply = await node.admin.get(path)
        assert reply.code == 200, reply.body
        for record in reply.json["data"]:
            key = record.get("name") or record.get("target")
            found[record["id"]] = (path, key, record["created_at"])
    return found


@pytest_twisted.ensureDeferred
async def test_reload_keeps_ids_and_health(tmp_path, servers):
    """
    An unchanged export loaded back, through POST /config or at start with
    --config, keeps every id and creation time; so a target set unhealthy
    by hand stays out of rotation (health is kept by upstream id).
    """
    target = TargetResource("t")
    servers.append(port := listen(target))
    key = address(port)
    database = str(tmp_path / "d.db")
    node = await Gateway(database).start()
    try:
        document = DOCUMENT.format(port=port.getHost().port).encode()
        assert (await node.admin.post("/config", body=document)).code == 201
        before = await identities(node)
        assert len(before) == 5
        reply = await node.admin.put(f"/upstreams/llm/targets/{key}/unhealthy")
        assert reply.code == 204
        assert (await health_of(node, "llm"))[key] == "UNHEALTHY"
        exported = (await node.admin.get("/config")).body

        loaded = await node.admin.post("/config", body=exported)
        assert loaded.code == 201, loaded.body
        assert await identities(node) == before
        assert (await health_of(node, "llm"))[key] == "UNHEALTHY"
        assert (await node.proxy.get("/v1/x")).code == 503
        assert target.requests == []
    finally:
        await node.stop()

    path = tmp_path / "gateway.yaml"
    path.write_bytes(exported)
    node = await Gateway(database, config=str(path)).start()
    try:
        assert await identities(node) == before
    finally:
        await node.stop()


@pytest_twisted.ensureDeferred
async def test_hostile_documents_are_refused(gateway):
    """
    A document nested too deeply for the parser, or with ids that are not
    UUIDs, is refused as invalid (400, code 14), not a server error, and
    the gateway goes on answering.
    """
    deep = b"[" * 100000 + b"]" * 100000
    reply = await gateway.admin.post("/config", body=deep)
    assert reply.code == 400, reply.body
    assert reply.json["code"] == 14
    assert reply.json["fields"]["errors"] == [
        "cannot parse the document: nested too deeply"
    ]

    reply = await gateway.admin.post(
        "/config",
        json_body={
            "_format_version": "3.0",
            "upstreams": [
                {
                    "name": "x",
                    "id": "not-a-uuid",
                    "targets": [{"target": "a:1", "id": "t"}],
                }
            ],
            "services": [
                {
                    "name": "s",
                    "host": "x",
                    "id": "s",
                    "routes": [{"paths": ["/"], "id": "r"}],
                }
            ],
        },
    )
    assert reply.code == 400, reply.body
    assert reply.json["fields"]["errors"] == [
        "upstreams[0].id: expected a valid UUID",
        "upstreams[0].targets[0].id: expected a valid UUID",
        "services[0].id: expected a valid UUID",
        "services[0].routes[0].id: expected a valid UUID",
    ]

    assert (await gateway.admin.get("/status")).code == 200
    reply = await gateway.admin.get("/config?format=json")
    assert reply.json == {"_format_version": "3.0", "services": [], "upstreams": []}

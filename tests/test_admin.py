"""
The Admin API over real HTTP: status codes, Kong-shaped errors, update
semantics, addressing, pagination and durability.
"""

from __future__ import annotations

import pytest_twisted

from .gatewaykit import Gateway


async def dump(gateway) -> dict:
    """
    Everything stored, as the API lists it.
    """
    out = {}
    for path in ("/upstreams", "/services", "/routes"):
        out[path] = (await gateway.admin.get(path)).json["data"]
    for upstream in out["/upstreams"]:
        name = upstream["name"]
        out[name] = (await gateway.admin.get(f"/upstreams/{name}/targets/all")).json[
            "data"
        ]
    return out


@pytest_twisted.ensureDeferred
async def test_bad_input_changes_nothing(gateway):
    """
    Each bad request gets a 4xx JSON error that names the field, and what
    was stored before is unchanged.
    """
    admin = gateway.admin
    assert (await admin.post("/upstreams", form={"name": "up"})).code == 201
    assert (
        await admin.post("/upstreams/up/targets", form={"target": "10.0.0.1:80"})
    ).code == 201
    before = await dump(gateway)

    cases = [
        (
            await admin.post(
                "/upstreams",
                body=b"{nope",
                headers={"Content-Type": "application/json"},
            ),
            400,
            None,
        ),
        (
            await admin.post("/upstreams", form={"name": "x", "algorithm": "fastest"}),
            400,
            "algorithm",
        ),
        (
            await admin.patch("/upstreams/up", form={"algorithm": "fastest"}),
            400,
            "algorithm",
        ),
        (
            await admin.post(
                "/upstreams/up/targets",
                form={"target": "10.0.0.2:80", "weight": "70000"},
            ),
            400,
            "weight",
        ),
        (
            await admin.post("/upstreams/up/targets", form={"target": ":::"}),
            400,
            "target",
        ),
        (await admin.post("/upstreams", form={"name": "up"}), 409, "name"),
        (
            await admin.post("/upstreams/nope/targets", form={"target": "10.0.0.3:80"}),
            404,
            None,
        ),
        (
            await admin.post("/upstreams", json_body={"name": "y", "slots": "many"}),
            400,
            "slots",
        ),
        (
            await admin.post(
                "/upstreams", form={"name": "z", "healthchecks.active.timeout": "-1"}
            ),
            400,
            "healthchecks",
        ),
        (
            await admin.post("/upstreams", json_body={"name": "w", "colour": "red"}),
            400,
            "colour",
        ),
        (await admin.post("/services", form={"name": "s"}), 400, "host"),
        (await admin.post("/routes", form={"paths[]": "/x"}), 400, "service"),
        (
            await admin.post(
                "/routes", json_body={"paths": ["/x"], "service": {"name": "none"}}
            ),
            400,
            "service",
        ),
        (await admin.get("/upstreams?size=0"), 400, None),
    ]
    for reply, status, field in cases:
        assert reply.code == status, (reply.code, reply.body)
        body = reply.json
        assert body["message"]
        if field is not None:
            assert field in body["fields"], body
    algorithm = cases[1][0].json
    assert algorithm["name"] == "schema violation"
    assert "round-robin" in algorithm["fields"]["algorithm"]
    assert cases[3][0].json["fields"]["weight"] == "value should be between 0 and 65535"
    assert "PATCH /upstreams/up" in cases[5][0].json["message"]
    assert cases[8][0].json["fields"]["healthchecks"]["active"]["timeout"]
    assert await dump(gateway) == before


@pytest_twisted.ensureDeferred
async def test_patch_put_delete(gateway):
    """
    PATCH deep-merges records and replaces arrays, PUT replaces (omitted
    fields back to defaults) or creates, DELETE takes the targets along.
    """
    admin = gateway.admin
    created = (await admin.post("/upstreams", form={"name": "up", "slots": "100"})).json
    patched = await admin.patch(
        "/upstreams/up",
        json_body={"healthchecks": {"active": {"healthy": {"http_statuses": [200]}}}},
    )
    assert patched.code == 200
    hc = patched.json["healthchecks"]
    assert hc["active"]["healthy"]["http_statuses"] == [200]
    assert hc["active"]["healthy"]["successes"] == 2
    assert patched.json["slots"] == 100
    assert patched.json["id"] == created["id"]
    assert patched.json["created_at"] == created["created_at"]

    put = await admin.put("/upstreams/up", form={"algorithm": "round-robin"})
    assert put.code == 200
    assert put.json["id"] == created["id"]
    assert put.json["slots"] == 10000
    assert put.json["healthchecks"]["active"]["healthy"]["http_statuses"] == [200, 302]

    fresh = await admin.put("/upstreams/other", form={})
    assert fresh.code == 200
    assert fresh.json["name"] == "other"

    by_id = await admin.get("/upstreams/" + created["id"])
    assert by_id.json["name"] == "up"

    target = (
        await admin.post("/upstreams/up/targets", form={"target": "[::1]:9000"})
    ).json
    assert target["target"] == "[::1]:9000"
    assert (await admin.get("/upstreams/up/targets/[::1]:9000")).json["id"] == target[
        "id"
    ]
    default_port = (
        await admin.post("/upstreams/up/targets", form={"target": "example.com"})
    ).json
    assert default_port["target"] == "example.com:8000"
    reply = await admin.patch(
        f"/upstreams/up/targets/{target['id']}", form={"weight": "5"}
    )
    assert reply.json["weight"] == 5

    assert (await admin.delete("/upstreams/up")).code == 204
    assert (await admin.get("/upstreams/up")).code == 404
    assert (await admin.get("/upstreams/up/targets")).code == 404
    others = (await admin.get("/upstreams")).json["data"]
    assert [u["name"] for u in others] == ["other"]


@pytest_twisted.ensureDeferred
async def test_services_and_routes(gateway):
    """
    Routes are created under a service or at /routes naming it; a service
    still used by a route cannot be deleted.
    """
    admin = gateway.admin
    service = await admin.post(
        "/services", form={"name": "s", "url": "https://api.example.com/v1"}
    )
    assert service.code == 201
    assert (service.json["protocol"], service.json["port"], service.json["path"]) == (
        "https",
        443,
        "/v1",
    )
    route = await admin.post(
        "/routes", json_body={"name": "r", "paths": ["/a"], "service": {"name": "s"}}
    )
    assert route.code == 201, route.body
    assert route.json["service"]["id"] == service.json["id"]
    nested = await admin.post(
        "/services/s/routes", form={"paths[]": ["/b", "/c"], "methods": "POST"}
    )
    assert nested.json["paths"] == ["/b", "/c"]
    assert nested.json["methods"] == ["POST"]
    listed = (await admin.get("/services/s/routes")).json["data"]
    assert len(listed) == 2
    refused = await admin.delete("/services/s")
    assert refused.code == 400
    assert (await admin.delete("/routes/r")).code == 204
    assert (await admin.delete(f"/routes/{nested.json['id']}")).code == 204
    assert (await admin.delete("/services/s")).code == 204
    bad = await admin.post("/services/nope/routes", form={"paths[]": "/x"})
    assert bad.code == 404


@pytest_twisted.ensureDeferred
async def test_pagination(gateway):
    """
    Lists page with size and an opaque offset; following next visits every
    entity once.
    """
    names = [f"u{i:02d}" for i in range(25)]
    for name in names:
        await gateway.admin.post("/upstreams", form={"name": name})
    seen = []
    path = "/upstreams?size=10"
    pages = 0
    while path:
        page = (await gateway.admin.get(path)).json
        seen += [u["name"] for u in page["data"]]
        path = page["next"]
        pages += 1
    assert pages == 3
    assert sorted(seen) == names
    assert (await gateway.admin.get("/upstreams?offset=!!!")).code == 400


@pytest_twisted.ensureDeferred
async def test_entities_survive_restart(tmp_path):
    """
    A new process on the same database file has every entity back, and
    proxies by it.
    """
    database = str(tmp_path / "kept.db")
    first = await Gateway(database).start()
    try:
        await first.configure("llm", {"127.0.0.1:9": 100, "127.0.0.1:10": 50})
        await first.admin.patch(
            "/upstreams/llm", form={"healthchecks.passive.unhealthy.cooldown": "7"}
        )
        before = await dump(first)
    finally:
        await first.stop()
    second = await Gateway(database).start()
    try:
        assert await dump(second) == before
        upstream = (await second.admin.get("/upstreams/llm")).json
        assert upstream["healthchecks"]["passive"]["unhealthy"]["cooldown"] == 7
        assert second.service.runtime.snapshot.version >= 5
        assert "llm" in second.service.runtime.snapshot.upstreams
    finally:
        await second.stop()


@pytest_twisted.ensureDeferred
async def test_node_endpoints(gateway):
    """
    / names the version and the balancers, /status the node's state.
    """
    root = (await gateway.admin.get("/")).json
    assert root["version"] == "0.1.0"
    assert "round-robin" in root["configuration"]["balancers"]
    status = (await gateway.admin.get("/status")).json
    assert status["database"]["reachable"] is True
    assert status["node_id"] == root["node_id"]


@pytest_twisted.ensureDeferred
async def test_tags_filter(gateway):
    """
    ?tags=a,b keeps entities tagged with both, ?tags=a/b with either.
    """
    for name, tags in (("one", ["prod", "eu"]), ("two", ["prod"]), ("three", ["dev"])):
        reply = await gateway.admin.post(
            "/upstreams", json_body={"name": name, "tags": tags}
        )
        assert reply.code == 201

    async def names(query):
        return sorted(
            u["name"]
            for u in (await gateway.admin.get("/upstreams" + query)).json["data"]
        )

    assert await names("?tags=prod") == ["one", "two"]
    assert await names("?tags=prod,eu") == ["one"]
    assert await names("?tags=eu/dev") == ["one", "three"]
    assert await names("") == ["one", "three", "two"]
    assert (await gateway.admin.get("/upstreams?tags=a,b/c")).code == 400

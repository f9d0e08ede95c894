"""
The Admin API against hostile and careless input, over real HTTP: every
bad body is a 4xx JSON answer (never a 500), values that would reach the
wire as headers or request lines are refused, and what Kong's Admin API
does for the rest (global route names, disabled services, PATCH of maps
and URLs, pagination filters, error codes) is what ours does.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    connectProtocol,
    wrapClientTLS,
)
from twisted.web.resource import Resource

from aigateway.admin.site import AdminChannel, AdminSite

from .gatewaykit import (
    TargetResource,
    address,
    direct_route,
    listen,
    log_events,
    raw_request,
    wait_for,
)
from .test_admin import dump
from .test_server import Conversation, connect
from .tlskit import certificate


async def _upstream_with_target(admin, name: str = "up") -> None:
    assert (await admin.post("/upstreams", form={"name": name})).code == 201
    reply = await admin.post(f"/upstreams/{name}/targets", form={"target": "10.0.0.1"})
    assert reply.code == 201


@pytest_twisted.ensureDeferred
async def test_hostile_bodies_are_4xx_and_change_nothing(gateway):
    """
    Input that used to reach a traceback (a 500) is a 400 in Kong's shape,
    and nothing stored changes.
    """
    admin = gateway.admin
    await _upstream_with_target(admin)
    assert (await admin.post("/services", form={"name": "s", "host": "up"})).code == 201
    before = await dump(gateway)
    deep = b"[" * 100_000 + b"]" * 100_000
    huge = "9" * 5000
    cases = [
        # "²" is a digit to str.isdigit() and not to int().
        (await admin.post("/upstreams/up/targets", form={"target": "10.0.0.2:8²"}),),
        (await admin.get("/upstreams/up/targets/10.0.0.2:8%C2%B2"),),
        (
            await admin.post(
                "/upstreams/up/targets", form={"target": "10.0.0.3", "weight": huge}
            ),
        ),
        (await admin.post("/routes", form={"regex_priority": huge, "paths[]": "/h"}),),
        (
            await admin.post(
                "/upstreams", body=deep, headers={"Content-Type": "application/json"}
            ),
        ),
        (await admin.post("/services", form={"name": "x", "url": "http://[::1"}),),
        (await admin.patch("/services/s", form={"url": "http://[::1"}),),
        (await admin.get("/upstreams/%FF"),),
        (await admin.get("/upstreams?size=abc"),),
        (await admin.get("/upstreams?size=99999999999999999999"),),
        (await admin.get("/upstreams?offset=LTI"),),  # "-2"
    ]
    for (reply,) in cases:
        assert 400 <= reply.code < 500, (reply.code, reply.body)
        assert reply.headers.getRawHeaders(b"content-type")[0].startswith(
            b"application/json"
        )
        assert reply.json["message"], reply.body
    assert cases[8][0].json["code"] == 9  # Kong's invalid size
    assert cases[10][0].json["code"] == 7  # invalid offset
    assert await dump(gateway) == before
    assert (await admin.get("/status")).code == 200


@pytest_twisted.ensureDeferred
async def test_values_that_would_reach_the_wire_are_checked(gateway):
    """
    Names, hosts, paths and headers that the gateway sends or answers with
    cannot carry a line break (a trailing newline used to pass the checks'
    C{$}), a header name that is not a token, or control characters.
    """
    admin = gateway.admin
    await _upstream_with_target(admin)
    assert (await admin.post("/services", form={"name": "s", "host": "up"})).code == 201
    before = await dump(gateway)
    refused = [
        ("/upstreams", {"name": "nl\n"}, "name"),
        ("/upstreams", {"name": "x", "host_header": "evil.com\n"}, "host_header"),
        ("/upstreams", {"name": "my~up"}, "name"),  # no service can name it
        ("/upstreams", {"name": "10.0.0.9"}, "name"),
        (
            "/upstreams",
            {"name": "x", "hash_on": "cookie", "hash_on_cookie": "a b"},
            None,
        ),
        ("/services", {"name": "t", "host": "up\n"}, "host"),
        ("/services", {"name": "t", "host": "up", "path": "/a b"}, "path"),
        ("/upstreams/up/targets", {"target": "localhost\n:80"}, "target"),
        (
            "/upstreams/up/targets",
            {"target": "10.0.0.5", "headers": {"Bad Name": "x"}},
            None,
        ),
        (
            "/upstreams/up/targets",
            {"target": "10.0.0.5", "headers": {"X-A\r\nX-B": "v"}},
            None,
        ),
        (
            "/upstreams/up/targets",
            {"target": "10.0.0.5", "headers": {"X-A": "v\r\nX-B: w"}},
            None,
        ),
        (
            "/upstreams",
            {"name": "y", "healthchecks": {"active": {"headers": {"A B": "1"}}}},
            None,
        ),
        (
            "/upstreams",
            {"name": "y", "healthchecks": {"active": {"http_path": "/h\n"}}},
            None,
        ),
        ("/services/s/routes", {"paths": ["/p\n"]}, "paths"),
        ("/services/s/routes", {"paths": ["~/p\n"]}, "paths"),
        ("/services/s/routes", {"hosts": ["a*b.com"]}, "hosts"),
        ("/services/s/routes", {"methods": ["GET", "GET"]}, "methods"),
        # Framing a second time next to the gateway's own: smuggling.
        (
            "/upstreams/up/targets",
            {"target": "10.0.0.5", "headers": {"Content-Length": "5"}},
            None,
        ),
        (
            "/upstreams/up/targets",
            {"target": "10.0.0.5", "headers": {"transfer-encoding": "chunked"}},
            None,
        ),
        ("/upstreams", {"name": "z", "tags": ["a,b"]}, "tags"),
    ]
    for path, body, field in refused:
        reply = await admin.post(path, json_body=body)
        assert reply.code == 400, (path, body, reply.code, reply.body)
        assert reply.json["name"] == "schema violation", reply.body
        if field is not None:
            assert field in reply.json["fields"], reply.body
    assert await dump(gateway) == before
    # What the checks must still let through.
    accepted = [
        ("/upstreams/up/targets", {"target": "10.0.0.6", "headers": {"X-Key": "a\tb"}}),
        ("/services/s/routes", {"hosts": ["*.example.com", "example.*"]}),
        ("/services/s/routes", {"paths": ["/v1/chat%20x", "~/v1/(?<model>[^/]+)$"]}),
        ("/upstreams", {"name": "under_score.example"}),
        ("/upstreams/up/targets", {"target": "10.0.0.7", "weight": 100.0}),
    ]
    for path, body in accepted:
        reply = await admin.post(path, json_body=body)
        assert reply.code == 201, (path, body, reply.body)


@pytest_twisted.ensureDeferred
async def test_route_names_are_unique_across_services(gateway):
    admin = gateway.admin
    for service in ("s1", "s2"):
        assert (
            await admin.post("/services", form={"name": service, "host": "x.test"})
        ).code == 201
    first = await admin.post("/services/s1/routes", form={"name": "r", "paths[]": "/a"})
    assert first.code == 201
    second = await admin.post(
        "/services/s2/routes", form={"name": "r", "paths[]": "/b"}
    )
    assert second.code == 409, second.body
    assert (await admin.get("/routes/r")).json["id"] == first.json["id"]


@pytest_twisted.ensureDeferred
async def test_a_disabled_service_is_not_routed(gateway, servers):
    """
    A service with C{enabled=false} keeps its routes, and the proxy acts as
    if they did not exist until it is enabled again.
    """
    admin = gateway.admin
    target = TargetResource("alpha")
    await direct_route(gateway, servers, target, **{"paths[]": "/a"})
    assert (await gateway.proxy.get("/a")).body == b"alpha"

    off = await admin.patch("/services/s", form={"enabled": "false"})
    assert off.json["enabled"] is False
    refused = await gateway.proxy.get("/a")
    assert refused.code == 404
    assert sum(target.hits.values()) == 1

    assert (await admin.patch("/services/s", form={"enabled": "true"})).code == 200
    assert (await gateway.proxy.get("/a")).body == b"alpha"


@pytest_twisted.ensureDeferred
async def test_patch_semantics_of_urls_and_maps(gateway):
    """
    A PATCH of C{url} without a path drops the old path; a PATCH of a map
    (a target's headers) replaces it whole, so a header can be removed,
    while records still merge.
    """
    admin = gateway.admin
    created = await admin.post(
        "/services", form={"name": "s", "url": "http://10.0.0.1:81/base"}
    )
    assert created.json["path"] == "/base"
    patched = await admin.patch("/services/s", form={"url": "http://10.0.0.2:82"})
    assert (patched.json["host"], patched.json["port"], patched.json["path"]) == (
        "10.0.0.2",
        82,
        None,
    )

    assert (await admin.post("/upstreams", form={"name": "up"})).code == 201
    target = "/upstreams/up/targets/10.0.0.1:80"
    reply = await admin.put(target, json_body={"headers": {"X-A": "1", "X-B": "2"}})
    assert reply.code == 200, reply.body
    reply = await admin.patch(target, json_body={"headers": {"X-A": "3"}})
    assert reply.json["headers"] == {"X-A": "…"}


@pytest_twisted.ensureDeferred
async def test_pagination_keeps_the_filter_and_errors_have_kong_codes(gateway):
    admin = gateway.admin
    for name, tags in (("a", ["prod"]), ("b", []), ("c", ["prod"]), ("d", ["prod"])):
        reply = await admin.post("/upstreams", json_body={"name": name, "tags": tags})
        assert reply.code == 201
    page = (await admin.get("/upstreams?tags=prod&size=2")).json
    following = (await admin.get(page["next"])).json
    assert following["next"] is None
    names = [u["name"] for u in page["data"] + following["data"]]
    assert sorted(names) == ["a", "c", "d"]

    assert (await admin.post("/services", form={"name": "s", "host": "a"})).code == 201
    assert (await admin.post("/services/s/routes", form={"paths[]": "/x"})).code == 201
    referenced = await admin.delete("/services/s")
    assert referenced.code == 400
    assert (referenced.json["code"], referenced.json["name"]) == (
        4,
        "foreign key violation",
    )

    wrong = await admin.request("DELETE", "/upstreams")
    assert wrong.code == 405
    allowed = wrong.headers.getRawHeaders(b"allow")[0].decode()
    assert set(allowed.split(", ")) >= {"GET", "POST"}


@pytest_twisted.ensureDeferred
async def test_forms_with_empty_fields_are_read(gateway):
    reply = await gateway.admin.post(
        "/upstreams",
        body=b"name=x&&slots=100&",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert reply.code == 201, reply.body
    assert (reply.json["name"], reply.json["slots"]) == ("x", 100)
    garbage = await gateway.admin.post(
        "/upstreams",
        body=json.dumps({"name": "y"}).encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert garbage.code == 400


@pytest_twisted.ensureDeferred
async def test_a_target_read_and_written_back_keeps_its_credentials(gateway, servers):
    """
    The API shows target headers masked; a client that PUTs or PATCHes back
    what it read (decK, Terraform, a script) must not store the mask in
    place of the key.
    """
    admin = gateway.admin
    target = TargetResource("t")
    port = listen(target)
    servers.append(port)
    key = "Bearer sk-abcdef0123456789"
    assert (await admin.post("/upstreams", form={"name": "up"})).code == 201
    path = f"/upstreams/up/targets/{address(port)}"
    created = await admin.put(path, json_body={"headers": {"Authorization": key}})
    assert created.code == 200, created.body
    assert (await admin.post("/services", form={"name": "s", "host": "up"})).code == 201
    assert (await admin.post("/services/s/routes", form={"paths[]": "/"})).code == 201

    shown = (await admin.get(path)).json
    assert shown["headers"]["Authorization"] != key
    for write in (admin.put, admin.patch):
        body = {k: v for k, v in shown.items() if k not in ("id", "created_at")}
        reply = await write(path, json_body=body)
        assert reply.code == 200, reply.body
        assert (await gateway.proxy.get("/x")).code == 200
        sent = target.requests[-1]["headers"].getRawHeaders(b"authorization")
        assert sent == [key.encode()]


@pytest_twisted.ensureDeferred
async def test_an_id_is_unique_across_kinds(gateway):
    admin = gateway.admin
    upstream = (await admin.post("/upstreams", form={"name": "up"})).json["id"]
    reply = await admin.post(
        "/services", json_body={"id": upstream, "name": "s", "host": "up"}
    )
    assert reply.code == 409, reply.body
    assert (await admin.get(f"/upstreams/{upstream}")).json["name"] == "up"


@pytest_twisted.ensureDeferred
async def test_hashing_patched_onto_a_round_robin_upstream_implies_its_algorithm(
    gateway,
):
    admin = gateway.admin
    assert (await admin.post("/upstreams", form={"name": "rr"})).code == 201
    form = {"hash_on": "header", "hash_on_header": "X-User"}
    reply = await admin.patch("/upstreams/rr", form=form)
    assert reply.code == 200, reply.body
    assert reply.json["algorithm"] == "consistent-hashing"
    form = {"name": "lc", "algorithm": "least-connections"}
    assert (await admin.post("/upstreams", form=form)).code == 201
    refused = await admin.patch("/upstreams/lc", form={"hash_on": "ip"})
    assert refused.code == 400


@pytest_twisted.ensureDeferred
async def test_an_empty_form_value_clears_a_field(gateway):
    admin = gateway.admin
    form = {"name": "up", "host_header": "model.internal"}
    assert (await admin.post("/upstreams", form=form)).code == 201
    cleared = await admin.patch("/upstreams/up", form={"host_header": ""})
    assert cleared.code == 200, cleared.body
    assert cleared.json["host_header"] is None
    refused = await admin.patch("/upstreams/up", json_body={"host_header": ""})
    assert refused.code == 400
    required = await admin.post("/upstreams", form={"name": ""})
    assert required.json["fields"]["name"] == "required field missing"


def _raw_reply(raw: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    """
    The status, headers (by lower-case name) and body of a raw answer.
    """
    assert raw, "the connection was closed without an answer"
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.split(b"\r\n")
    fields = (line.split(b":", 1) for line in lines)
    return int(status_line.split()[1]), {k.lower(): v.strip() for k, v in fields}, body


async def _exchange(gateway, request: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    """
    Send C{request} to the Admin API on a connection of its own, and read
    the answer until the gateway closes the connection (in 5 s at most).
    """
    port = gateway.service.admin_port.getHost().port
    exchange = Deferred.fromCoroutine(raw_request(port, request))
    return _raw_reply(await exchange.addTimeout(5.0, reactor))


@pytest_twisted.ensureDeferred
async def test_a_url_too_long_is_answered_414_in_json(gateway):
    """
    A request line longer than twisted.web reads (16 KiB) gets 414 in
    Kong's shape, not a closed connection; the gateway then closes the
    connection (the rest of the request cannot be told from a next one),
    after the answer, even when the client is still sending a long URL.
    """
    for size in (20_000, 1_000_000):
        request = b"GET /upstreams/" + b"a" * size + b" HTTP/1.1\r\nHost: x\r\n\r\n"
        status, headers, body = await _exchange(gateway, request)
        assert status == 414
        assert headers[b"content-type"] == b"application/json; charset=utf-8"
        assert headers[b"connection"] == b"close"
        assert int(headers[b"content-length"]) == len(body)
        assert json.loads(body) == {
            "message": "URI too long: the request line is longer than 16384 bytes"
        }
    assert (await gateway.admin.get("/upstreams")).code == 200


@pytest_twisted.ensureDeferred
async def test_a_header_too_long_is_answered_431_in_json(gateway):
    request = b"GET /upstreams HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000
    status, headers, body = await _exchange(gateway, request + b"\r\n\r\n")
    assert status == 431
    assert headers[b"connection"] == b"close"
    assert "header" in json.loads(body)["message"]


@pytest_twisted.ensureDeferred
async def test_a_url_just_under_the_limit_is_served(gateway):
    """
    The URL's limit is the request line's: a URL just under it, with the
    usual headers, is served (twisted.web would have refused the request
    line and headers together with a bare 400).
    """
    line = b"GET /upstreams/" + b"a" * 16_000 + b" HTTP/1.1"
    assert len(line) <= 16_384
    headers = b"Host: x\r\nUser-Agent: " + b"u" * 400 + b"\r\nConnection: close\r\n"
    status, answered, body = await _exchange(
        gateway, line + b"\r\n" + headers + b"\r\n"
    )
    assert status == 404
    assert answered[b"content-type"] == b"application/json; charset=utf-8"
    assert b'"Not found"' in body


class _Big(Resource):
    """
    An answer larger than a connection's kernel buffers hold.
    """

    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return b"x" * 8_000_000


def _lingering_site() -> tuple[AdminSite, list[AdminChannel]]:
    """
    An L{AdminSite} whose channels linger 0.2 s after a refusal, and the
    list of those whose connection ended.
    """
    ended: list[AdminChannel] = []

    class Channel(AdminChannel):
        lingering = 0.2

        def connectionLost(self, reason: Any) -> None:
            ended.append(self)
            super().connectionLost(reason)

    site = AdminSite(_Big())
    site.protocol = Channel  # type: ignore[assignment]
    return site, ended


_LONG_URL = b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest_twisted.ensureDeferred
async def test_a_refused_connection_ends_though_the_client_reads_nothing():
    """
    A URL too long, pipelined behind a request with a large answer, from a
    client that reads nothing: the answers cannot all be sent, and the
    connection ends all the same once the lingering is over (it used to
    wait for the client to read them, for ever).
    """
    site, ended = _lingering_site()
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    client = await connect(port.getHost().port)
    try:
        client.transport.pauseProducing()
        client.transport.write(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n" + _LONG_URL)
        await wait_for(lambda: succeed(bool(ended)), 3.0, 0.05)
        assert ended[0]._refused
    finally:
        client.transport.abortConnection()
        await port.stopListening()


@pytest.mark.filterwarnings("ignore::DeprecationWarning:OpenSSL.*")
@pytest_twisted.ensureDeferred
async def test_a_refused_tls_connection_ends_though_the_client_stays():
    """
    On a TLS listener (C{--admin ssl:...}), a client that reads the 414
    and then neither reads nor closes: the connection ends once the
    lingering is over (a TLS close would wait for the client's
    close_notify, for ever).
    """
    cert, key = certificate("127.0.0.1")
    options = ssl.PrivateCertificate.loadPEM(cert + key).options()
    site, ended = _lingering_site()
    port = reactor.listenSSL(0, site, options, interface="127.0.0.1")
    endpoint = wrapClientTLS(
        ssl.optionsForClientTLS("127.0.0.1", ssl.Certificate.loadPEM(cert)),
        TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port),
    )
    client = await connectProtocol(endpoint, Conversation())
    try:
        client.transport.write(_LONG_URL)
        await client.until(b"HTTP/1.1 414")
        assert client.data.startswith(b"HTTP/1.1 414 ")
        client.transport.pauseProducing()
        await wait_for(lambda: succeed(bool(ended)), 3.0, 0.05)
    finally:
        client.transport.abortConnection()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_change_that_cannot_be_put_in_force_is_not_stored(gateway, monkeypatch):
    """
    A record the checks let through but the gateway cannot load (here a
    fault injected into loading routes named C{poison}: any such record is
    a bug) is refused with a 500 before it is stored, whether it comes
    from an entity's write or a declarative document, rather than stored
    and then stopping every node that loads it.  The node goes on.
    """
    from aigateway.model import Route

    loads = Route.from_record.__func__  # type: ignore[attr-defined]

    def poisoned(cls: Any, record: Any) -> Any:
        if record.get("name") == "poison":
            raise RuntimeError("cannot load this route")
        return loads(cls, record)

    monkeypatch.setattr(Route, "from_record", classmethod(poisoned))
    admin = gateway.admin
    assert (
        await admin.post("/services", form={"name": "s", "url": "http://a"})
    ).code == 201
    with log_events("aigateway.admin.entities") as logged:
        reply = await admin.post(
            "/services/s/routes", form={"name": "poison", "paths[]": "/p"}
        )
        assert reply.code == 500, reply.body
        assert "nothing was changed" in reply.json["message"]
        document = {
            "_format_version": "3.0",
            "services": [
                {
                    "name": "t",
                    "url": "http://b",
                    "routes": [{"name": "poison", "paths": ["/q"]}],
                }
            ],
        }
        replaced = await admin.post("/config", body=json.dumps(document).encode())
        assert replaced.code == 500, replaced.body
    assert len(logged) == 2 and all("log_failure" in e for e in logged)
    _, records = await gateway.service.store.load()
    assert [s["name"] for s in records["services"].values()] == ["s"]
    assert records["routes"] == {}
    fine = await admin.post("/services/s/routes", form={"name": "ok", "paths[]": "/p"})
    assert fine.code == 201, fine.body

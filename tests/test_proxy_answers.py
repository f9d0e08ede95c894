"""
Targets that misbehave between their answer's head and its body, answers
to HEAD, forwarded-for chains and clients that leave early, through a real
gateway and raw target servers that send exactly the bytes a test gives.
"""

from __future__ import annotations

import json
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol

from aigateway.proxy.forward import NO_PEER

from .gatewaykit import (
    Gateway,
    SSEResource,
    TargetResource,
    address,
    direct_route,
    listen,
    scrape,
    wait_for,
)
from .test_server import connect, raw_request


class _Canned(Protocol):
    """
    Answers each request with the factory's bytes, then closes or not.
    """

    def dataReceived(self, data: bytes) -> None:
        factory = self.factory
        factory.requests.append(data)
        if b"\r\n\r\n" not in data:
            return
        self.transport.write(factory.answer)
        if factory.close:
            self.transport.loseConnection()


class Canned(Factory):
    protocol = _Canned

    def __init__(self, answer: bytes, close: bool = True) -> None:
        self.answer = answer
        self.close = close
        self.requests: list[bytes] = []


def canned(servers: list[Any], answer: bytes, close: bool = True) -> tuple[Any, str]:
    factory = Canned(answer, close)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    servers.append(port)
    return factory, address(port)


async def _route(gateway, targets: list[str], **service: str) -> None:
    admin = gateway.admin
    assert (await admin.post("/upstreams", form={"name": "up"})).code == 201
    for target in targets:
        reply = await admin.post("/upstreams/up/targets", form={"target": target})
        assert reply.code == 201
    form = {"name": "s", "host": "up", **service}
    assert (await admin.post("/services", form=form)).code == 201
    assert (await admin.post("/services/s/routes", form={"paths[]": "/"})).code == 201


async def _counted(gateway, code: str) -> bool:
    """
    Whether the proxy's request counter has a series for C{code}.
    """
    return any(
        name == "aigateway_http_requests_total" and ("code", code) in labels
        for name, labels in await scrape(gateway)
    )


_HEAD_ONLY = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-From: broken\r\n"
    b"Content-Length: 10\r\n\r\n"
)


@pytest_twisted.ensureDeferred
async def test_an_answer_broken_before_its_body_is_retried(gateway, servers):
    """
    A target that sends its head and closes before the body: nothing
    reached the client (the head waits for the first body byte), so the
    next target answers, with none of the broken answer's headers.
    """
    broken, first = canned(servers, _HEAD_ONLY)
    port = listen(TargetResource("good"))
    servers.append(port)
    await _route(gateway, [first, address(port)])
    for _ in range(4):
        reply = await gateway.proxy.get("/x")
        assert (reply.code, reply.body) == (200, b"good")
        assert reply.headers.getRawHeaders(b"x-from") is None
    assert len(broken.requests) >= 1


@pytest_twisted.ensureDeferred
async def test_an_answer_broken_before_its_body_without_retries_is_502(
    gateway, servers
):
    _, only = canned(servers, _HEAD_ONLY)
    await _route(gateway, [only], retries="0")
    reply = await gateway.proxy.get("/x")
    assert reply.code == 502, reply.body
    assert reply.headers.getRawHeaders(b"x-from") is None
    assert reply.json["message"]
    assert await _counted(gateway, "502")


@pytest_twisted.ensureDeferred
async def test_a_head_then_silence_is_a_504(gateway, servers):
    _, only = canned(servers, _HEAD_ONLY, close=False)
    await _route(gateway, [only], retries="0", read_timeout="300")
    reply = await gateway.proxy.get("/x")
    assert reply.code == 504, reply.body


@pytest_twisted.ensureDeferred
async def test_head_answers_keep_the_targets_content_length(gateway, servers):
    _, only = canned(
        servers,
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 282\r\n\r\n",
        close=False,
    )
    await _route(gateway, [only])
    port = gateway.service.proxy_port.getHost().port
    raw = await raw_request(
        port, b"HEAD /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"Content-Length: 282" in head, raw
    assert b"Transfer-Encoding" not in head
    assert body == b""


@pytest_twisted.ensureDeferred
async def test_every_forwarded_for_line_is_kept(gateway, servers):
    target = TargetResource("t")
    port = listen(target)
    servers.append(port)
    await _route(gateway, [address(port)])
    proxy = gateway.service.proxy_port.getHost().port
    raw = await raw_request(
        proxy,
        b"GET /x HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.1.1.1\r\n"
        b"X-Forwarded-For: 2.2.2.2\r\nConnection: close\r\n\r\n",
    )
    assert raw.startswith(b"HTTP/1.1 200")
    chain = target.requests[-1]["headers"].getRawHeaders(b"x-forwarded-for")
    assert chain == [b"1.1.1.1, 2.2.2.2, 127.0.0.1"]


@pytest_twisted.ensureDeferred
async def test_a_broken_stream_says_why_in_words(gateway, servers):
    """
    A stream cut after its first event ends with an error event whose
    message is the cause, not the repr of a list of failures.
    """
    _, only = canned(
        servers,
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
        b"d\r\ndata: first\n\n\r\n",
    )
    await _route(gateway, [only])
    proxy = gateway.service.proxy_port.getHost().port
    raw = await raw_request(proxy, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert b"data: first" in raw
    event = raw[raw.index(b"event: error") :].split(b"data: ", 1)[1].split(b"\n")[0]
    message = json.loads(event)["error"]["message"]
    assert message.startswith("upstream stream broken: ")
    assert "Failure" not in message and "<" not in message, message


@pytest_twisted.ensureDeferred
async def test_a_client_gone_before_the_answer_is_a_499(gateway, servers):
    target = TargetResource("slow")
    target.delay = 0.5
    port = listen(target)
    servers.append(port)
    await _route(gateway, [address(port)])
    proxy = gateway.service.proxy_port.getHost().port
    conversation = await connect(proxy)
    conversation.transport.write(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")

    async def arrived() -> bool:
        return bool(target.requests)

    await wait_for(arrived, 5)
    conversation.transport.loseConnection()

    async def counted() -> bool:
        return await _counted(gateway, "499")

    await wait_for(counted, 5)
    # Nor is it the target's error: alerts on target error rates must not
    # fire when users cancel generations.
    codes = {
        dict(labels)["code"]
        for name, labels in await scrape(gateway)
        if name == "aigateway_upstream_target_requests_total"
    }
    assert codes == {"499"}, codes


@pytest_twisted.ensureDeferred
async def test_a_large_head_is_431_with_its_phrase(gateway):
    proxy = gateway.service.proxy_port.getHost().port
    raw = await raw_request(
        proxy, b"GET /x HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 70000 + b"\r\n\r\n"
    )
    assert raw.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), raw[:80]


@pytest_twisted.ensureDeferred
async def test_dot_segments_cannot_leave_a_routes_prefix(gateway, servers):
    """
    C{/chat/../admin} is C{/admin}: it does not match the route for
    C{/chat}, and a path that stays inside is forwarded resolved.
    """
    target = TargetResource("t")
    port = listen(target)
    servers.append(port)
    admin = gateway.admin
    assert (await admin.post("/upstreams", form={"name": "up"})).code == 201
    reply = await admin.post("/upstreams/up/targets", form={"target": address(port)})
    assert reply.code == 201
    assert (await admin.post("/services", form={"name": "s", "host": "up"})).code == 201
    route = {"paths[]": "/chat", "strip_path": "false"}
    assert (await admin.post("/services/s/routes", form=route)).code == 201
    proxy = gateway.service.proxy_port.getHost().port
    for path in (b"/chat/../admin", b"/chat/%2e%2e/admin"):
        raw = await raw_request(
            proxy, b"GET " + path + b" HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        )
        assert raw.startswith(b"HTTP/1.1 404"), raw[:80]
    assert target.requests == []
    raw = await raw_request(
        proxy, b"GET /chat/x/../y HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    assert raw.startswith(b"HTTP/1.1 200"), raw[:80]
    assert target.requests[-1]["uri"] == b"/chat/y"


@pytest_twisted.ensureDeferred
async def test_a_route_for_https_only_answers_plain_requests_426(gateway, servers):
    target = TargetResource("t")
    route = {"paths[]": "/secure", "protocols[]": "https"}
    await direct_route(gateway, servers, target, **route)
    reply = await gateway.proxy.get("/secure")
    assert reply.code == 426
    proxy = gateway.service.proxy_port.getHost().port
    raw = await raw_request(
        proxy, b"GET /secure HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    assert raw.startswith(b"HTTP/1.1 426 Upgrade Required\r\n"), raw[:60]
    assert reply.json["message"] == "Please use HTTPS protocol"
    assert target.requests == []


@pytest_twisted.ensureDeferred
async def test_via_is_appended_to_the_targets(gateway, servers):
    target = TargetResource("t")
    target.headers = {b"Via": b"1.1 model-server"}
    port = listen(target)
    servers.append(port)
    await _route(gateway, [address(port)])
    reply = await gateway.proxy.get("/x")
    via = reply.headers.getRawHeaders(b"via")
    assert via[0] == b"1.1 model-server"
    assert via[-1].startswith(b"1.1 aigateway")


@pytest_twisted.ensureDeferred
async def test_a_name_that_does_not_resolve_is_a_503(tmp_path):
    """
    A service's own host that does not resolve: 503, after one lookup (its
    retries would only look the same name up again).
    """
    log_path = tmp_path / "access.log"
    node = await Gateway(str(tmp_path / "dns.db"), access_log=str(log_path)).start()
    try:
        admin = node.admin
        service = {"name": "s", "host": "nowhere.invalid"}  # retries: 5
        assert (await admin.post("/services", form=service)).code == 201
        route = {"paths[]": "/"}
        assert (await admin.post("/services/s/routes", form=route)).code == 201
        reply = await node.proxy.get("/x")
        assert reply.code == 503, reply.body
        assert reply.json["message"] == "name resolution failed"
    finally:
        await node.stop()
    (line,) = [json.loads(text) for text in log_path.read_text().splitlines()]
    assert line["attempts"] == 1, line


@pytest_twisted.ensureDeferred
async def test_no_peer_says_why_in_the_access_log(tmp_path):
    log_path = tmp_path / "access.log"
    node = await Gateway(str(tmp_path / "np.db"), access_log=str(log_path)).start()
    try:
        admin = node.admin
        assert (await admin.post("/upstreams", form={"name": "empty"})).code == 201
        form = {"name": "s", "host": "empty"}
        assert (await admin.post("/services", form=form)).code == 201
        route = {"paths[]": "/"}
        assert (await admin.post("/services/s/routes", form=route)).code == 201
        assert (await node.proxy.get("/x")).code == 503
    finally:
        await node.stop()
    (line,) = [json.loads(text) for text in log_path.read_text().splitlines()]
    assert (line["status"], line["error"]) == (503, NO_PEER)


@pytest_twisted.ensureDeferred
async def test_status_counts_requests_in_flight_whatever_the_configuration(
    tmp_path, servers
):
    """
    C{/status} counts the requests being served, even once their target's
    upstream is deleted (its metric series go with it) and with metrics
    off.
    """
    node = await Gateway(str(tmp_path / "s.db"), metrics=False).start()
    try:
        sse = SSEResource(count=20, interval=0.05)
        port = listen(sse)
        servers.append(port)
        admin = node.admin
        assert (await admin.post("/upstreams", form={"name": "up"})).code == 201
        target = {"target": address(port)}
        assert (await admin.post("/upstreams/up/targets", form=target)).code == 201
        form = {"name": "s", "host": "up"}
        assert (await admin.post("/services", form=form)).code == 201
        route = {"paths[]": "/"}
        assert (await admin.post("/services/s/routes", form=route)).code == 201
        streams = []
        for _ in range(3):
            conversation = await connect(node.service.proxy_port.getHost().port)
            conversation.transport.write(b"GET /v1 HTTP/1.1\r\nHost: a\r\n\r\n")
            streams.append(conversation)
        for conversation in streams:
            await conversation.until(b"token0")
        assert (await admin.get("/status")).json["inflight_requests"] == 3
        (listed,) = (await admin.get("/services/s/routes")).json["data"]
        assert (await admin.delete("/routes/" + listed["id"])).code == 204
        assert (await admin.delete("/services/s")).code == 204
        assert (await admin.delete("/upstreams/up")).code == 204
        assert (await admin.get("/status")).json["inflight_requests"] == 3
        for conversation in streams:
            await conversation.until(b"0\r\n\r\n")
        assert (await admin.get("/status")).json["inflight_requests"] == 0
    finally:
        await node.stop()

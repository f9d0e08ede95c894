"""
LLM provider features end to end: per-target credentials, failover on
provider errors, honest broken streams, model-aware routing.
"""

from __future__ import annotations

import json

import pytest_twisted
from twisted.internet import reactor

from .gatewaykit import (
    Gateway,
    SSEResource,
    TargetResource,
    address,
    listen,
    raw_request,
    sleep,
)

KEY_A = "Bearer sk-aaaa-0123456789-secret-a"
KEY_B = "Bearer sk-bbbb-0123456789-secret-b"


@pytest_twisted.ensureDeferred
async def test_each_target_gets_its_own_key(tmp_path, servers):
    """
    Two targets with different Authorization headers: each receives only
    its own key, replacing the client's; the key never appears in admin
    answers, the access log or the metrics.
    """
    log = tmp_path / "access.log"
    node = await Gateway(str(tmp_path / "k.db"), access_log=str(log)).start()
    try:
        a, b = TargetResource("a"), TargetResource("b")
        servers.extend([port_a := listen(a), port_b := listen(b)])
        await node.admin.post("/upstreams", form={"name": "openai"})
        for port, key in ((port_a, KEY_A), (port_b, KEY_B)):
            reply = await node.admin.post(
                "/upstreams/openai/targets",
                form={"target": address(port), "headers.Authorization": key},
            )
            assert reply.code == 201
            assert reply.json["headers"]["Authorization"] == key[:10] + "…" + key[-4:]
        await node.admin.post("/services", form={"name": "chat", "host": "openai"})
        await node.admin.post("/services/chat/routes", form={"paths[]": "/v1"})
        for _ in range(20):
            reply = await node.proxy.post(
                "/v1/chat/completions",
                body=b"{}",
                headers={"Authorization": "Bearer client"},
            )
            assert reply.code == 200
        for target, key in ((a, KEY_A), (b, KEY_B)):
            assert len(target.requests) == 10
            seen = {
                tuple(r["headers"].getRawHeaders(b"authorization"))
                for r in target.requests
            }
            assert seen == {(key.encode(),)}

        # Patching another field keeps the secret.
        await node.admin.patch(
            f"/upstreams/openai/targets/{address(port_a)}", form={"weight": "50"}
        )
        await node.proxy.post("/v1/chat/completions", body=b"{}")
        assert a.requests[-1]["headers"].getRawHeaders(b"authorization") == [
            KEY_A.encode()
        ]

        exposed = []
        for path in (
            "/upstreams/openai/targets",
            "/upstreams/openai/targets/all",
            "/upstreams/openai/health",
            "/config",
            "/config?format=json",
            "/metrics",
        ):
            exposed.append((await node.admin.get(path)).body)
        await node.stop()
        exposed.append(log.read_bytes())
        for body in exposed:
            assert b"secret-a" not in body and b"secret-b" not in body
    finally:
        await node.stop()


@pytest_twisted.ensureDeferred
async def test_rate_limited_target_is_failed_over(gateway, servers):
    """
    Target A answers 429 with Retry-After: 1, B answers 200: 500 requests
    all get 200, and A gets no traffic during its cooldown.
    """
    a, b = TargetResource("a"), TargetResource("b")
    a.status, a.headers = 429, {b"retry-after": b"1"}
    servers.extend([port_a := listen(a), port_b := listen(b)])
    await gateway.configure("llm", {address(port_a): 100, address(port_b): 100})
    # Passive checks on: a rate limit must not count toward unhealthy.
    await gateway.admin.patch(
        "/upstreams/llm", form={"healthchecks.passive.unhealthy.http_failures": "1"}
    )
    started = reactor.seconds()
    for _ in range(500):
        reply = await gateway.proxy.post("/", body=b"{}")
        assert reply.code == 200 and reply.body == b"b"
    elapsed = reactor.seconds() - started
    hits = len(a.requests)
    # At most one hit per cooldown window that started, and only as the
    # first attempt of a request that then failed over.
    assert 1 <= hits <= int(elapsed) + 2, (hits, elapsed)
    health = (await gateway.admin.get("/upstreams/llm/health")).json["data"]
    limited = next(t for t in health if t["target"] == address(port_a))
    assert limited["health"] == "HEALTHY"
    assert limited["cooldown_until"] is not None
    # Healthy, but its weight is not available while it cools down: the
    # same answer the balancers and ?balancer_health=1 give.
    assert limited["data"]["weight"]["available"] == 0


@pytest_twisted.ensureDeferred
async def test_cooldown_ends(gateway, servers):
    """
    After Retry-After seconds the target is used again.
    """
    a, b = TargetResource("a"), TargetResource("b")
    a.status, a.headers = 429, {b"retry-after": b"1"}
    servers.extend([port_a := listen(a), port_b := listen(b)])
    await gateway.configure("llm", {address(port_a): 100, address(port_b): 100})
    for _ in range(4):
        await gateway.proxy.get("/")
    assert len(a.requests) == 1
    a.status, a.headers = 200, {}
    await sleep(1.2)
    bodies = [(await gateway.proxy.get("/")).body for _ in range(4)]
    assert bodies.count(b"a") == 2


@pytest_twisted.ensureDeferred
async def test_all_targets_fail_last_answer_passes(gateway, servers):
    """
    When every target answers 503, the client gets the last target's
    answer unchanged: status, body and Retry-After.
    """
    resources = []
    for name in ("x", "y", "z"):
        target = TargetResource(name)
        target.status = 503
        target.headers = {b"retry-after": b"7", b"content-type": b"application/json"}
        target.body = json.dumps({"error": {"message": f"{name} overloaded"}}).encode()
        resources.append(target)
        servers.append(listen(target))
    await gateway.configure("llm", {address(p): 100 for p in servers})
    reply = await gateway.proxy.post("/v1/chat/completions", body=b"{}")
    assert reply.code == 503
    assert sum(len(r.requests) for r in resources) == 3
    last = next(r for r in resources if r.requests and reply.body == r.body)
    assert reply.json == {"error": {"message": f"{last.name} overloaded"}}
    assert reply.headers.getRawHeaders(b"retry-after") == [b"7"]

    await gateway.admin.patch("/services/llm", json_body={"retry_on_statuses": []})
    before = sum(len(r.requests) for r in resources)
    reply = await gateway.proxy.post("/v1/chat/completions", body=b"{}")
    assert reply.code == 503
    assert sum(len(r.requests) for r in resources) == before + 1


@pytest_twisted.ensureDeferred
async def test_broken_stream_is_not_a_complete_answer(gateway, servers):
    """
    A stream broken after 3 of 10 events: the client sees the 3 events, an
    error event, and a connection closed without the chunked terminator;
    the target's passive failure counter went up.
    """
    sse = SSEResource(count=10, interval=0.02)
    sse.break_after = 3
    servers.append(port := listen(sse))
    await gateway.configure("stream", {address(port): 100})
    await gateway.admin.patch(
        "/upstreams/stream", form={"healthchecks.passive.unhealthy.tcp_failures": "5"}
    )
    proxy_port = gateway.service.proxy_port.getHost().port
    raw = await raw_request(
        proxy_port,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
    )
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"200 OK" in head and b"chunked" in head.lower()
    assert body.count(b"token") == 3
    assert b"event: error\ndata: " in body
    error = json.loads(body.split(b"event: error\ndata: ")[1].split(b"\n")[0])
    assert "upstream stream broken" in error["error"]["message"]
    assert not body.endswith(b"0\r\n\r\n")
    assert b"[DONE]" not in body
    health = (await gateway.admin.get("/upstreams/stream/health")).json["data"][0]
    assert health["counters"]["tcp_failures"] == 1


@pytest_twisted.ensureDeferred
async def test_stream_failing_before_first_event_fails_over(gateway, servers):
    """
    A target that fails before its first byte is retried on another target
    transparently: the client gets one whole stream.
    """
    dead = SSEResource(count=10, interval=0.01)
    dead.break_after = 0
    good = SSEResource(count=5, interval=0.01)
    servers.extend([port_dead := listen(dead), port_good := listen(good)])
    await gateway.configure(
        "stream", {address(port_dead): 100, address(port_good): 100}
    )
    for _ in range(4):
        reply = await gateway.proxy.post("/v1/chat/completions", body=b"{}")
        assert reply.code == 200
        assert reply.body.count(b"token") == 5
        assert reply.body.endswith(b"data: [DONE]\n\n")
    assert dead.connections


@pytest_twisted.ensureDeferred
async def test_models_route_to_services(gateway, servers):
    """
    Routes on the same path with models[] send each model to its own
    service; a request without a model takes the route without models.
    """
    gpt, llama, other = (
        TargetResource("gpt"),
        TargetResource("llama"),
        TargetResource("other"),
    )
    servers.extend(ports := [listen(gpt), listen(llama), listen(other)])
    admin = gateway.admin
    for name, port, models in (
        ("gpt", ports[0], ["gpt-4o"]),
        ("llama", ports[1], ["llama3", "llama3:70b"]),
        ("other", ports[2], None),
    ):
        await admin.post(
            "/services", form={"name": name, "url": f"http://{address(port)}"}
        )
        form = {"paths[]": "/v1/chat"}
        if models:
            form["models[]"] = models
        reply = await admin.post(f"/services/{name}/routes", form=form)
        assert reply.code == 201, reply.body
    for model, expected in (
        ("gpt-4o", b"gpt"),
        ("llama3:70b", b"llama"),
        ("llama3", b"llama"),
        ("mistral", b"other"),
    ):
        body = json.dumps({"model": model, "messages": []}).encode()
        reply = await gateway.proxy.post(
            "/v1/chat/completions",
            body=body,
            headers={"Content-Type": "application/json"},
        )
        assert reply.body == expected, model
    assert (await gateway.proxy.get("/v1/chat/completions")).body == b"other"
    assert (
        await gateway.proxy.post("/v1/chat/completions", body=b"not json")
    ).body == b"other"


@pytest_twisted.ensureDeferred
async def test_stalled_stream_is_cut_with_an_error_event(gateway, servers):
    """
    A stream whose target goes quiet for longer than the service's
    read_timeout is ended with an error event naming the read timeout, and
    counts as a passive timeout; the timer restarts with every chunk, so a
    stream that keeps talking is never cut.
    """
    stalling = SSEResource(count=10, interval=2.0)
    servers.append(port := listen(stalling))
    await gateway.configure("slow", {address(port): 100})
    await gateway.admin.patch("/services/slow", form={"read_timeout": "300"})
    await gateway.admin.patch(
        "/upstreams/slow", form={"healthchecks.passive.unhealthy.timeouts": "5"}
    )
    proxy_port = gateway.service.proxy_port.getHost().port
    raw = await raw_request(
        proxy_port, b"GET /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    body = raw.partition(b"\r\n\r\n")[2]
    assert body.count(b"token") == 1
    assert b"event: error" in body and b"read timeout" in body
    assert not body.endswith(b"0\r\n\r\n")
    health = (await gateway.admin.get("/upstreams/slow/health")).json["data"][0]
    assert health["counters"]["timeouts"] == 1

    steady = SSEResource(count=6, interval=0.2)
    servers.append(port := listen(steady))
    await gateway.configure("steady", {address(port): 100})
    await gateway.admin.patch("/services/steady", form={"read_timeout": "300"})
    await gateway.admin.patch(
        "/routes/"
        + (await gateway.admin.get("/services/steady/routes")).json["data"][0]["id"],
        form={"paths[]": "/steady"},
    )
    reply = await gateway.proxy.get("/steady")
    assert reply.body.count(b"token") == 6 and reply.body.endswith(b"[DONE]\n\n")

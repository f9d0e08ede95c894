"""
Metrics, token accounting and the access log, end to end.
"""

from __future__ import annotations

import json

import pytest_twisted
from twisted.internet.defer import ensureDeferred

from aigateway.proxy.usage import Sniffer, sniffer_for

from .gatewaykit import (
    Gateway,
    SSEResource,
    TargetResource,
    address,
    listen,
    raw_request,
    scrape,
    sleep,
)
from .gatewaykit import sample as value

COMPLETION = {
    "model": "gpt-test",
    "choices": [{"message": {"content": "hi"}}],
    "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
}


def answered(samples, service: str, route: str, code: str) -> float:
    """
    How many requests of a route were answered with C{code}.
    """
    return value(
        samples,
        "aigateway_http_requests_total",
        service=service,
        route=route,
        code=code,
    )


def health(samples, upstream: str, target: str, state: str) -> float:
    """
    The value of one target's health series for C{state}.
    """
    return value(
        samples,
        "aigateway_upstream_target_health",
        upstream=upstream,
        target=target,
        state=state,
    )


@pytest_twisted.ensureDeferred
async def test_known_mix(tmp_path, servers):
    """
    Retries, a 502 and a streamed completion with usage: every counter,
    histogram count and token total equals what was sent, and the access
    log has a line per request with its target, attempts and tokens.
    """
    log_path = tmp_path / "access.log"
    node = await Gateway(str(tmp_path / "m.db"), access_log=str(log_path)).start()
    try:
        good = TargetResource("good")
        good.headers = {b"content-type": b"application/json"}
        good.body = json.dumps(COMPLETION).encode()
        servers.append(good_port := listen(good))
        closed = listen(TargetResource("closed"))
        dead = address(closed)
        await closed.stopListening()
        await node.admin.post("/upstreams", form={"name": "llm"})
        for target in (address(good_port), dead):
            await node.admin.post("/upstreams/llm/targets", form={"target": target})
        await node.admin.post("/services", form={"name": "chat", "host": "llm"})
        await node.admin.post(
            "/services/chat/routes", form={"name": "chat-route", "paths[]": "/v1"}
        )

        await node.admin.post("/upstreams", form={"name": "gone"})
        await node.admin.post("/upstreams/gone/targets", form={"target": dead})
        await node.admin.post(
            "/services", form={"name": "broken", "host": "gone", "retries": "0"}
        )
        await node.admin.post(
            "/services/broken/routes",
            form={"name": "broken-route", "paths[]": "/broken"},
        )

        sse = SSEResource(count=3, interval=0.01)
        sse.usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
        servers.append(sse_port := listen(sse))
        await node.admin.post("/upstreams", form={"name": "streams"})
        await node.admin.post(
            "/upstreams/streams/targets", form={"target": address(sse_port)}
        )
        await node.admin.post(
            "/services", form={"name": "streaming", "host": "streams"}
        )
        await node.admin.post(
            "/services/streaming/routes",
            form={"name": "stream-route", "paths[]": "/stream"},
        )

        body = b'{"model": "gpt-test", "messages": []}'
        for _ in range(10):
            reply = await node.proxy.post("/v1/chat/completions", body=body)
            assert reply.code == 200
        assert (await node.proxy.get("/broken")).code == 502
        reply = await node.proxy.post("/stream", body=b'{"stream": true}')
        assert reply.code == 200 and b'"usage"' in reply.body

        samples = await scrape(node)
        good_key, route = address(good_port), "chat-route"
        assert (
            value(
                samples,
                "aigateway_http_requests_total",
                service="chat",
                route=route,
                code="200",
            )
            == 10
        )
        assert (
            value(
                samples,
                "aigateway_http_requests_total",
                service="broken",
                route="broken-route",
                code="502",
            )
            == 1
        )
        assert (
            value(
                samples,
                "aigateway_http_requests_total",
                service="streaming",
                route="stream-route",
                code="200",
            )
            == 1
        )
        assert (
            value(
                samples,
                "aigateway_upstream_target_requests_total",
                upstream="llm",
                target=good_key,
                code="200",
            )
            == 10
        )
        retried = value(
            samples,
            "aigateway_upstream_target_requests_total",
            upstream="llm",
            target=dead,
            code="error",
        )
        assert (
            retried == 5
        )  # equal weights: the dead target has every other first attempt
        assert (
            value(samples, "aigateway_proxy_retries_total", upstream="llm") == retried
        )
        assert (
            value(
                samples,
                "aigateway_upstream_target_requests_total",
                upstream="gone",
                target=dead,
                code="error",
            )
            == 1
        )
        assert (
            value(
                samples,
                "aigateway_request_latency_ms_count",
                service="chat",
                route=route,
            )
            == 10
        )
        assert (
            value(
                samples, "aigateway_proxy_latency_ms_count", service="chat", route=route
            )
            == 10
        )
        assert (
            value(
                samples,
                "aigateway_upstream_latency_ms_count",
                service="chat",
                route=route,
                upstream="llm",
                target=good_key,
            )
            == 10
        )
        assert value(
            samples,
            "aigateway_bandwidth_bytes_total",
            service="chat",
            route=route,
            direction="ingress",
        ) == 10 * len(body)
        assert value(
            samples,
            "aigateway_bandwidth_bytes_total",
            service="chat",
            route=route,
            direction="egress",
        ) == 10 * len(good.body)
        tokens = "aigateway_ai_llm_tokens_total"
        for kind, count in (("prompt", 110), ("completion", 70), ("total", 180)):
            assert (
                value(
                    samples,
                    tokens,
                    upstream="llm",
                    target=good_key,
                    model="gpt-test",
                    token_type=kind,
                )
                == count
            )
        assert (
            value(
                samples,
                "aigateway_ai_llm_requests_total",
                upstream="llm",
                target=good_key,
                model="gpt-test",
            )
            == 10
        )
        sse_key = address(sse_port)
        assert (
            value(
                samples,
                tokens,
                upstream="streams",
                target=sse_key,
                model="stream-model",
                token_type="total",
            )
            == 8
        )
        assert health(samples, "llm", good_key, "healthchecks_off") == 1
        assert (
            value(
                samples, "aigateway_inflight_requests", upstream="llm", target=good_key
            )
            == 0
        )
        assert value(samples, "aigateway_connections", state="upstream_pooled") >= 1

        await node.stop()
        lines = [json.loads(line) for line in log_path.read_text().splitlines()]
        assert len(lines) == 12
        chat = [line for line in lines if line["service"] == "chat"]
        assert sum(line["attempts"] - 1 for line in chat) == retried
        assert all(line["attempts"] in (1, 2) for line in chat)
        assert all(
            line["target"] == good_key and line["status"] == 200 for line in chat
        )
        assert all(line["tokens"]["total"] == 18 for line in chat)
        # In the order tried: the dead target first, then the one that answered.
        assert {tuple(line["tried"]) for line in chat if line["attempts"] == 2} == {
            (dead, good_key)
        }
        broken = next(line for line in lines if line["service"] == "broken")
        assert (broken["status"], broken["target"], broken["tokens"]) == (
            502,
            dead,
            None,
        )
        stream = next(line for line in lines if line["service"] == "streaming")
        assert stream["tokens"]["completion"] == 3
    finally:
        await node.stop()


@pytest_twisted.ensureDeferred
async def test_health_series_follow_probes_and_deletion(gateway, servers):
    """
    A target an active probe finds dead flips its health series within one
    interval; deleting the target removes every series that names it.
    """
    alive = TargetResource("alive")
    servers.append(port := listen(alive))
    doomed = listen(TargetResource("doomed"))
    doomed_key = address(doomed)
    await gateway.configure("checked", {address(port): 100, doomed_key: 100})
    await gateway.admin.patch(
        "/upstreams/checked",
        form={
            "healthchecks.active.healthy.interval": "0.5",
            "healthchecks.active.unhealthy.interval": "0.5",
            "healthchecks.active.unhealthy.tcp_failures": "1",
        },
    )
    for _ in range(4):
        await gateway.proxy.get("/")
    samples = await scrape(gateway)
    assert health(samples, "checked", doomed_key, "healthy") == 1
    await doomed.stopListening()
    await sleep(1.2)
    samples = await scrape(gateway)
    assert health(samples, "checked", doomed_key, "unhealthy") == 1
    assert health(samples, "checked", doomed_key, "healthy") == 0
    assert (
        value(
            samples,
            "aigateway_health_probes_total",
            upstream="checked",
            target=doomed_key,
            result="tcp_failure",
        )
        >= 1
    )
    assert (
        value(
            samples,
            "aigateway_health_probes_total",
            upstream="checked",
            target=address(port),
            result="200",
        )
        >= 1
    )

    assert (
        await gateway.admin.delete(f"/upstreams/checked/targets/{doomed_key}")
    ).code == 204
    samples = await scrape(gateway)
    assert not [key for key in samples if ("target", doomed_key) in key[1]]
    assert health(samples, "checked", address(port), "healthy") == 1


def test_sniffer_reads_usage():
    """
    JSON answers are parsed whole; streams only keep their tail; other
    content types are not looked at.
    """
    assert sniffer_for(b"text/html") is None
    json_sniffer = sniffer_for(b"application/json; charset=utf-8")
    document = json.dumps(COMPLETION).encode()
    for i in range(0, len(document), 7):
        json_sniffer.feed(document[i : i + 7])
    usage = json_sniffer.usage()
    assert (usage.model, usage.prompt, usage.completion, usage.total) == (
        "gpt-test",
        11,
        7,
        18,
    )

    stream = Sniffer(stream=True)
    for n in range(5000):
        stream.feed(b'data: {"choices": [{"delta": {"content": "x%d"}}]}\n\n' % n)
    stream.feed(
        b'data: {"model": "m", "usage": {"prompt_tokens": 1, "completion_tokens": 2}}\n\ndata: [DONE]\n\n'
    )
    usage = stream.usage()
    assert (usage.model, usage.prompt, usage.completion, usage.total) == ("m", 1, 2, 3)
    assert sum(len(c) for c in stream._chunks) < 20 * 1024

    plain = Sniffer(stream=False)
    plain.feed(b'{"no": "usage"}')
    assert plain.usage() is None


@pytest_twisted.ensureDeferred
async def test_metrics_off_access_log_on(tmp_path, servers):
    """
    --no-metrics leaves requests uncounted while the access log still
    writes its lines (so the cost of each can be measured apart).
    """
    log_path = tmp_path / "access.log"
    node = await Gateway(
        str(tmp_path / "off.db"), metrics=False, access_log=str(log_path)
    ).start()
    try:
        servers.append(port := listen(TargetResource("t")))
        await node.configure("up", {address(port): 100})
        for _ in range(3):
            assert (await node.proxy.get("/")).code == 200
        # A path with characters JSON must escape, in a raw request.
        raw = await raw_request(
            node.service.proxy_port.getHost().port,
            b'GET /q"\\\xe9?x=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n',
        )
        # (The twisted.web target may refuse such a path: any answer will do.)
        status = int(raw.split(b" ", 2)[1])
        samples = await scrape(node)
        assert not [key for key in samples if key[0] == "aigateway_http_requests_total"]
        assert health(samples, "up", address(port), "healthchecks_off") == 1
    finally:
        await node.stop()
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert len(lines) == 4
    assert lines[-1]["path"] == '/q"\\\xe9' and lines[-1]["status"] == status
    first = lines[0]
    assert set(first) == {
        "time",
        "request_id",
        "client_ip",
        "method",
        "path",
        "route",
        "service",
        "upstream",
        "target",
        "status",
        "attempts",
        "tried",
        "bytes_in",
        "bytes_out",
        "latency_ms",
        "tokens",
        "error",
        "client_gone",
    }
    assert first["method"] == "GET" and first["status"] == 200
    assert first["upstream"] == "up" and first["target"] == address(port)
    assert first["tried"] == [address(port)] and first["client_gone"] is False
    assert first["tokens"] is None and first["error"] is None
    assert all(isinstance(v, float) for v in first["latency_ms"].values())


@pytest_twisted.ensureDeferred
async def test_route_series_go_with_their_route(gateway, servers):
    """
    Deleting a route (or renaming it) removes the series labelled with it;
    deleting an upstream removes its retry series.
    """
    servers.append(port := listen(TargetResource("t")))
    await gateway.configure("up", {address(port): 100})
    (route,) = (await gateway.admin.get("/routes")).json["data"]
    assert (await gateway.proxy.get("/")).code == 200
    samples = await scrape(gateway)
    assert answered(samples, "up", route["id"], "200") == 1
    await gateway.admin.patch(f"/routes/{route['id']}", form={"name": "renamed"})
    samples = await scrape(gateway)
    assert not [key for key in samples if ("route", route["id"]) in key[1]]
    assert (await gateway.proxy.get("/")).code == 200
    samples = await scrape(gateway)
    assert answered(samples, "up", "renamed", "200") == 1
    await gateway.admin.delete("/routes/renamed")
    samples = await scrape(gateway)
    assert not [key for key in samples if ("route", "renamed") in key[1]]


@pytest_twisted.ensureDeferred
async def test_attempt_in_flight_when_its_target_goes(gateway, servers):
    """
    An attempt shows in the in-flight gauge and C{/status} while it runs.
    When its target is deleted meanwhile, the attempt still ends normally,
    and its end does not bring back series naming the deleted target; the
    route's series count the request.
    """
    slow = TargetResource("slow")
    slow.delay = 0.5
    servers.append(slow_port := listen(slow))
    servers.append(other_port := listen(TargetResource("other")))
    slow_key = address(slow_port)
    await gateway.configure("up", {slow_key: 100})
    (route,) = (await gateway.admin.get("/routes")).json["data"]
    pending = ensureDeferred(gateway.proxy.get("/"))
    await sleep(0.2)
    samples = await scrape(gateway)
    gauge = "aigateway_inflight_requests"
    assert value(samples, gauge, upstream="up", target=slow_key) == 1
    assert (await gateway.admin.get("/status")).json["inflight_requests"] == 1
    await gateway.admin.post(
        "/upstreams/up/targets", form={"target": address(other_port)}
    )
    assert (await gateway.admin.delete(f"/upstreams/up/targets/{slow_key}")).code == 204
    reply = await pending
    assert reply.code == 200 and reply.body == b"slow"
    samples = await scrape(gateway)
    assert not [key for key in samples if ("target", slow_key) in key[1]]
    assert (await gateway.admin.get("/status")).json["inflight_requests"] == 0
    assert (await gateway.proxy.get("/")).body == b"other"
    samples = await scrape(gateway)
    assert answered(samples, "up", route["id"], "200") == 2
    assert (
        value(
            samples,
            "aigateway_upstream_target_requests_total",
            upstream="up",
            target=address(other_port),
            code="200",
        )
        == 1
    )


@pytest_twisted.ensureDeferred
async def test_no_latency_series_without_a_first_byte(gateway, servers):
    """
    A target that never answered (connection refused) has attempt counts
    but no first-byte latency series; the one that answered has one.
    """
    servers.append(port := listen(TargetResource("ok")))
    closed = listen(TargetResource("closed"))
    dead = address(closed)
    await closed.stopListening()
    await gateway.configure("up", {address(port): 100, dead: 100})
    for _ in range(4):
        assert (await gateway.proxy.get("/")).code == 200
    samples = await scrape(gateway)
    latency = "aigateway_upstream_latency_ms_count"
    assert [
        key for key in samples if key[0] == latency and ("target", dead) in key[1]
    ] == []
    assert [
        key
        for key in samples
        if key[0] == latency and ("target", address(port)) in key[1]
    ]
    assert (
        value(
            samples,
            "aigateway_upstream_target_requests_total",
            upstream="up",
            target=dead,
            code="error",
        )
        >= 1
    )


@pytest_twisted.ensureDeferred
async def test_a_retry_after_its_route_is_deleted_brings_no_series_back(
    gateway, servers
):
    """
    An exchange whose route is deleted while it waits, and which then
    retries on another target, counts nothing under the deleted route's
    labels; its targets, still configured, count both attempts.
    """
    keys = []
    for name in ("a", "b"):
        busy = TargetResource(name)
        busy.status = 503
        busy.delay = 0.5
        servers.append(port := listen(busy))
        keys.append(address(port))
    await gateway.configure("up", dict.fromkeys(keys, 100))
    reply = await gateway.admin.patch(
        "/services/up", form={"retries": "1", "retry_on_statuses": "503"}
    )
    assert reply.code == 200, reply.body
    (route,) = (await gateway.admin.get("/routes")).json["data"]
    pending = ensureDeferred(gateway.proxy.get("/"))
    await sleep(0.2)
    assert (await gateway.admin.delete(f"/routes/{route['id']}")).code == 204
    assert (await pending).code == 503
    samples = await scrape(gateway)
    assert not [key for key in samples if ("route", route["id"]) in key[1]]
    for key in keys:
        assert (
            value(
                samples,
                "aigateway_upstream_target_requests_total",
                upstream="up",
                target=key,
                code="503",
            )
            == 1
        )

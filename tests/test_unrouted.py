"""
Requests the gateway answers itself, without a route (404 when none
matches, 426 on a route for https only): counted in the metrics under
empty service and route labels and logged, like every other request.
"""

from __future__ import annotations

import json

import pytest_twisted

from aigateway.proxy.resource import NO_ROUTE

from .gatewaykit import Gateway, TargetResource, direct_route, raw_request, scrape
from .gatewaykit import sample as value


def _unrouted(samples, name: str, **labels: str) -> float:
    return value(samples, name, service="", route="", **labels)


@pytest_twisted.ensureDeferred
async def test_unrouted_requests_are_counted_and_logged(tmp_path, servers):
    log_path = tmp_path / "access.log"
    node = await Gateway(str(tmp_path / "u.db"), access_log=str(log_path)).start()
    try:
        route = {"name": "secure", "paths[]": "/secure", "protocols[]": "https"}
        await direct_route(node, servers, TargetResource("t"), **route)

        assert (await node.proxy.get("/nothing")).code == 404
        reply = await node.proxy.post("/nothing/else", body=b"12345")
        assert reply.code == 404
        # A scanner's paths and hosts make no series of their own.
        raw = await raw_request(
            node.service.proxy_port.getHost().port,
            b"GET /.env HTTP/1.1\r\nHost: x.example\r\nConnection: close\r\n\r\n",
        )
        assert raw.startswith(b"HTTP/1.1 404"), raw[:60]
        assert (await node.proxy.get("/secure")).code == 426

        samples = await scrape(node)
        requests = "aigateway_http_requests_total"
        assert _unrouted(samples, requests, code="404") == 3
        assert _unrouted(samples, requests, code="426") == 1
        latency = "aigateway_request_latency_ms_count"
        assert _unrouted(samples, latency) == 4
        bandwidth = "aigateway_bandwidth_bytes_total"
        assert _unrouted(samples, bandwidth, direction="ingress") == 5
        assert _unrouted(samples, bandwidth, direction="egress") == 0
        series = {
            labels
            for (name, labels) in samples
            if name == requests and ("route", "") in labels
        }
        assert len(series) == 2  # 404 and 426, nothing per path or host
        # The secure route itself counts nothing: it never forwarded.
        assert value(samples, requests, service="s", route="secure", code="426") == 0

        # A configuration change (series of deleted routes are forgotten)
        # keeps the unrouted counts.
        assert (await node.admin.delete("/services/s/routes/secure")).code == 204
        assert (await node.proxy.get("/secure")).code == 404
        samples = await scrape(node)
        assert _unrouted(samples, requests, code="404") == 4
        assert _unrouted(samples, requests, code="426") == 1
    finally:
        await node.stop()

    lines = [json.loads(text) for text in log_path.read_text().splitlines()]
    assert [entry["status"] for entry in lines] == [404, 404, 404, 426, 404]
    first, posted, scanned, upgrade = lines[:4]
    for entry in lines:
        assert entry["service"] == entry["route"] == ""
        assert entry["upstream"] is None and entry["target"] is None
        assert entry["attempts"] == 0 and entry["tried"] == []
        assert entry["tokens"] is None and entry["client_gone"] is False
        assert entry["latency_ms"]["upstream"] is None
        assert entry["latency_ms"]["proxy"] is None
        assert isinstance(entry["latency_ms"]["request"], float)
        assert entry["client_ip"] == "127.0.0.1"
        assert len(entry["request_id"]) == 24
    assert first["method"] == "GET" and first["path"] == "/nothing"
    assert first["error"] == NO_ROUTE == "no Route matched with those values"
    assert posted["method"] == "POST" and posted["path"] == "/nothing/else"
    assert posted["bytes_in"] == 5 and posted["bytes_out"] == 0
    assert scanned["path"] == "/.env"
    assert upgrade["path"] == "/secure"
    assert upgrade["error"] == "Please use HTTPS protocol"


@pytest_twisted.ensureDeferred
async def test_the_logged_id_is_the_answered_one(tmp_path):
    log_path = tmp_path / "access.log"
    node = await Gateway(str(tmp_path / "u.db"), access_log=str(log_path)).start()
    try:
        reply = await node.proxy.get("/nothing")
        assert reply.code == 404
    finally:
        await node.stop()
    (entry,) = [json.loads(text) for text in log_path.read_text().splitlines()]
    assert entry["request_id"] == reply.json["request_id"]
    assert [entry["request_id"]] == [
        v.decode() for v in reply.headers.getRawHeaders(b"x-request-id")
    ]


@pytest_twisted.ensureDeferred
async def test_unrouted_requests_without_metrics_are_still_logged(tmp_path):
    log_path = tmp_path / "access.log"
    node = await Gateway(
        str(tmp_path / "u.db"), metrics=False, access_log=str(log_path)
    ).start()
    try:
        assert (await node.proxy.get("/nothing")).code == 404
        samples = await scrape(node)
        assert not [k for k in samples if k[0] == "aigateway_http_requests_total"]
    finally:
        await node.stop()
    lines = log_path.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["status"] == 404

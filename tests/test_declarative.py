"""
Declarative configuration: load, export, round trip, and all-or-nothing.
"""

from __future__ import annotations

import pytest
import pytest_twisted
import yaml

from aigateway import declarative

from .gatewaykit import Gateway, TargetResource, listen

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

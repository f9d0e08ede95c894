"""
The Load Balancing documentation is the acceptance test of the Admin API:
every curl command in it is run as written (ports aside) with the real
curl against a running gateway.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest_twisted
from twisted.internet.utils import getProcessOutputAndValue

DOC = Path(__file__).parent.parent / "docs" / "load-balancing.md"


def doc_commands() -> list[list[str]]:
    """
    The curl commands of the documentation, as argument lists.
    """
    text = DOC.read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.strip()
            if line.startswith("curl "):
                commands.append(shlex.split(line))
    return commands


def test_doc_has_the_commands():
    """
    The parser finds all thirteen commands of the documentation.
    """
    assert len(doc_commands()) == 13


@pytest_twisted.ensureDeferred
async def test_every_documented_command(gateway):
    """
    Each command gets a 2xx, except the two alternative creations of
    C{ai-upstream}, which get a 409 that says how to change the algorithm;
    and what is stored is what the commands said.
    """
    port = gateway.service.admin_port.getHost().port
    results = []
    for argv in doc_commands():
        argv = [a.replace("localhost:8001", f"127.0.0.1:{port}") for a in argv]
        out, err, code = await getProcessOutputAndValue(
            "curl", ["-s", "-w", "\n%{http_code}", *argv[1:]]
        )
        assert code == 0, err
        body, _, status = out.decode().rpartition("\n")
        results.append((argv, int(status), body))

    conflicts = [r for r in results if r[1] == 409]
    assert len(conflicts) == 2
    for argv, _status, body in conflicts:
        assert "name=ai-upstream" in argv
        assert "PATCH /upstreams/ai-upstream" in body
    for argv, status, body in results:
        if status != 409:
            assert 200 <= status < 300, (argv, status, body)

    upstream = (await gateway.admin.get("/upstreams/ai-upstream")).json
    assert upstream["algorithm"] == "round-robin"
    active = upstream["healthchecks"]["active"]
    assert active["http_path"] == "/health"
    assert active["healthy"]["interval"] == 5
    assert active["unhealthy"]["interval"] == 5
    passive = upstream["healthchecks"]["passive"]
    assert passive["healthy"]["successes"] == 3
    assert passive["unhealthy"]["http_failures"] == 3

    targets = (await gateway.admin.get("/upstreams/ai-upstream/targets")).json["data"]
    by_target = {t["target"]: t for t in targets}
    assert by_target["api1.example.com:443"]["weight"] == 200
    assert by_target["backup-api.example.com:443"]["backup"] is True
    openai = (await gateway.admin.get("/upstreams/openai-upstream/targets")).json[
        "data"
    ]
    assert sorted(t["target"] for t in openai) == [
        "api.openai.com:443",
        "api2.openai.com:443",
    ]

    health = (await gateway.admin.get("/upstreams/ai-upstream/health")).json
    assert {t["target"] for t in health["data"]} == set(by_target)
    metrics = await gateway.admin.get("/metrics")
    assert metrics.code == 200

"""
The README's 'Several processes, one configuration', as a user runs it:
two C{twistd -n aigateway} processes on one C{reuseport:} port and one
SQLite file, a real model server (examples/mock_llm.py) behind them,
configured once through one process's Admin API.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).parent.parent
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _call(
    url: str, data: dict[str, str] | None = None, method: str | None = None
) -> Any:
    body = None if data is None else urllib.parse.urlencode(data).encode()
    request = urllib.request.Request(url, data=body, method=method)
    with urllib.request.urlopen(request, timeout=5) as reply:
        return reply.status, reply.read()


def _until(check: Any, bound: float, what: str) -> Any:
    deadline = time.monotonic() + bound
    while True:
        try:
            result = check()
            if result:
                return result
        except (OSError, urllib.error.URLError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {bound} s")
        time.sleep(0.1)


def _metric(admin: str, name: str) -> float:
    status, body = _call(f"{admin}/metrics")
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _twistd(
    tmp_path: Path, name: str, proxy: str, admin: int, database: str | None = None
) -> list[str]:
    """
    The command line of a gateway process: its pid file and log named
    C{name} in C{tmp_path}, and its own SQLite file unless C{database}.
    """
    return [
        str(BIN / "twistd"),
        "-n",
        "--pidfile",
        str(tmp_path / f"{name}.pid"),
        "--logfile",
        str(tmp_path / f"{name}.log"),
        "aigateway",
        "--proxy",
        proxy,
        "--admin",
        f"tcp:{admin}:interface=127.0.0.1",
        "--database",
        database or str(tmp_path / f"{name}.db"),
    ]


def _mock(port: int, *options: str) -> subprocess.Popen[bytes]:
    """
    A model server (examples/mock_llm.py) on C{port}.
    """
    return subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "mock_llm.py"), "--port", str(port)]
        + list(options),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_two_processes_one_port_one_database(tmp_path):
    proxy, target = _free_port(), _free_port()
    admins = [_free_port(), _free_port()]
    started: list[subprocess.Popen[bytes]] = []
    try:
        started.append(_mock(target))
        for n, admin in enumerate(admins):
            command = _twistd(
                tmp_path,
                f"gw{n}",
                f"reuseport:{proxy}:interface=127.0.0.1",
                admin,
                str(tmp_path / "aigateway.db"),
            )
            command += ["--db-update-frequency", "0.2"]
            started.append(subprocess.Popen(command, cwd=tmp_path))
        first, second = (f"http://127.0.0.1:{a}" for a in admins)
        for admin in (first, second):
            _until(lambda a=admin: _call(f"{a}/status")[0] == 200, 30, "Admin API")
        _until(
            lambda: _call(f"http://127.0.0.1:{target}/v1/models")[0] == 200, 30, "model"
        )

        # Configured once, through the first process only.
        assert _call(f"{first}/upstreams", {"name": "ai"})[0] == 201
        assert (
            _call(f"{first}/upstreams/ai/targets", {"target": f"127.0.0.1:{target}"})[0]
            == 201
        )
        assert _call(f"{first}/services", {"name": "ai", "host": "ai"})[0] == 201
        assert _call(f"{first}/services/ai/routes", {"paths[]": "/v1"})[0] == 201
        # The second process's change feed brings it in force (/metrics does
        # not itself read the store).
        _until(
            lambda: _metric(second, "aigateway_configuration_version") == 4,
            10,
            "the second process loading the configuration",
        )

        chat = json.dumps(
            {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        )
        for n in range(60):
            request = urllib.request.Request(
                f"http://127.0.0.1:{proxy}/v1/chat/completions",
                data=chat.encode(),
                headers={"Content-Type": "application/json", "Connection": "close"},
            )
            with urllib.request.urlopen(request, timeout=5) as reply:
                assert reply.status == 200
                assert json.loads(reply.read())["choices"][0]["message"]["content"]
            if n == 30:
                # A change through the second process, mid-traffic.
                status, _ = _call(
                    f"{second}/upstreams/ai/targets/127.0.0.1:{target}",
                    {"weight": "50"},
                    method="PATCH",
                )
                assert status == 200
        # The kernel spread the connections over both processes.
        served = [_metric(a, "aigateway_http_requests_total") for a in (first, second)]
        assert sum(served) == 60 and min(served) > 0, served
        _until(
            lambda: _metric(first, "aigateway_configuration_version") == 5,
            10,
            "the first process loading the second one's change",
        )
    finally:
        for process in started:
            process.terminate()
        for process in started:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
    for n in range(2):
        log = (tmp_path / f"gw{n}.log").read_text()
        assert "Traceback" not in log and "Unhandled" not in log, log[-2000:]


def test_a_busy_port_fails_the_process(tmp_path):
    """
    A supervisor must see a gateway that could not start as failed: exit
    status 1, and one line that says why (no traceback).
    """
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        process = subprocess.run(
            _twistd(tmp_path, "busy", f"tcp:{port}:interface=127.0.0.1", _free_port()),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
        )
    assert process.returncode == 1
    log = (tmp_path / "busy.log").read_text()
    assert "could not start: Couldn't listen on" in log
    assert "Traceback" not in log


def test_an_unreachable_database_fails_the_process(tmp_path):
    pytest.importorskip("psycopg")
    command = _twistd(
        tmp_path,
        "nodb",
        f"tcp:{_free_port()}:interface=127.0.0.1",
        _free_port(),
        f"postgresql://aigateway@127.0.0.1:{_free_port()}/nothing",
    )
    process = subprocess.run(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60
    )
    assert process.returncode == 1
    log = (tmp_path / "nodb.log").read_text()
    assert "could not start:" in log and "Traceback" not in log, log[-2000:]


def test_sigterm_lets_a_stream_finish(tmp_path):
    """
    A rolling restart: SIGTERM while a stream is in progress; the stream
    arrives whole, new connections are refused, and the process then ends.
    """
    proxy, admin, target = _free_port(), _free_port(), _free_port()
    mock = _mock(target, "--chunks", "12", "--chunk-delay", "0.1")
    gateway = subprocess.Popen(
        _twistd(tmp_path, "gw", f"tcp:{proxy}:interface=127.0.0.1", admin),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{admin}"
        _until(lambda: _call(base + "/status"), 30, "the Admin API")
        _call(base + "/services", {"name": "s", "url": f"http://127.0.0.1:{target}"})
        _call(base + "/services/s/routes", {"paths[]": "/", "strip_path": "false"})
        body = json.dumps({"model": "m", "stream": True}).encode()
        with socket.create_connection(("127.0.0.1", proxy), timeout=10) as client:
            client.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\n"
                b"Content-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            received = client.recv(65536)
            assert b"data:" in received
            gateway.terminate()
            while not received.endswith(b"0\r\n\r\n"):
                more = client.recv(65536)
                assert more, received[-200:]
                received += more
        assert received.count(b"data: {") == 12 and b"data: [DONE]" in received
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", proxy), timeout=2).close()
        # (twistd ends by raising the signal it was stopped with again.)
        assert gateway.wait(timeout=30) == -signal.SIGTERM
        assert "Traceback" not in (tmp_path / "gw.log").read_text()
    finally:
        for process in (gateway, mock):
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)

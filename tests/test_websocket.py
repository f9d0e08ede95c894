"""
WebSocket handshakes through a real gateway to a real WebSocket target:
the 101 is passed on, bytes go both ways as they come, with backpressure,
and either side closing, or both going quiet for the service's
C{read_timeout}, closes the other.
"""

from __future__ import annotations

import base64
import os
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, ssl
from twisted.internet.error import ConnectionDone

from aigateway.proxy._parser import RequestParser
from aigateway.proxy._transport import unsent

from .gatewaykit import (
    TargetResource,
    address,
    listen,
    log_events,
    sample,
    scrape,
    sleep,
    wait_for,
)
from .test_proxy_answers import canned
from .test_server import Conversation, connect
from .tlskit import certificate
from .wskit import (
    CLOSE,
    EchoSockets,
    StubbornSockets,
    accept_for,
    frame,
    frames,
    handshake,
)


async def _route(gateway: Any, target: str, **service: str) -> None:
    """
    Route everything to C{target}, which one failure or timeout of a
    proxied request (passive health) would take out.
    """
    admin = gateway.admin
    form = {
        "name": "up",
        "healthchecks.passive.unhealthy.tcp_failures": "1",
        "healthchecks.passive.unhealthy.timeouts": "1",
    }
    assert (await admin.post("/upstreams", form=form)).code == 201
    form = {"target": target, "headers.Authorization": "Bearer sk-target-key"}
    assert (await admin.post("/upstreams/up/targets", form=form)).code == 201
    form = {"name": "s", "host": "up", **service}
    assert (await admin.post("/services", form=form)).code == 201
    assert (await admin.post("/services/s/routes", form={"paths[]": "/"})).code == 201


def _echo(
    servers: list[Any], kind: type[EchoSockets] = EchoSockets
) -> tuple[EchoSockets, str]:
    sockets = kind()
    port = reactor.listenTCP(0, sockets, interface="127.0.0.1")
    servers.append(port)
    return sockets, address(port)


def _echo_tls(servers: list[Any]) -> tuple[EchoSockets, str]:
    """
    An echo target behind TLS (for a service with C{protocol=https} and
    C{tls_verify=false}).
    """
    sockets = EchoSockets()
    cert, key = certificate("127.0.0.1")
    options = ssl.PrivateCertificate.loadPEM(cert + key).options()
    port = reactor.listenSSL(0, sockets, options, interface="127.0.0.1")
    servers.append(port)
    return sockets, address(port)


async def _open(gateway: Any, path: bytes = b"/ws") -> tuple[Conversation, bytes]:
    """
    A client connection through the gateway after its handshake, and the
    head of the answer (what followed it stays in the conversation's data).
    """
    key = base64.b64encode(os.urandom(16))
    client = await connect(gateway.service.proxy_port.getHost().port)
    client.transport.write(handshake(key, path))
    await client.until(b"\r\n\r\n")
    head, _, client.data = client.data.partition(b"\r\n\r\n")
    return client, head + b"\r\n" + b"Expected-Accept: " + accept_for(key)


async def _messages(client: Conversation, count: int) -> list[bytes]:
    async def enough() -> bool:
        return len(frames(client.data)[0]) >= count or client.is_closed

    await wait_for(enough, 5, 0.01)
    return [payload for _, payload in frames(client.data)[0]]


async def _deaf(gateway: Any, sockets: EchoSockets) -> tuple[Conversation, Any]:
    """
    A client's tunnel through the gateway to a target connection (of
    C{sockets}) that stops reading until it is resumed, and from then on
    only counts what it gets.
    """
    client, _ = await _open(gateway)
    await _messages(client, 1)
    socket = sockets.connections[-1]
    socket.counting = True
    socket.transport.pauseProducing()
    return client, socket


def _header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


async def _counted(gateway: Any, code: str) -> bool:
    return any(
        name == "aigateway_http_requests_total" and ("code", code) in labels
        for name, labels in await scrape(gateway)
    )


@pytest_twisted.ensureDeferred
async def test_a_websocket_is_relayed_both_ways(gateway, servers):
    sockets, target = _echo(servers)
    await _route(gateway, target)
    client, head = await _open(gateway)
    assert head.startswith(b"HTTP/1.1 101 "), head
    assert _header(head, b"upgrade") == b"websocket"
    assert _header(head, b"connection") == b"upgrade"
    # The target answered the key the client sent: the handshake is whole.
    assert _header(head, b"sec-websocket-accept") == _header(head, b"expected-accept")
    assert _header(head, b"x-request-id")
    assert _header(head, b"content-length") is None
    assert _header(head, b"transfer-encoding") is None

    # What the target sent in the same write as its 101 arrives too.
    assert await _messages(client, 1) == [b"hello"]
    sent = 0
    for text in (b"one", b"two", b"three" * 100_000):
        data = frame(text)
        sent += len(data)
        client.transport.write(data)
    assert await _messages(client, 4) == [b"hello", b"one", b"two", b"three" * 100_000]

    line, headers = sockets.handshakes[-1]
    assert line == b"GET /ws HTTP/1.1"
    assert headers[b"upgrade"] == b"websocket"
    assert headers[b"connection"] == b"upgrade"
    assert headers[b"sec-websocket-version"] == b"13"
    assert headers[b"x-forwarded-for"] == b"127.0.0.1"
    # The target's own credentials, as for any request.
    assert headers[b"authorization"] == b"Bearer sk-target-key"

    # The client's close: the target answers and closes, and so does the
    # gateway, towards the client.
    closing = frame(b"", CLOSE)
    client.transport.write(closing)
    await wait_for(lambda: _async(client.is_closed), 5, 0.01)
    assert sockets.closed == 1
    assert await _counted(gateway, "101")
    # The bytes each way are counted as the tunnel's body bytes.
    samples = await scrape(gateway)
    labels = {"service": "s", "route": _route_id(samples)}
    bandwidth = "aigateway_bandwidth_bytes_total"
    assert sample(samples, bandwidth, direction="ingress", **labels) == sent + len(
        closing
    )
    assert sample(samples, bandwidth, direction="egress", **labels) == len(client.data)


def _route_id(samples: Any) -> str:
    (route,) = {
        dict(labels)["route"]
        for name, labels in samples
        if name == "aigateway_bandwidth_bytes_total"
    }
    return route


async def _async(value: Any) -> Any:
    return value


@pytest_twisted.ensureDeferred
async def test_the_client_leaving_closes_the_target_side(gateway, servers):
    sockets, target = _echo(servers)
    await _route(gateway, target)
    client, head = await _open(gateway)
    assert head.startswith(b"HTTP/1.1 101 ")
    assert sockets.closed == 0
    client.transport.loseConnection()
    await wait_for(lambda: _async(sockets.closed == 1), 5, 0.01)
    # Nothing was blamed on the target.
    health = (await gateway.admin.get("/upstreams/up/health")).json["data"][0]
    assert health["health"] == "HEALTHY"
    assert set(health["counters"].values()) == {0}


@pytest.mark.parametrize("tls", [False, True])
@pytest_twisted.ensureDeferred
async def test_what_the_client_sent_before_leaving_reaches_the_target(
    gateway, servers, tls
):
    """
    A client that sends its last messages and a close frame and hangs up at
    once: the gateway reads the end of its stream while some of those bytes
    still wait for the target, which gets them all, then a clean close (as
    through nginx; TLS's close_notify to a TLS target), not a reset that
    throws them away.
    """
    if tls:
        sockets, target = _echo_tls(servers)
        await _route(gateway, target, protocol="https", tls_verify="false")
    else:
        sockets, target = _echo(servers)
        await _route(gateway, target)
    client, socket = await _deaf(gateway, sockets)
    before = socket.received
    data = frame(b"y" * 1024) * (8 * 1024) + frame(b"", CLOSE)
    with log_events() as events:
        client.transport.write(data)
        client.transport.loseConnection()
        await sleep(0.5)
        socket.transport.resumeProducing()
        await wait_for(lambda: _async(sockets.closed == 1), 10, 0.05)
        await sleep(0.1)
    assert socket.received - before == len(data)
    assert sockets.reasons == [ConnectionDone]
    assert not [event for event in events if event.get("isError")]
    health = (await gateway.admin.get("/upstreams/up/health")).json["data"][0]
    assert set(health["counters"].values()) == {0}


@pytest_twisted.ensureDeferred
async def test_a_target_that_talks_on_after_the_client_left_is_cut(gateway, servers):
    """
    Once the client has left, the target's side is ended, and what the
    target still sends is dropped and does not keep the tunnel alive: a
    target that neither closes nor goes quiet is cut after the service's
    read_timeout, not kept for ever.
    """
    sockets, target = _echo(servers, StubbornSockets)
    await _route(gateway, target, read_timeout="400")
    client, _ = await _open(gateway)
    await _messages(client, 1)
    client.transport.loseConnection()
    took = await wait_for(lambda: _async(sockets.closed == 1), 5, 0.05)
    assert took >= 0.3
    health = (await gateway.admin.get("/upstreams/up/health")).json["data"][0]
    assert set(health["counters"].values()) == {0}


@pytest_twisted.ensureDeferred
async def test_a_quiet_tunnel_closes_after_the_read_timeout(gateway, servers):
    """
    Bytes either way keep a tunnel open past the service's read_timeout;
    once neither side sends anything for that long, both are closed, and
    the target is not held responsible.
    """
    sockets, target = _echo(servers)
    await _route(gateway, target, read_timeout="400")
    client, _ = await _open(gateway)
    # Client to target only (the echo is answered, but only the client's
    # sending is needed): 8 messages 100 ms apart, twice the timeout.
    for index in range(8):
        client.transport.write(frame(b"%d" % index))
        await sleep(0.1)
    assert not client.is_closed
    assert len(await _messages(client, 9)) == 9
    await wait_for(lambda: _async(client.is_closed), 5, 0.05)
    assert sockets.closed == 1
    health = (await gateway.admin.get("/upstreams/up/health")).json["data"][0]
    assert health["health"] == "HEALTHY"
    assert set(health["counters"].values()) == {0}


@pytest_twisted.ensureDeferred
async def test_a_refused_handshake_is_an_ordinary_answer(gateway, servers):
    _, target = _echo(servers)
    await _route(gateway, target)
    client, head = await _open(gateway, b"/refuse")
    assert head.startswith(b"HTTP/1.1 403 "), head
    assert _header(head, b"upgrade") is None
    await client.until(b"not here")
    assert client.data == b"not here"
    assert not client.is_closed
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_a_switch_nobody_asked_for_is_a_502(gateway, servers):
    _, only = canned(
        servers,
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\n\r\n",
        close=False,
    )
    await _route(gateway, only, retries="0")
    reply = await gateway.proxy.get("/plain")
    assert reply.code == 502, reply.body


@pytest_twisted.ensureDeferred
async def test_other_upgrades_are_not_passed_on(gateway, servers):
    """
    C{h2c} (or anything but a WebSocket) would make the connection one
    the gateway cannot see into: the request goes on as an ordinary one.
    """
    resource = TargetResource("t")
    port = listen(resource)
    servers.append(port)
    await _route(gateway, address(port))
    client = await connect(gateway.service.proxy_port.getHost().port)
    client.transport.write(
        b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
    )
    await client.until(b"t")
    assert client.data.startswith(b"HTTP/1.1 200 "), client.data
    headers = resource.requests[-1]["headers"]
    assert headers.getRawHeaders(b"upgrade") is None
    assert headers.getRawHeaders(b"http2-settings") is None
    assert headers.getRawHeaders(b"connection") in (None, [b"keep-alive"])
    client.transport.loseConnection()


@pytest.mark.parametrize(
    ("request_head", "expected"),
    [
        (
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket",
            b"websocket",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: WebSocket",
            b"websocket",
        ),
        (b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket", None),
        (
            b"GET / HTTP/1.0\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket",
            None,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket",
            None,
        ),
        (
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\nContent-Length: 2",
            None,
        ),
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: h2c", None),
    ],
)
def test_which_requests_ask_for_a_websocket(request_head: bytes, expected: Any) -> None:
    heads: list[Any] = []
    parser = RequestParser(heads.append, lambda data: None)
    parser.expect()
    parser.feed(request_head + b"\r\n\r\n")
    assert heads[0].upgrade == expected


@pytest_twisted.ensureDeferred
async def test_a_target_that_stops_reading_stops_the_client(gateway, servers):
    """
    The gateway stops reading from a client whose bytes the target does
    not take, rather than holding them: most of what the client writes
    stays in its own send queue, and all of it arrives once the target
    reads again.
    """
    sockets, target = _echo(servers)
    await _route(gateway, target)
    client, socket = await _deaf(gateway, sockets)
    before = socket.received
    data = frame(b"y" * 1024) * (32 * 1024)
    client.transport.write(data)
    await sleep(1.0)
    # (Without the pause, the gateway would read it all into memory and
    # the client's queue would be empty.)
    assert unsent(client.transport) > len(data) // 2
    socket.transport.resumeProducing()
    await wait_for(lambda: _async(socket.received - before == len(data)), 20, 0.05)
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_a_client_that_stops_reading_stops_the_target(gateway, servers):
    sockets, target = _echo(servers)
    await _route(gateway, target)
    client, _ = await _open(gateway)
    await _messages(client, 1)
    before = len(client.data)
    client.transport.pauseProducing()
    size = 32 * 1024 * 1024
    client.transport.write(frame(b"flood %d" % size))
    await sleep(1.0)
    assert unsent(sockets.connections[-1].transport) > size // 2
    client.transport.resumeProducing()
    # The whole frame: a header of 10 bytes, then the payload.
    await wait_for(lambda: _async(len(client.data) - before == size + 10), 30, 0.1)
    client.transport.loseConnection()

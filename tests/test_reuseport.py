"""
C{reuseport:} listeners: several listeners, in one process or several, on
one port, each taking a share of the connections; clear errors for bad
endpoint strings and taken ports.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.usage import UsageError
from zope.interface.verify import verifyObject

from aigateway.reuseport import ReusePortEndpoint, ReusePortParser
from aigateway.tap import Options

from .gatewaykit import (
    Gateway,
    TargetResource,
    address,
    listen,
    raw_request,
    wait_for,
)


class _Counting(Factory):
    def __init__(self) -> None:
        self.accepted = 0

    def buildProtocol(self, addr: Any) -> Protocol:
        self.accepted += 1
        return Protocol()


@pytest_twisted.ensureDeferred
async def test_listeners_share_a_port():
    """
    Two listeners on one port both accept: the kernel spreads 64 new
    connections over them.
    """
    first, second = _Counting(), _Counting()
    one = await ReusePortEndpoint(reactor, 0, "127.0.0.1").listen(first)
    number = one.getHost().port
    two = await ReusePortEndpoint(reactor, number, "127.0.0.1").listen(second)
    assert two.getHost().port == number
    clients = []
    try:
        for _ in range(64):
            clients.append(
                await connectProtocol(
                    TCP4ClientEndpoint(reactor, "127.0.0.1", number), Protocol()
                )
            )
    finally:
        for client in clients:
            client.transport.abortConnection()
        await one.stopListening()
        await two.stopListening()
    assert first.accepted + second.accepted == 64
    assert first.accepted > 0 and second.accepted > 0


@pytest_twisted.ensureDeferred
async def test_a_port_held_without_reuseport_is_refused():
    plain = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    try:
        endpoint = ReusePortEndpoint(reactor, plain.getHost().port, "127.0.0.1")
        with pytest.raises(CannotListenError):
            await endpoint.listen(Factory.forProtocol(Protocol))
    finally:
        await plain.stopListening()


def test_parser_and_interface():
    endpoint = ReusePortParser().parseStreamServer(
        reactor, "8123", interface="127.0.0.1", backlog="7"
    )
    assert verifyObject(IStreamServerEndpoint, endpoint)
    assert (endpoint.port, endpoint.interface, endpoint.backlog) == (
        8123,
        "127.0.0.1",
        7,
    )


@pytest.mark.parametrize(
    "spec",
    [
        "reuseport",
        "reuseport:99999",
        "reuseport:http",
        "reuseport:8000:interface=nowhere",
        "reuseport:8000:backlog=0",
        "reuseport:8000:reuse=1",
        "tcp:8000:reuse=1",
        "ssl:8443:privateKey=/nonexistent/key.pem",
    ],
)
def test_bad_endpoint_strings_refused_up_front(spec):
    with pytest.raises(UsageError, match="--proxy: invalid endpoint"):
        Options().parseOptions(["--proxy", spec])


@pytest_twisted.ensureDeferred
async def test_two_gateways_serve_one_port(tmp_path, servers):
    """
    Two gateway nodes started on the same C{reuseport:} endpoint and the
    same database, configured once through the first one's Admin API,
    both answer proxied requests arriving on it.
    """
    target = TargetResource("t")
    servers.append(port := listen(target))
    database = str(tmp_path / "shared.db")
    first = await Gateway(
        database, proxy_spec="reuseport:0:interface=127.0.0.1"
    ).start()
    number = first.service.proxy_port.getHost().port
    second = await Gateway(
        database,
        proxy_spec=f"reuseport:{number}:interface=127.0.0.1",
        db_update_frequency=0.1,
    ).start()
    try:
        await first.configure("up", {address(port): 100})
        version = first.service.runtime.snapshot.version

        async def second_has_it() -> bool:
            return second.service.runtime.snapshot.version == version

        await wait_for(second_has_it, 5.0, 0.05)
        prefixes = set()
        for _ in range(40):
            raw = await raw_request(
                number, b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
            )
            assert raw.startswith(b"HTTP/1.1 200 "), raw[:80]
            request_id = raw.split(b"X-Request-Id: ", 1)[1].split(b"\r\n", 1)[0]
            prefixes.add(request_id[:12])
        assert len(prefixes) == 2
    finally:
        await first.stop()
        await second.stop()


@pytest_twisted.ensureDeferred
async def test_a_reactor_that_cannot_adopt_fails_the_deferred():
    """
    Whatever goes wrong after the socket is made fails the L{Deferred}
    (and closes the socket) rather than raising from C{listen}.
    """
    endpoint = ReusePortEndpoint(object(), 0, "127.0.0.1")
    d = endpoint.listen(Factory.forProtocol(Protocol))
    with pytest.raises(AttributeError):
        await d

"""
L{aigateway.health.active.AgentProber} on real loopback sockets: HTTP,
TCP, a closed port, and TLS with certificates checked or not.

These run under pytest-twisted (the reactor is pytest's), as the other
real-socket tests do; the scheduling logic is tested on a L{task.Clock} in
L{tests.test_health_active}.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import defer, ssl
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface.verify import verifyObject

from aigateway.health.active import AgentProber, IProber
from aigateway.health.passive import Outcome, outcome_of_failure

from .healthkit import target, upstream
from .tlskit import certificate


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


class _Health(Resource):
    """
    A target's health endpoint, by path: C{/bad} fails, C{/busy} is rate
    limited, C{/stream} never ends its body, anything else is fine.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Request] = []
        self.lost: defer.Deferred[None] = defer.Deferred()

    def render_GET(self, request: Request) -> bytes | int:
        self.requests.append(request)
        if request.path == b"/bad":
            request.setResponseCode(500)
        elif request.path == b"/busy":
            request.setResponseCode(429)
            request.setHeader("Retry-After", "7")
        elif request.path == b"/stream":
            request.write(b"data: 1\n\n")
            request.notifyFinish().addErrback(lambda f: self.lost.callback(None))
            return NOT_DONE_YET
        return b"ok"


def _site(resource: Resource) -> Site:
    site = Site(resource)
    site.log = lambda request: None  # type: ignore[method-assign]
    return site


@attrs.define
class _Server:
    resource: _Health
    port: Any

    @property
    def key(self) -> str:
        return f"127.0.0.1:{self.port.getHost().port}"


@pytest_twisted.async_yield_fixture
async def server() -> AsyncIterator[_Server]:
    resource = _Health()
    port = _reactor().listenTCP(0, _site(resource), interface="127.0.0.1")
    yield _Server(resource, port)
    await port.stopListening()


async def _fails(d: defer.Deferred[Outcome]) -> Outcome | None:
    """
    The outcome a failed probe is classified as.
    """
    try:
        await d
    except Exception:
        return outcome_of_failure(Failure())
    pytest.fail("the probe succeeded")


def test_interface() -> None:
    verifyObject(IProber, AgentProber(_reactor()))


@pytest_twisted.ensureDeferred
async def test_http(server: _Server) -> None:
    """
    A GET of C{http_path} with the configured headers and the Host the
    proxy sends; the status and C{Retry-After} come back.
    """
    prober = AgentProber(_reactor())
    outcome = await prober.probe(
        upstream(active__http_path="/health", active__headers={"x-probe": "yes"}),
        target(server.key),
    )
    assert outcome == Outcome.status(200)
    [request] = server.resource.requests
    assert request.path == b"/health"
    assert request.getHeader("host") == server.key
    assert request.getHeader("x-probe") == "yes"
    bad = upstream(active__http_path="/bad")
    assert await prober.probe(bad, target(server.key)) == Outcome.status(500)
    busy = upstream(active__http_path="/busy")
    assert await prober.probe(busy, target(server.key)) == Outcome.status(429, "7")


@pytest_twisted.ensureDeferred
async def test_host_header(server: _Server) -> None:
    u = attrs.evolve(upstream(), host_header="api.example.com")
    await AgentProber(_reactor()).probe(u, target(server.key))
    port = server.port.getHost().port
    assert server.resource.requests[0].getHeader("host") == f"api.example.com:{port}"


@pytest_twisted.ensureDeferred
async def test_endless_body(server: _Server) -> None:
    """
    The probe answers at the status and drops the connection, rather than
    wait for a body that never ends.
    """
    u = upstream(active__http_path="/stream")
    assert await AgentProber(_reactor()).probe(u, target(server.key)) == Outcome.status(
        200
    )
    await server.resource.lost


@pytest_twisted.ensureDeferred
async def test_tcp(server: _Server) -> None:
    u = upstream(active__type="tcp")
    assert (
        await AgentProber(_reactor()).probe(u, target(server.key))
        == Outcome.connected()
    )


@pytest_twisted.ensureDeferred
async def test_closed_port() -> None:
    port = _reactor().listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    closed = target(f"127.0.0.1:{port.getHost().port}")
    await port.stopListening()
    prober = AgentProber(_reactor())
    for kind in ["http", "tcp"]:
        d = prober.probe(upstream(active__type=kind), closed)
        assert await _fails(d) == Outcome.tcp_failure(), kind


@attrs.define
class _TLSServer:
    port: Any
    certificate: bytes
    names: list[bytes | None]

    @property
    def key(self) -> str:
        return f"127.0.0.1:{self.port.getHost().port}"


@pytest_twisted.async_yield_fixture
async def tls_server() -> AsyncIterator[_TLSServer]:
    """
    An HTTPS server for C{api.example.com} that records the SNI it gets.
    """
    cert, key = certificate("api.example.com")
    options = ssl.PrivateCertificate.loadPEM(cert + key).options()
    names: list[bytes | None] = []
    options.getContext().set_tlsext_servername_callback(
        lambda connection: names.append(connection.get_servername())
    )
    port = _reactor().listenSSL(0, _site(_Health()), options, interface="127.0.0.1")
    yield _TLSServer(port, cert, names)
    await port.stopListening()


def _https(**checks: Any) -> Any:
    checks.setdefault("active__https_sni", "api.example.com")
    return upstream(active__type="https", **checks)


@pytest.mark.filterwarnings("ignore::DeprecationWarning:OpenSSL.*")
@pytest_twisted.ensureDeferred
async def test_tls_verified(tls_server: _TLSServer) -> None:
    trusted = AgentProber(_reactor(), ssl.Certificate.loadPEM(tls_server.certificate))
    assert await trusted.probe(_https(), target(tls_server.key)) == Outcome.status(200)
    assert tls_server.names == [b"api.example.com"]
    wrong = _https(active__https_sni="other.example.com")
    assert (
        await _fails(trusted.probe(wrong, target(tls_server.key)))
        == Outcome.tcp_failure()
    )


@pytest.mark.filterwarnings("ignore::DeprecationWarning:OpenSSL.*")
@pytest_twisted.ensureDeferred
async def test_tls_unverified(tls_server: _TLSServer) -> None:
    """
    An untrusted certificate fails the check; with the check off it is
    accepted, and SNI is still sent.
    """
    prober = AgentProber(_reactor())
    assert await _fails(prober.probe(_https(), target(tls_server.key))) == (
        Outcome.tcp_failure()
    )
    off = _https(active__https_verify_certificate=False)
    assert await prober.probe(off, target(tls_server.key)) == Outcome.status(200)
    assert tls_server.names[-1] == b"api.example.com"

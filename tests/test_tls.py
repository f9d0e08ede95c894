"""
TLS on both sides, through a real gateway: a TLS proxy listener that
clients offering ALPN can use, and https targets verified against the name
the gateway sends them (an upstream's C{host_header}), or not at all when a
service says so.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, ssl
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    connectProtocol,
    wrapClientTLS,
)
from twisted.web.server import Site

from aigateway.proxy.server import ProxyFactory

from .gatewaykit import TargetResource
from .test_server import Conversation, Echo
from .tlskit import certificate


@pytest.mark.filterwarnings("ignore::DeprecationWarning:OpenSSL.*")
@pytest_twisted.ensureDeferred
async def test_a_tls_listener_takes_clients_that_offer_alpn():
    """
    curl, browsers and the OpenAI SDKs offer ALPN; the handshake used to
    fail with an internal-error alert.
    """
    cert, key = certificate("127.0.0.1")
    options = ssl.PrivateCertificate.loadPEM(cert + key).options()
    factory = ProxyFactory(Echo(), 1024, reactor)
    port = reactor.listenSSL(0, factory, options, interface="127.0.0.1")
    try:
        client = ssl.optionsForClientTLS(
            "127.0.0.1",
            trustRoot=ssl.Certificate.loadPEM(cert),
            acceptableProtocols=[b"h2", b"http/1.1"],
        )
        endpoint = wrapClientTLS(
            client, TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        )
        conversation = await connectProtocol(endpoint, Conversation())
        conversation.transport.write(
            b"GET /alpn HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        )
        await conversation.until(b"HTTP/1.1 200")
        assert conversation.data.startswith(b"HTTP/1.1 200"), conversation.data
        assert conversation.transport.negotiatedProtocol == b"http/1.1"
        conversation.transport.loseConnection()
    finally:
        await port.stopListening()


@pytest.fixture
def trusted(tmp_path, monkeypatch):
    """
    Make the platform trust a file of CA certificates (OpenSSL reads
    C{SSL_CERT_FILE} when a connection's context is made), as the README
    tells users with a private CA.
    """
    bundle = tmp_path / "ca.pem"

    def trust(*certificates: bytes) -> None:
        bundle.write_bytes(b"".join(certificates))
        monkeypatch.setenv("SSL_CERT_FILE", str(bundle))

    return trust


def _tls_target(servers: list[Any], cert: bytes, key: bytes, name: str) -> int:
    options = ssl.PrivateCertificate.loadPEM(cert + key).options()
    port = reactor.listenSSL(
        0, Site(TargetResource(name)), options, interface="127.0.0.1"
    )
    servers.append(port)
    return int(port.getHost().port)


@pytest.mark.filterwarnings("ignore::DeprecationWarning:OpenSSL.*")
@pytest_twisted.ensureDeferred
async def test_https_targets_are_verified_for_the_host_sent(gateway, servers, trusted):
    """
    A target reached by IP under an upstream's C{host_header} has a
    certificate for that name: SNI and verification use it, as the
    active probes do; a service with C{tls_verify=false} takes any
    certificate; otherwise a wrong name is a 502.
    """
    internal_cert, internal_key = certificate("model.internal")
    other_cert, other_key = certificate("elsewhere.example")
    trusted(internal_cert, other_cert)
    internal = _tls_target(servers, internal_cert, internal_key, "internal")
    other = _tls_target(servers, other_cert, other_key, "other")
    admin = gateway.admin

    form = {"name": "named", "host_header": "model.internal"}
    assert (await admin.post("/upstreams", form=form)).code == 201
    target = {"target": f"127.0.0.1:{internal}"}
    assert (await admin.post("/upstreams/named/targets", form=target)).code == 201
    service = {"name": "named", "host": "named", "protocol": "https", "retries": "0"}
    assert (await admin.post("/services", form=service)).code == 201
    route = {"paths[]": "/named"}
    assert (await admin.post("/services/named/routes", form=route)).code == 201
    reply = await gateway.proxy.get("/named")
    assert (reply.code, reply.body) == (200, b"internal"), reply.body

    for name, verify in (("strict", "true"), ("lax", "false")):
        service = {
            "name": name,
            "url": f"https://127.0.0.1:{other}",
            "tls_verify": verify,
            "retries": "0",
        }
        assert (await admin.post("/services", form=service)).code == 201
        route = {"paths[]": f"/{name}"}
        assert (await admin.post(f"/services/{name}/routes", form=route)).code == 201
    assert (await gateway.proxy.get("/strict")).code == 502
    lax = await gateway.proxy.get("/lax")
    assert (lax.code, lax.body) == (200, b"other")
    # The connections kept for the lax service are not lent to the strict
    # one, which still refuses the certificate.
    assert (await gateway.proxy.get("/strict")).code == 502

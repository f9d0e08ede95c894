# -*- test-case-name: tests.test_proxy -*-
"""
The HTTP client side of the proxy: an L{Agent} over one persistent
connection pool, with endpoints tuned for targets.

C{Agent}'s default endpoint resolves every host name, even C{127.0.0.1},
through the reactor's thread pool, and leaves Nagle's algorithm on, which
holds small server-sent-event chunks back.  Our endpoint factory connects
to IP addresses directly and sets C{TCP_NODELAY} on every connection.

By default the agents are L{LeanAgent}s (see L{aigateway.proxy.lean}),
which cost a fraction of C{Agent}'s CPU per request; C{Agents(reactor,
lean=False)} gives Twisted's C{Agent} over an C{HTTPConnectionPool}, to
compare the two.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet.defer import CancelledError, TimeoutError
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.ssl import CertificateOptions, optionsForClientTLS
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgent, IAgentEndpointFactory
from zope.interface import implementer

from .lean import LeanAgent, LeanPool


def _nodelay(protocol: Any) -> Any:
    transport = getattr(protocol, "transport", None)
    # Under TLS the protocol's transport is the TLS layer; Nagle is on the
    # TCP transport beneath it.
    while transport is not None:
        set_nodelay = getattr(transport, "setTcpNoDelay", None)
        if set_nodelay is not None:
            set_nodelay(True)
            break
        transport = getattr(transport, "transport", None)
    return protocol


@implementer(IStreamClientEndpoint)
class _NoDelay:
    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self._endpoint = endpoint

    def connect(self, factory: Any) -> Any:
        return self._endpoint.connect(factory).addCallback(_nodelay)


@implementer(IStreamClientEndpoint)
class _Handshaken:
    """
    A TLS endpoint whose connection counts as made once its handshake is
    done, connecting and handshake within one connect timeout, as nginx's
    C{proxy_connect_timeout} bounds both: a target that accepts TCP connections and
    never answers the handshake fails the attempt (a timeout, retried like
    one) instead of holding it until the service's C{read_timeout}.

    Only the lean client's connections say when their handshake is done;
    other protocols are handed on as soon as TCP connects, as before.
    """

    def __init__(
        self, endpoint: IStreamClientEndpoint, reactor: Any, timeout: float
    ) -> None:
        self._endpoint = endpoint
        self._reactor = reactor
        self._timeout = timeout

    def connect(self, factory: Any) -> Any:
        began = self._reactor.seconds()
        return self._endpoint.connect(factory).addCallback(self._handshaken, began)

    def _handshaken(self, protocol: Any, began: float) -> Any:
        done = getattr(protocol, "handshake_done", None)
        if done is None:
            return protocol
        # One connect_timeout for connecting and the handshake together.
        left = max(0.0, self._timeout - (self._reactor.seconds() - began))
        waiting = done()
        waiting.addTimeout(left, self._reactor, onTimeoutCancel=self._timed_out)
        return waiting.addCallback(lambda _: protocol)

    def _timed_out(self, result: Any, timeout: float) -> Any:
        if isinstance(result, Failure) and result.check(CancelledError):
            return Failure(
                TimeoutError(
                    f"TLS handshake not done within the connect timeout "
                    f"({self._timeout:g} s)"
                )
            )
        return result


@implementer(IAgentEndpointFactory)
class TargetEndpoints:
    """
    Endpoints for targets: direct TCP for IP addresses, TLS with SNI and
    certificate verification for C{https} (against the URI's C{tls} name
    and CAs when it has them: see L{aigateway.proxy.forward._tls_for}).

    @param trust_root: the CAs that sign targets' certificates (the
        platform's by default; tests pass their own).
    """

    def __init__(
        self,
        reactor: Any,
        connect_timeout: float,
        verify: bool = True,
        trust_root: Any = None,
    ) -> None:
        self._reactor = reactor
        self._timeout = connect_timeout
        self._verify = verify
        self._trust_root = trust_root

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        if host.startswith("["):
            host = host[1:-1]
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            endpoint: IStreamClientEndpoint = HostnameEndpoint(
                self._reactor, host, uri.port, timeout=self._timeout
            )
        else:
            kind = TCP4ClientEndpoint if address.version == 4 else TCP6ClientEndpoint
            endpoint = kind(self._reactor, host, uri.port, timeout=self._timeout)
        if uri.scheme == b"https":
            # The name the gateway sends as Host (an upstream's host_header,
            # a preserved client Host), as Kong and the active probes do;
            # the lean agent says so when it is not the target's host.
            # The service's own CAs (its ca_certificates) replace the
            # platform's; their trust root was made with the snapshot.
            name, verify, trust = getattr(uri, "tls", None) or (
                host,
                self._verify,
                None,
            )
            if verify:
                root = self._trust_root if trust is None else trust.root
                options: Any = optionsForClientTLS(name, trustRoot=root)
            else:
                options = CertificateOptions(verify=False)
            return _Handshaken(
                _NoDelay(wrapClientTLS(options, endpoint)), self._reactor, self._timeout
            )
        return _NoDelay(endpoint)


class Agents:
    """
    One agent per connect and write timeout, all sharing one persistent pool, so
    keep-alive connections to a target are reused whatever the service.

    @ivar pool: a L{LeanPool}, or with C{lean=False} an
        L{HTTPConnectionPool}; both keep their idle connections per key in
        C{_connections}, which the metrics count.
    """

    def __init__(
        self, reactor: Any, max_per_host: int = 256, lean: bool = True
    ) -> None:
        self._reactor = reactor
        self.pool: LeanPool | HTTPConnectionPool
        if lean:
            self.pool = LeanPool(reactor, max_idle_per_key=max_per_host)
        else:
            self.pool = HTTPConnectionPool(reactor, persistent=True)
            # Agent's default of 2 would make every burst open new connections.
            self.pool.maxPersistentPerHost = max_per_host
        self._agents: dict[tuple[float, float | None], IAgent] = {}

    def agent(
        self, connect_timeout: float, write_timeout: float | None = None
    ) -> IAgent:
        """
        The agent for services with these timeouts (C{write_timeout} is
        enforced by the lean agent only).
        """
        key = (connect_timeout, write_timeout)
        agent = self._agents.get(key)
        if agent is None:
            endpoints = TargetEndpoints(self._reactor, connect_timeout)
            if isinstance(self.pool, LeanPool):
                agent = LeanAgent(self._reactor, self.pool, endpoints, write_timeout)
            else:
                agent = Agent.usingEndpointFactory(
                    self._reactor, endpoints, pool=self.pool
                )
            self._agents[key] = agent
        return agent

    def close(self) -> Any:
        """
        Close every pooled connection.
        """
        return self.pool.closeCachedConnections()

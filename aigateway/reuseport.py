# -*- test-case-name: tests.test_reuseport -*-
"""
A TCP listener that shares its port with other processes:
C{reuseport:PORT[:interface=ADDRESS][:backlog=N]}.

One gateway process uses one core.  Several processes started with the
same C{reuseport:} endpoint each bind the port with C{SO_REUSEPORT}, and
the kernel spreads new connections over them (by a hash of the client's
address and port), so one host serves on every core, and each process
holds only its share of the connections: a process's descriptor limit
then caps its share, not the whole host's.

Each such process is a gateway node of its own: it keeps its own
configuration store (give them all the same C{--config} file), health
state and metrics (scrape each node's Admin API), as nodes behind a load
balancer do.  The socket is made here and handed to the reactor with
L{IReactorSocket.adoptStreamPort}, which keeps the rest (accepting,
transports, C{getHost}) Twisted's own.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IListeningPort,
    IStreamServerEndpoint,
    IStreamServerEndpointStringParser,
)
from twisted.plugin import IPlugin
from zope.interface import implementer

__all__ = ["ReusePortEndpoint", "ReusePortParser"]


@implementer(IStreamServerEndpoint)
class ReusePortEndpoint:
    """
    Listens on a TCP port with C{SO_REUSEPORT} (and C{SO_REUSEADDR}).

    @ivar port: the port (0: one the kernel picks, for this listener only;
        other processes then join it by its number).
    @ivar interface: the address to bind, C{""} for every IPv4 one; an
        IPv6 address binds IPv6.
    """

    def __init__(
        self, reactor: Any, port: int, interface: str = "", backlog: int = 50
    ) -> None:
        self._reactor = reactor
        self.port = port
        self.interface = interface
        self.backlog = backlog

    def listen(self, protocolFactory: Any) -> Deferred[IListeningPort]:
        """
        Bind, listen, and hand the socket to the reactor.
        """
        family = socket.AF_INET
        if self.interface and ipaddress.ip_address(self.interface).version == 6:
            family = socket.AF_INET6
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as e:  # out of descriptors, say
            return fail(CannotListenError(self.interface, self.port, e))
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.setblocking(False)
            sock.bind((self.interface, self.port))
            sock.listen(self.backlog)
            # The reactor takes a duplicate of the descriptor.
            port = self._reactor.adoptStreamPort(sock.fileno(), family, protocolFactory)
        except OSError as e:
            return fail(CannotListenError(self.interface, self.port, e))
        except Exception:
            return fail()
        finally:
            sock.close()
        return succeed(port)


@implementer(IPlugin, IStreamServerEndpointStringParser)
class ReusePortParser:
    """
    Parses C{reuseport:PORT[:interface=ADDRESS][:backlog=N]}.
    """

    prefix = "reuseport"

    def parseStreamServer(
        self, reactor: Any, *args: object, **kwargs: object
    ) -> ReusePortEndpoint:
        if len(args) != 1:
            raise ValueError("reuseport needs a port: reuseport:PORT")
        unknown = set(kwargs) - {"interface", "backlog"}
        if unknown:
            raise ValueError(f"reuseport does not take {', '.join(sorted(unknown))}")
        port = int(str(args[0]))
        if not 0 <= port < 65536:
            raise ValueError(f"port {port} out of range")
        interface = str(kwargs.get("interface", ""))
        if interface:
            ipaddress.ip_address(interface)  # ValueError: not an address
        backlog = int(str(kwargs.get("backlog", "50")))
        if backlog < 1:
            raise ValueError("backlog must be at least 1")
        return ReusePortEndpoint(reactor, port, interface, backlog)

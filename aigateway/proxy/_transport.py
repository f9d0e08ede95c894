"""
Writing to a TCP connection at once when nothing is queued on it.

Twisted's C{FileDescriptor.write} always queues: it registers the socket
for writability with epoll, sends on the next reactor iteration, and
unregisters it when the queue is empty: two C{epoll_ctl} calls and a loop
iteration for every response and every forwarded request, measured at
about 12% of the gateway's CPU per request under load.  L{send} instead
calls C{send(2)} directly when the connection's queue is empty, the usual
case on a proxy whose peers keep up, and queues only what the kernel did
not take, so ordering, flow control and producers behave as before.

It relies on C{twisted.internet.tcp.Connection}'s buffer attributes, so it
only writes through for exactly the plain TCP transports it knows (not
TLS, not a test's fake transport); anything else goes to C{write}.
"""

from __future__ import annotations

import fcntl
import struct
import termios
from typing import Any

from twisted.internet import tcp

_PLAIN = frozenset({tcp.Server, tcp.Client})


def send(transport: Any, data: bytes) -> bool:
    """
    Write C{data} to C{transport}, sending what the kernel takes at once if
    nothing is queued before it.

    @return: whether all of it was handed to the kernel at once (C{False}
        also when that cannot be known: a TLS or test transport).
    """
    if transport.__class__ in _PLAIN:
        return _through(transport, data)
    transport.write(data)
    return False


def plain(transport: Any) -> bool:
    """
    Whether C{transport} is a TCP connection itself, not TLS over one
    (whose transport copies the interfaces of the one under it, so that
    C{providedBy} cannot tell them apart).
    """
    return transport.__class__ in _PLAIN


def _tcp(transport: Any) -> tcp.Connection | None:
    """
    The TCP connection under C{transport}, looking through wrapping
    transports (TLS); L{None} when there is none to look at.
    """
    for _ in range(4):
        if transport is None:
            return None
        if isinstance(transport, tcp.Connection):
            return transport
        transport = getattr(transport, "transport", None)
    return None


def queued(transport: Any) -> int:
    """
    The bytes written to C{transport} that the kernel has not taken yet
    (those queued by the TCP connection under it); 0 when there is no TCP
    connection to look at.
    """
    connection = _tcp(transport)
    if connection is None:
        return 0
    return len(connection.dataBuffer) - connection.offset + connection._tempDataLen


def unsent(transport: Any) -> int:
    """
    The bytes written to C{transport} that its peer has not taken yet: what
    Twisted still queues (L{queued}) and what the kernel holds in the
    socket's send queue (Linux lets more in only once about half of that
    has gone, so a slow reader can take bytes without Twisted's queue
    moving).
    """
    connection = _tcp(transport)
    if connection is None:
        return 0
    waiting = queued(connection)
    try:
        outq = fcntl.ioctl(connection.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except (OSError, ValueError):  # closed, or not a socket
        return waiting
    return waiting + struct.unpack("i", outq)[0]


class SendProgress:
    """
    When the peer of a connection last took any of what was written to it
    (L{unsent} going down): the clock of a send timeout, which, as nginx's
    C{send_timeout}, counts the time between two bytes taken, not the whole
    answer's.
    """

    __slots__ = ("_left", "_since")

    def __init__(self) -> None:
        self._left = 0
        self._since = 0.0

    def start(self, transport: Any, now: float) -> None:
        """
        Count from C{now}, with what is unsent now.
        """
        self._left = unsent(transport)
        self._since = now

    def stalled_for(self, transport: Any, now: float) -> float:
        """
        How long, looking at C{now}, the peer has taken none of it.
        """
        left = unsent(transport)
        if left < self._left:
            self._since = now
        self._left = left
        return now - self._since


def _through(transport: Any, data: bytes) -> bool:
    if (
        not transport.TLS
        and transport.connected
        and not transport.disconnecting
        and not transport._tempDataBuffer
        and not transport.dataBuffer
    ):
        try:
            sent = transport.socket.send(data)
        except OSError:
            # Would block, or the connection is broken: the queued write
            # below sends it later or finds out and closes the usual way.
            sent = 0
        if sent == len(data):
            return True
        data = data[sent:]
    transport.write(data)
    return False

"""
A WebSocket target and client framing for the tunnel tests: RFC 6455's
handshake and frames, as little of them as the tests need (no
fragmentation, no extensions).
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
from typing import Any

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from zope.interface import implementer

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TEXT, CLOSE = 0x1, 0x8


def accept_for(key: bytes) -> bytes:
    """
    The C{Sec-WebSocket-Accept} a server answers C{key} with.
    """
    return base64.b64encode(hashlib.sha1(key + _GUID).digest())


def frame(payload: bytes, opcode: int = TEXT, masked: bool = True) -> bytes:
    """
    One final frame; clients mask theirs, servers do not.
    """
    size = len(payload)
    if size < 126:
        length = bytes([size | (0x80 if masked else 0)])
    elif size < 65536:
        length = bytes([126 | (0x80 if masked else 0)]) + struct.pack("!H", size)
    else:
        length = bytes([127 | (0x80 if masked else 0)]) + struct.pack("!Q", size)
    head = bytes([0x80 | opcode]) + length
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def frames(data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """
    The whole frames at the start of C{data} as (opcode, payload), and
    what is left of it.
    """
    found = []
    while len(data) >= 2:
        opcode, size = data[0] & 0x0F, data[1] & 0x7F
        masked = data[1] & 0x80
        at = 2
        if size == 126:
            if len(data) < 4:
                break
            size, at = struct.unpack("!H", data[2:4])[0], 4
        elif size == 127:
            if len(data) < 10:
                break
            size, at = struct.unpack("!Q", data[2:10])[0], 10
        mask = b""
        if masked:
            mask, at = data[at : at + 4], at + 4
        if len(data) < at + size:
            break
        payload = data[at : at + size]
        if masked:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        found.append((opcode, payload))
        data = data[at + size :]
    return found, data


def handshake(key: bytes, path: bytes = b"/ws", extra: bytes = b"") -> bytes:
    """
    A client's opening handshake.
    """
    return (
        b"GET " + path + b" HTTP/1.1\r\nHost: gateway\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: " + key + b"\r\n"
        b"Sec-WebSocket-Version: 13\r\n" + extra + b"\r\n"
    )


class _EchoSocket(Protocol):
    """
    Answers a handshake on any path but C{/refuse} (a 403), says
    C{hello} in the same write as its 101, then echoes every text frame
    and answers a close frame by closing.
    """

    def connectionMade(self) -> None:
        self.buffer = b""
        self.upgraded = False
        self.received = 0
        #: Only count what arrives from now on.
        self.counting = False

    def dataReceived(self, data: bytes) -> None:
        factory: EchoSockets = self.factory  # type: ignore[assignment]
        self.received += len(data)
        factory.received += len(data)
        if self.counting:
            return
        self.buffer += data
        if not self.upgraded:
            head, found, rest = self.buffer.partition(b"\r\n\r\n")
            if not found:
                return
            self.buffer = rest
            lines = head.split(b"\r\n")
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            factory.handshakes.append((lines[0], headers))
            if lines[0].startswith(b"GET /refuse "):
                body = b"not here"
                self.transport.write(
                    b"HTTP/1.1 403 Forbidden\r\nContent-Length: %d\r\n\r\n%s"
                    % (len(body), body)
                )
                return
            self.upgraded = True
            # (Content-Length on a 101 is not HTTP's, but servers send it:
            # the gateway must not pass it on.)
            self.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Content-Length: 0\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
                + accept_for(headers.get(b"sec-websocket-key", b""))
                + b"\r\n\r\n"
                + frame(b"hello", masked=False)
            )
        found, self.buffer = frames(self.buffer)
        for opcode, payload in found:
            if opcode == CLOSE:
                self.transport.write(frame(payload, CLOSE, masked=False))
                self.transport.loseConnection()
                return
            if payload.startswith(b"flood "):
                size = int(payload[6:])
                self.transport.write(frame(b"x" * size, masked=False))
            else:
                self.transport.write(frame(payload, masked=False))

    def connectionLost(self, reason: Any) -> None:
        factory: EchoSockets = self.factory  # type: ignore[assignment]
        factory.closed += 1
        factory.reasons.append(reason.type)


class EchoSockets(Factory):
    """
    The factory of L{_EchoSocket}s, and what they saw.
    """

    protocol = _EchoSocket

    def __init__(self) -> None:
        self.handshakes: list[tuple[bytes, dict[bytes, bytes]]] = []
        self.closed = 0
        #: How each connection ended (ConnectionDone: its peer closed it
        #: cleanly; ConnectionLost: it was reset).
        self.reasons: list[type] = []
        self.received = 0
        self.connections: list[_EchoSocket] = []

    def buildProtocol(self, addr: Any) -> Protocol:
        protocol = super().buildProtocol(addr)
        assert protocol is not None
        self.connections.append(protocol)  # type: ignore[arg-type]
        return protocol


@implementer(IHalfCloseableProtocol)
class _Stubborn(_EchoSocket):
    """
    An L{_EchoSocket} that, when its peer ends its side, neither closes
    its own nor stops talking: it sends a frame every 100 ms instead.
    """

    def readConnectionLost(self) -> None:
        self.talking = LoopingCall(
            self.transport.write, frame(b"still here", masked=False)
        )
        self.talking.start(0.1)

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Any) -> None:
        talking = getattr(self, "talking", None)
        if talking is not None and talking.running:
            talking.stop()
        super().connectionLost(reason)


class StubbornSockets(EchoSockets):
    """
    The factory of L{_Stubborn}s.
    """

    protocol = _Stubborn

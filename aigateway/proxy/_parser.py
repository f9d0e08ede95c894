# -*- test-case-name: tests.test_lean -*-
"""
Incremental parsers for HTTP/1.x messages: responses for the lean client,
requests for the proxy's own server channel.

Pure Python on purpose.  Measured on the gateway's typical answer (five
headers and a 600-byte body in one read), it takes 4.6 us per response;
C{httptools} (llhttp, in C) takes 2.3-2.8 us with the callbacks that build
the same L{Headers}: the 2 us gained would be about 1% of the gateway's
CPU per request, not worth a compiled dependency, and C{httptools} cannot
be told that the answer to a C{HEAD} has no body.  Bytes are sliced, never
scanned one by one: a response that arrives in one read is parsed with one
C{find}, one C{split} and a loop over its header lines.

Framing follows RFC 9112 section 6.3: no body for C{HEAD}, 1xx, 204 and
304; C{Transfer-Encoding} ending in C{chunked} wins over C{Content-Length};
any other transfer coding, or neither header, means the body runs until
the connection closes.  Anything ambiguous (bad or conflicting lengths,
bare CR or LF in the head, folded lines, malformed chunk sizes) is refused
with L{BadResponse} (L{BadRequest}) rather than guessed at, since a proxy that guesses a
message boundary differently from its peer can be made to mix answers up.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from twisted.web.http_headers import Headers, _nameEncoder
from twisted.web.iweb import UNKNOWN_LENGTH

# Parser states.
_HEAD = 0
_LENGTH = 1
_CHUNK_SIZE = 2
_CHUNK_DATA = 3
_CHUNK_END = 4
_TRAILERS = 5
_UNTIL_CLOSE = 6
_DONE = 7

_MAX_HEAD = 65536
_MAX_LINE = 4096
_HEX = b"0123456789abcdefABCDEF"
_SPACE_OR_END = (b" ", b"")
# On the hot path a substring test is written C{find(...) < 0}, not C{in}:
# CPython's C{bytes.__contains__} first tries its operand as an integer
# (C{b"x" in data} looks for a byte value), and for a bytes operand builds
# and discards a TypeError, about 1,800 instructions, before it searches.


# Header names as received, to their canonical form; a miss goes through
# Twisted's own canonicalisation (so getRawHeaders finds them) and its
# check that the name is a token.  Bounded, as a target could send endless
# distinct names.
_CANONICAL: dict[bytes, bytes] = {}
_MAX_CANONICAL = 2000
_FRAMING = frozenset({b"Content-Length", b"Transfer-Encoding", b"Connection"})
# Whole header lines already split and checked, to their name and value:
# most lines of a client's requests, and of a target's answers, are the
# same bytes every time (Host, Content-Type, Server, Connection...), and a
# dictionary look-up of the line costs a third of splitting it again.
# Bounded in entries and line length, as peers could send endless lines;
# once full it starts afresh, so lines that repeat are soon back in it
# whatever filled it.  Credentials are never kept, nor lines that differ on
# every message.
_LINES: dict[bytes, tuple[bytes, bytes]] = {}
_MAX_LINES = 4096
_MAX_LINE_KEPT = 256
_NOT_KEPT = frozenset(
    {
        b"Authorization",
        b"Proxy-Authorization",
        b"Cookie",
        b"Set-Cookie",
        b"X-Api-Key",
        b"Api-Key",
        b"Date",
    }
)


def _canonical(name: bytes, error: type[BadMessage]) -> bytes:
    try:
        canonical = _nameEncoder.encode(name)
    except ValueError:
        raise error(f"bad header name: {name[:40]!r}") from None
    if len(_CANONICAL) < _MAX_CANONICAL:
        _CANONICAL[name] = canonical
    return canonical


def _ignore(_: object) -> None:
    pass


class BadMessage(Exception):
    """
    The bytes are not an HTTP/1.x message that can be framed without
    guessing.
    """


class BadResponse(BadMessage):
    """
    The target's answer is not an HTTP/1.x response that can be framed
    without guessing.
    """


class BadRequest(BadMessage):
    """
    The client's request is not an HTTP/1.x request that can be framed
    without guessing.

    @ivar status: the status to answer with.
    """

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


_BARE = "bare CR or LF, or a control character, in message head"
# RFC 9110 5.5: a field value holds no CTL but HTAB (NUL is named); a CR or
# LF left in a line split at CRLF did not end it (RFC 9112 2.2).
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


class _Fields:
    """
    The header fields of a message head, and what they say of its framing.

    @ivar length: the C{Content-Length}, or L{None}.
    @ivar coded: a C{Transfer-Encoding} was given.
    @ivar chunked: the last transfer coding is C{chunked}.
    @ivar codings: every transfer coding, lower-cased, in order.
    @ivar connection: the lower-cased C{Connection} tokens.
    """

    __slots__ = ("headers", "length", "coded", "chunked", "codings", "connection")

    def __init__(self, lines: list[bytes], error: type[BadMessage]) -> None:
        headers = self.headers = Headers()
        raw = headers._rawHeaders
        length: int | None = None
        chunked = coded = False
        codings: list[bytes] = []
        connection: list[bytes] = []
        seen = _LINES.get
        for line in lines:
            known = seen(line)
            if known is not None:
                canonical, value = known
            else:
                if _bare(line):
                    raise error(_BARE)
                name, colon, value = line.partition(b":")
                if not colon:
                    raise error("header line without a colon")
                cached = _CANONICAL.get(name)
                canonical = _canonical(name, error) if cached is None else cached
                value = value.strip(b" \t")
                if len(line) <= _MAX_LINE_KEPT and canonical not in _NOT_KEPT:
                    if len(_LINES) >= _MAX_LINES:
                        _LINES.clear()
                    _LINES[line] = (canonical, value)
            if canonical in _FRAMING:
                if canonical == b"Content-Length":
                    if value.isdigit():
                        # One value, nearly always: no list to split.
                        if length is not None and int(value) != length:
                            raise error("bad Content-Length")
                        length = int(value)
                        continue
                    for item in value.split(b","):
                        item = item.strip(b" \t")
                        if not item.isdigit() or (
                            length is not None and int(item) != length
                        ):
                            raise error("bad Content-Length")
                        length = int(item)
                    continue
                if canonical == b"Transfer-Encoding":
                    coded = True
                    codings += [c.strip(b" \t").lower() for c in value.split(b",")]
                    chunked = codings[-1] == b"chunked"
                    continue
                connection.append(value.lower())
            values = raw.get(canonical)
            if values is None:
                raw[canonical] = [value]
            else:
                values.append(value)
        self.length = length
        self.coded = coded
        self.chunked = chunked
        self.codings = codings
        self.connection = _tokens(connection) if connection else _NO_TOKENS


_NO_TOKENS: frozenset[bytes] = frozenset()
# Connection header values to their tokens: nearly every message says
# "keep-alive" or "close".  Bounded, as a peer could send endless values.
_TOKENS: dict[bytes, frozenset[bytes]] = {}


def _tokens(values: list[bytes]) -> frozenset[bytes]:
    """
    The lower-cased tokens of C{Connection} header values.
    """
    if len(values) == 1:
        tokens = _TOKENS.get(values[0])
        if tokens is not None:
            return tokens
    tokens = frozenset(t.strip(b" \t") for v in values for t in v.split(b","))
    if len(values) == 1 and len(_TOKENS) < 256:
        _TOKENS[values[0]] = tokens
    return tokens


def _bare(line: bytes) -> bool:
    """
    Whether a line of a head split at CRLF still holds a CR or an LF (one
    that did not end a line), or another control character but HTAB.

    A header line found in the parser's memory of lines equals one that
    was checked when first seen, so only the first line of a head and the
    header lines not remembered are looked at.
    """
    return _CONTROL.search(line) is not None


class ResponseHead:
    """
    The status line and headers of a response.

    @ivar length: the body length, 0 for a response without a body, or
        L{UNKNOWN_LENGTH} for a chunked or close-delimited body.
    @ivar keep_alive: whether the connection may carry another request
        after this response.
    @ivar headers: the headers, less C{Content-Length} and
        C{Transfer-Encoding}, which describe the framing this parser has
        undone (as Twisted's client does).
    """

    __slots__ = ("version", "code", "phrase", "headers", "length", "keep_alive")

    def __init__(
        self,
        version: tuple[bytes, int, int],
        code: int,
        phrase: bytes,
        headers: Headers,
        length: object,
        keep_alive: bool,
    ) -> None:
        self.version = version
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.length = length
        self.keep_alive = keep_alive


_HTTP11 = (b"HTTP", 1, 1)
_HTTP10 = (b"HTTP", 1, 0)


class _MessageParser:
    """
    The body framing shared by requests and responses: a head, then a body
    of known length, chunked, or running until the connection closes.

    L{feed} calls C{on_head} once per message with its head, C{on_body}
    with each piece of (de-chunked) body as it arrives, and sets
    L{complete} when the message is over.

    @ivar complete: the current message is fully received.
    @ivar leftover: bytes that followed the complete message.
    @ivar received: some byte of the current message has arrived.
    """

    error: type[BadMessage] = BadMessage

    def __init__(
        self,
        on_head: Callable[[Any], None],
        on_body: Callable[[bytes], None],
    ) -> None:
        self._on_head = on_head
        self._on_body = on_body
        self._state = _DONE
        self._buffer = b""
        self._remaining = 0
        self.complete = True
        self.leftover = b""
        self.received = False

    def _arm(self) -> None:
        self._state = _HEAD
        self._buffer = b""
        self.complete = False
        self.leftover = b""
        self.received = False

    def stop(self) -> None:
        """
        Ignore the rest of the bytes being fed (the connection is being
        dropped).
        """
        self._state = _DONE
        self._buffer = b""

    def in_head(self) -> bool:
        """
        Whether part, but not all, of a message head has arrived.
        """
        return self._state == _HEAD and self.received

    def release(self) -> None:
        """
        Drop the callbacks (they usually point back at the parser's owner,
        a cycle), once the connection is closed.
        """
        self._on_head = self._on_body = _ignore

    def close_delimited(self) -> bool:
        """
        Whether the body in progress ends when the connection closes.
        """
        return self._state == _UNTIL_CLOSE

    def _head(self, data: bytes) -> bytes:
        raise NotImplementedError()

    def feed(self, data: bytes) -> None:
        """
        Parse bytes received.

        @raise BadMessage: the bytes are not a well-framed message.
        """
        self.received = True
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        while data:
            state = self._state
            if state == _LENGTH:
                remaining = self._remaining
                if len(data) < remaining:
                    self._remaining = remaining - len(data)
                    self._on_body(data)
                    return
                chunk, data = data[:remaining], data[remaining:]
                self._finish()
                self._on_body(chunk)
            elif state == _UNTIL_CLOSE:
                self._on_body(data)
                return
            elif state == _HEAD:
                data = self._head(data)
            elif state == _CHUNK_DATA:
                remaining = self._remaining
                if len(data) <= remaining:
                    self._remaining = remaining - len(data)
                    if self._remaining == 0:
                        self._state = _CHUNK_END
                    self._on_body(data)
                    return
                chunk, data = data[:remaining], data[remaining:]
                self._state = _CHUNK_END
                self._on_body(chunk)
            elif state == _CHUNK_SIZE:
                data = self._chunk_size(data)
            elif state == _CHUNK_END:
                if len(data) < 2:
                    self._buffer = data
                    return
                if data[:2] != b"\r\n":
                    raise self.error("chunk not followed by CRLF")
                self._state = _CHUNK_SIZE
                data = data[2:]
            elif state == _TRAILERS:
                data = self._trailers(data)
            else:
                # _DONE: what follows belongs to the next message, if any.
                if self.complete:
                    self.leftover += data
                return

    def _framed(self, fields: _Fields) -> None:
        """
        Set up for a body framed by C{Transfer-Encoding: chunked} or
        C{Content-Length} (already checked for conflicts by the caller).
        """
        if fields.chunked:
            self._state = _CHUNK_SIZE
        elif fields.length:
            self._state = _LENGTH
            self._remaining = fields.length
        else:
            self._finish()

    def _finish(self) -> None:
        self._state = _DONE
        self.complete = True

    def _line(self, data: bytes) -> tuple[bytes | None, bytes]:
        end = data.find(b"\r\n")
        if end < 0:
            if len(data) > _MAX_LINE:
                raise self.error("chunk line too long")
            self._buffer = data
            return None, b""
        return data[:end], data[end + 2 :]

    def _chunk_size(self, data: bytes) -> bytes:
        line, rest = self._line(data)
        if line is None:
            return rest
        size = line.split(b";", 1)[0].strip(b" \t")
        if not size or len(size) > 16 or size.strip(_HEX):
            raise self.error(f"bad chunk size: {line[:40]!r}")
        self._remaining = int(size, 16)
        self._state = _CHUNK_DATA if self._remaining else _TRAILERS
        return rest

    def _trailers(self, data: bytes) -> bytes:
        # Trailer fields are read and dropped, as Twisted's client does.
        line, rest = self._line(data)
        if line is None:
            return rest
        if not line:
            self._finish()
        return rest


class ResponseParser(_MessageParser):
    """
    Parses the responses of one connection, one at a time.

    L{expect} arms it for the next response; C{on_head} gets a
    L{ResponseHead}.
    """

    error = BadResponse

    def __init__(
        self,
        on_head: Callable[[ResponseHead], None],
        on_body: Callable[[bytes], None],
    ) -> None:
        super().__init__(on_head, on_body)
        self._no_body = False

    @property
    def trailing(self) -> bool:
        """
        Bytes followed the complete response: the connection cannot be
        trusted for another request.
        """
        return bool(self.leftover)

    def expect(self, no_body: bool) -> None:
        """
        Get ready for the response to a new request.

        @param no_body: the request was a C{HEAD}: whatever the headers
            say, the response has no body.
        """
        self._arm()
        self._no_body = no_body

    def _head(self, data: bytes) -> bytes:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            if len(data) > _MAX_HEAD:
                raise BadResponse("response head too long")
            self._buffer = data
            return b""
        head = data[:end]
        rest = data[end + 4 :]
        lines = head.split(b"\r\n")
        status = lines[0]
        if _bare(status):
            raise BadResponse(_BARE)
        prefix = status[:9]
        if prefix == b"HTTP/1.1 ":
            version = _HTTP11
        elif prefix == b"HTTP/1.0 ":
            version = _HTTP10
        else:
            raise BadResponse(f"not an HTTP/1.x status line: {status[:40]!r}")
        digits = status[9:12]
        if (
            len(digits) != 3
            or not digits.isdigit()
            or status[12:13] not in _SPACE_OR_END
        ):
            raise BadResponse(f"bad status code: {status[:40]!r}")
        code = int(digits)
        if 100 <= code < 200 and code != 101:
            # Informational (100 Continue, 103 Early Hints): the real
            # response follows.  Its header lines are dropped unread, but
            # a bare CR or LF among them could frame what follows
            # differently elsewhere.
            for line in lines:
                if _bare(line):
                    raise BadResponse(_BARE)
            return rest
        del lines[0]
        fields = _Fields(lines, BadResponse)
        tokens = fields.connection
        if version is _HTTP11:
            keep_alive = b"close" not in tokens
        else:
            keep_alive = b"keep-alive" in tokens
        body_length: object
        if self._no_body or code in (204, 304) or code == 101:
            body_length = 0
            self._finish()
            if fields.length is not None and code != 204:
                # The size of the resource a HEAD or a 304 speaks of, not
                # of a body that follows: the client is told it as it is.
                fields.headers._rawHeaders[b"Content-Length"] = [b"%d" % fields.length]
            if code == 101:
                keep_alive = False
        elif fields.coded:
            body_length = UNKNOWN_LENGTH
            if fields.chunked:
                self._state = _CHUNK_SIZE
            else:
                self._state = _UNTIL_CLOSE
                keep_alive = False
            if fields.length is not None:
                # Both framings given: RFC 9112 6.1 says not to reuse.
                keep_alive = False
        elif fields.length is not None:
            body_length = fields.length
            self._framed(fields)
        else:
            body_length = UNKNOWN_LENGTH
            self._state = _UNTIL_CLOSE
            keep_alive = False
        self._on_head(
            ResponseHead(
                version, code, status[13:], fields.headers, body_length, keep_alive
            )
        )
        return rest


class RequestHead:
    """
    The request line and headers of a request.

    @ivar length: the declared body length, L{None} for a chunked body.
    @ivar keep_alive: whether the client asks to keep the connection open
        after the response.
    @ivar headers: the headers, less C{Content-Length} and
        C{Transfer-Encoding}, which describe the framing this parser undoes.
    @ivar upgrade: C{b"websocket"} for a WebSocket handshake (an HTTP/1.1
        C{GET} without a body, with C{Connection: upgrade} and C{Upgrade:
        websocket}), else L{None}.
    """

    __slots__ = (
        "method",
        "uri",
        "version",
        "headers",
        "length",
        "keep_alive",
        "expect_continue",
        "upgrade",
    )

    def __init__(
        self,
        method: bytes,
        uri: bytes,
        version: bytes,
        headers: Headers,
        length: int | None,
        keep_alive: bool,
        expect_continue: bool,
        upgrade: bytes | None = None,
    ) -> None:
        self.method = method
        self.uri = uri
        self.version = version
        self.headers = headers
        self.length = length
        self.keep_alive = keep_alive
        self.expect_continue = expect_continue
        self.upgrade = upgrade


_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_METHODS: dict[bytes, bytes] = {}


class RequestParser(_MessageParser):
    """
    Parses the requests of one client connection, one at a time.

    L{expect} arms it for the next request; C{on_head} gets a
    L{RequestHead}.  A request body is framed by C{Content-Length} or
    C{Transfer-Encoding: chunked}; anything else (another transfer coding,
    both headers at once) is refused, as nginx does, since a request a
    proxy frames differently from the server behind it is a smuggling
    attack.

    @ivar max_head: the largest request head accepted (431 beyond).
    """

    error = BadRequest

    def __init__(
        self,
        on_head: Callable[[RequestHead], None],
        on_body: Callable[[bytes], None],
        max_head: int = _MAX_HEAD,
    ) -> None:
        super().__init__(on_head, on_body)
        self.max_head = max_head

    def expect(self) -> None:
        """
        Get ready for the next request.
        """
        self._arm()

    def _head(self, data: bytes) -> bytes:
        if data[:1] == b"\r" or data[:1] == b"\n":
            # RFC 9112 section 2.2: ignore empty lines before a request.
            data = data.lstrip(b"\r\n")
        end = data.find(b"\r\n\r\n")
        if end < 0:
            if len(data) > self.max_head:
                raise BadRequest("request head too large", 431)
            if data.find(b"\n\n") >= 0:
                # A head whose lines end in bare LFs: it would never end.
                raise BadRequest(_BARE)
            self._buffer = data
            return b""
        if end > self.max_head:
            raise BadRequest("request head too large", 431)
        head = data[:end]
        rest = data[end + 4 :]
        lines = head.split(b"\r\n")
        if _bare(lines[0]):
            raise BadRequest(_BARE)
        method, uri, version = self._request_line(lines[0])
        del lines[0]
        fields = _Fields(lines, BadRequest)
        if fields.coded:
            if fields.codings != _CHUNKED_ONLY or fields.length is not None:
                # "gzip, chunked" would reach the target de-chunked and
                # still compressed, with nothing to say so.
                raise BadRequest("unsupported Transfer-Encoding", 501)
            length = None
        else:
            length = fields.length or 0
        tokens = fields.connection
        upgrade = None
        if version == b"HTTP/1.1":
            keep_alive = b"close" not in tokens
            if b"upgrade" in tokens and method == b"GET" and length == 0:
                upgrade = _upgrade(fields.headers._rawHeaders.get(b"Upgrade"))
        else:
            # A Transfer-Encoding in an HTTP/1.0 request may have been
            # framed differently on its way here: answer it, then close
            # (RFC 9112 section 6.1).
            keep_alive = b"keep-alive" in tokens and not fields.coded
        hosts = fields.headers._rawHeaders.get(b"Host")
        if hosts is None:
            if version == b"HTTP/1.1":
                # RFC 9112 section 3.2, as nginx: an HTTP/1.1 request
                # always has a Host header, whatever the form of its target.
                raise BadRequest("HTTP/1.1 request without a Host header")
        elif len(hosts) > 1:
            # Routing and the target would not agree on which one counts.
            raise BadRequest("more than one Host header")
        elif hosts[0] not in _HOSTS:
            if _HOST.match(hosts[0]) is None:
                raise BadRequest("invalid Host header")
            if len(_HOSTS) < 256:
                _HOSTS.add(hosts[0])
        expect = fields.headers._rawHeaders.get(b"Expect")
        expect_continue = expect is not None and expect[0].lower() == b"100-continue"
        self._framed(fields)
        self._on_head(
            RequestHead(
                method,
                uri,
                version,
                fields.headers,
                length,
                keep_alive,
                # HTTP/1.0 has no 100 Continue (RFC 9110 section 10.1.1).
                expect_continue and length != 0 and version == b"HTTP/1.1",
                upgrade,
            )
        )
        return rest

    def _request_line(self, line: bytes) -> tuple[bytes, bytes, bytes]:
        method, _, rest = line.partition(b" ")
        uri, _, version = rest.partition(b" ")
        if version != b"HTTP/1.1" and version != b"HTTP/1.0":
            if version[:5] == b"HTTP/" and len(version) == 8:
                raise BadRequest("HTTP version not supported", 505)
            raise BadRequest(f"bad request line: {line[:60]!r}")
        known = _METHODS.get(method)
        if known is None:
            if _TOKEN.fullmatch(method) is None:
                raise BadRequest(f"bad method: {method[:40]!r}")
            if len(_METHODS) < 64:
                _METHODS[method] = method
        origin = uri[:1] == b"/" or _absolute(uri)
        if uri.find(b" ") >= 0 or not (
            origin or (method == b"OPTIONS" and uri == b"*")
        ):
            raise BadRequest(f"bad request target: {uri[:60]!r}")
        return method, uri, version


_CHUNKED_ONLY = [b"chunked"]
# RFC 3986's host (an IP literal, or a name of unreserved characters,
# sub-delims and escapes) and an optional port.
_HOST = re.compile(rb"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(:[0-9]*)?\Z")
# Host values already found valid: nearly every request repeats one.
_HOSTS: set[bytes] = set()


def _upgrade(values: list[bytes] | None) -> bytes | None:
    """
    The protocol a request asks to switch to, if the gateway relays it:
    WebSocket only.  Another (C{h2c} above all) would turn the connection
    into one the gateway cannot see into, a known way around the routes
    and checks of a proxy ("h2c smuggling"): its C{Upgrade} is dropped and
    the request is an ordinary one.
    """
    if values is not None and len(values) == 1 and values[0].lower() == b"websocket":
        return b"websocket"
    return None


def _absolute(uri: bytes) -> bool:
    return uri[:7].lower() == b"http://" or uri[:8].lower() == b"https://"

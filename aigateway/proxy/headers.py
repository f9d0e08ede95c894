# -*- test-case-name: tests.test_proxy -*-
"""
Header rewriting between client and target.

Hop-by-hop headers describe one connection, not the message, so a proxy
must not pass them on (RFC 9110 section 7.6.1); nor any header the
C{Connection} header names.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import suppress

from twisted.web.http_headers import Headers, _nameEncoder

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)


def _canonical(names: Iterable[bytes]) -> frozenset[bytes]:
    return frozenset(_nameEncoder.encode(name) for name in names)


# Header names in L{Headers} are kept canonical (C{Keep-Alive}), so the
# names to drop are compared in that form, with set operations on the keys
# rather than a lower() per header.
_HOP = _canonical(HOP_BY_HOP)
# Not sent on either: the gateway frames the body itself and sets C{Host};
# the body is already read, so a target need not say C{100 Continue}.
_NOT_FORWARDED = _HOP | _canonical({b"content-length", b"host", b"expect"})


def _dropped(raw: dict[bytes, list[bytes]], always: frozenset[bytes]) -> set[bytes]:
    """
    The names present in C{raw} not to pass on: C{always}, and any header
    the C{Connection} header names.
    """
    dropped = raw.keys() & always
    named = raw.get(b"Connection")
    if named:
        for value in named:
            names = _NAMED.get(value)
            if names is None:
                names = _named(value)
            dropped.update(raw.keys() & names)
    return dropped


# Connection header values seen, to the canonical names they list: nearly
# every answer says "keep-alive", which need not be split on every request.
_NAMED: dict[bytes, frozenset[bytes]] = {}


def _named(value: bytes) -> frozenset[bytes]:
    names = set()
    for token in value.split(b","):
        token = token.strip()
        if token:
            with suppress(ValueError):  # not a token: names nothing
                names.add(_nameEncoder.encode(token))
    result = frozenset(names)
    if len(_NAMED) < 256:
        _NAMED[value] = result
    return result


def upstream_headers(
    incoming: Headers,
    host: bytes,
    peer: bytes,
    client_ip: bytes,
    proto: bytes,
    port: bytes,
    extra: Iterable[tuple[str, str]] = (),
) -> Headers:
    """
    The headers to send to a target for a client request.

    @param host: the C{Host} to send (the client's, the upstream's
        C{host_header}, or the target's).
    @param peer: the address that connected to the gateway, appended to
        C{X-Forwarded-For} (as nginx's C{$proxy_add_x_forwarded_for}).
    @param client_ip: the client address the gateway trusts (the peer, or
        the first C{X-Forwarded-For} hop when told to trust it), sent as
        C{X-Real-IP}.
    @param extra: the target's own headers (its credentials), which replace
        any client header of the same name.
    """
    source = incoming._rawHeaders
    # A shallow copy: the value lists are shared with the client request's
    # headers, so they are only ever replaced here, never changed in place.
    # Names and values in it are already canonical and sanitised.
    raw = dict(source)
    for name in _dropped(source, _NOT_FORWARDED):
        del raw[name]
    original_host = source.get(b"Host")
    forwarded = raw.get(b"X-Forwarded-For")
    if forwarded:
        # Several header lines are one list (RFC 9110 5.3): keep every hop.
        hops = forwarded[0] if len(forwarded) == 1 else b", ".join(forwarded)
        raw[b"X-Forwarded-For"] = [hops + b", " + peer]
    else:
        raw[b"X-Forwarded-For"] = [peer]
    raw[b"X-Forwarded-Proto"] = [proto]
    raw[b"X-Forwarded-Host"] = [_hostname(original_host[0]) if original_host else host]
    raw[b"X-Forwarded-Port"] = [port]
    raw[b"X-Real-Ip"] = [client_ip]
    raw[b"Host"] = [host]
    out = Headers()
    out._rawHeaders = raw
    for header, value in extra:
        out.setRawHeaders(header, [value])
    return out


def _hostname(authority: bytes) -> bytes:
    """
    C{authority} without its port: C{[::1]:8000} gives C{[::1]}.
    """
    if authority.startswith(b"["):
        return authority[: authority.find(b"]") + 1]
    return authority.partition(b":")[0]


def client_response_headers(source: Headers, ours: Headers) -> Headers:
    """
    The headers for the client's response: the target's C{source}, less
    the hop-by-hop ones (the gateway frames the body itself), and the
    gateway's own C{ours} where the target sent none of that name.

    C{source} is taken over, not copied: it belongs to one response.
    """
    raw = source._rawHeaders
    for name in _dropped(raw, _HOP):
        del raw[name]
    for name, values in ours._rawHeaders.items():
        if name not in raw:
            raw[name] = values
    return source

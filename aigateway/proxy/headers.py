# -*- test-case-name: tests.test_proxy -*-
"""
Header rewriting between client and target.

Hop-by-hop headers describe one connection, not the message, so a proxy
must not pass them on (RFC 9110 section 7.6.1); nor any header the
C{Connection} header names.
"""

from __future__ import annotations

from collections.abc import Iterable

from twisted.web.http_headers import Headers

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


def _dropped(headers: Headers) -> frozenset[bytes]:
    named = headers.getRawHeaders(b"connection")
    if not named:
        return HOP_BY_HOP
    extra = {token.strip().lower() for value in named for token in value.split(b",")}
    return HOP_BY_HOP | extra


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
    dropped = _dropped(incoming) | {b"content-length", b"host"}
    out = Headers()
    # Names from getAllRawHeaders are already canonical and values already
    # sanitised, so they are copied without setRawHeaders' re-validation:
    # this runs for every proxied request.
    raw = out._rawHeaders
    for name, values in incoming.getAllRawHeaders():
        if name.lower() not in dropped:
            raw[name] = list(values)
    original_host = incoming.getRawHeaders(b"host", [b""])[0]
    forwarded = raw.get(b"X-Forwarded-For")
    raw[b"X-Forwarded-For"] = [forwarded[-1] + b", " + peer if forwarded else peer]
    raw[b"X-Forwarded-Proto"] = [proto]
    raw[b"X-Forwarded-Host"] = [
        original_host.rsplit(b":", 1)[0] if original_host else host
    ]
    raw[b"X-Forwarded-Port"] = [port]
    raw[b"X-Real-Ip"] = [client_ip]
    raw[b"Host"] = [host]
    for header, value in extra:
        out.setRawHeaders(header, [value])
    return out


def copy_response_headers(source: Headers, target: Headers) -> None:
    """
    Copy a target's response headers to the client response, less the
    hop-by-hop ones (twisted.web frames the body itself).
    """
    dropped = _dropped(source)
    raw = target._rawHeaders
    for name, values in source.getAllRawHeaders():
        if name.lower() not in dropped:
            raw[name] = list(values)

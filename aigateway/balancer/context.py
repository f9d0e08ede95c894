# -*- test-case-name: tests.test_hashing -*-
"""
The view of a proxied request that balancers may hash on.

It is built once per request and parses lazily: a round-robin pick never
pays for splitting cookies or query strings.
"""

from __future__ import annotations

from collections.abc import Mapping
from http.cookies import CookieError, SimpleCookie
from urllib.parse import parse_qs

import attrs
from twisted.web.http_headers import Headers


@attrs.define(slots=True)
class PickContext:
    """
    One request, as seen by a balancer.

    @ivar client_ip: the client address the gateway trusts (the peer, or the
        first C{X-Forwarded-For} hop when the gateway is told to trust it).
    @ivar peer: the address that connected to the gateway.
    @ivar path: the request path as received, without the query string.
    @ivar query: the raw query string.
    @ivar uri_captures: named groups of the matched route's regex path.
    @ivar set_cookie: filled in by a cookie-hashing balancer that generated
        a value for an absent cookie: C{(name, value, path)} for the proxy to
        set on the response, so the client sticks from its next request.
    """

    headers: Headers = attrs.field(factory=Headers)
    client_ip: str = ""
    peer: str = ""
    path: str = "/"
    query: bytes = b""
    uri_captures: Mapping[str, str] = attrs.field(factory=dict)
    set_cookie: tuple[str, str, str] | None = None
    _cookies: dict[str, str] | None = None
    _args: dict[str, list[str]] | None = None

    def header(self, name: str) -> str | None:
        """
        The first value of header C{name}, or L{None}.
        """
        value = self.headers.getRawHeaders(name)
        return value[0] if value else None

    def cookie(self, name: str) -> str | None:
        """
        The value of cookie C{name}, or L{None}.
        """
        if self._cookies is None:
            jar: dict[str, str] = {}
            for raw in self.headers.getRawHeaders("cookie", []):
                try:
                    parsed = SimpleCookie(raw)
                except CookieError:
                    continue
                jar.update((key, morsel.value) for key, morsel in parsed.items())
            self._cookies = jar
        return self._cookies.get(name)

    def query_arg(self, name: str) -> str | None:
        """
        The first value of query argument C{name}, or L{None}.
        """
        if self._args is None:
            self._args = parse_qs(self.query.decode("latin-1"), keep_blank_values=True)
        values = self._args.get(name)
        return values[0] if values else None

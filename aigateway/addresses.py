# -*- test-case-name: tests.test_schema -*-
"""
Host names, addresses and C{host:port} targets, as Kong writes them.

Kept apart from the schemas because the proxy and the health checks use
the same rules at run time (the C{Host} header a target is sent).
"""

from __future__ import annotations

import ipaddress
import re

# \Z, not $: "$" also matches before a final newline, which would let
# "host\n" through to a Host header.
HOSTNAME = re.compile(
    r"(?=.{1,253}\Z)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)"
    r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)*\.?\Z"
)


def is_ip(host: str) -> bool:
    """
    Whether C{host} is an IP address (IPv6 without brackets), which needs
    no lookup, rather than a name.
    """
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def valid_host(host: str) -> bool:
    """
    Whether C{host} is an IP address or a DNS name.
    """
    return is_ip(host) or bool(HOSTNAME.match(host))


def check_host(value: str) -> str | None:
    """
    A schema check for fields that hold a host.
    """
    return None if valid_host(value) else f"invalid value: {value!r}"


def parse_target(value: str) -> tuple[str, int] | None:
    """
    Split a target string into host and port, as Kong accepts it:
    C{host}, C{host:port}, C{a.b.c.d:port}, C{[v6]:port} or a bare IPv6
    address; the port defaults to 8000.

    @return: C{(host, port)}, or L{None} when the string is not a target.
    """
    host, port = value, "8000"
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        host, rest = value[1:end], value[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                return None
            port = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return None
    elif value.count(":") == 1:
        host, port = value.split(":")
    elif value.count(":") > 1:
        try:
            ipaddress.IPv6Address(value)
        except ValueError:
            return None
    # isdigit() alone takes "²" and other digits int() refuses.
    if not (port.isascii() and port.isdigit() and len(port) <= 5):
        return None
    if not 0 < int(port) < 65536 or not valid_host(host):
        return None
    return host, int(port)


def format_target(host: str, port: int) -> str:
    """
    The canonical C{host:port} form of a target (IPv6 in brackets).
    """
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def host_header(host: str, port: int, scheme: str) -> str:
    """
    The C{Host} header for C{host} on C{port}: the port is left out when it
    is the scheme's default, as clients do (RFC 9110, section 7.2).
    """
    if ":" in host:
        host = f"[{host}]"
    if (scheme, port) in (("http", 80), ("https", 443)):
        return host
    return f"{host}:{port}"

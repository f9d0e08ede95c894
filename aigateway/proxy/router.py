# -*- test-case-name: tests.test_router -*-
"""
Route matching: (host, method, path) to a route and its service.

Built once per configuration snapshot, so matching is lookups, not
configuration parsing.  Prefix paths live in a table keyed by the prefix:
a request path is looked up at each distinct prefix length, longest first,
which costs O(distinct lengths) instead of O(routes).  Regex paths (Kong's
C{~} syntax) are tried in C{regex_priority} order.

Precedence, as Kong's: a route that matches on more attributes (hosts,
methods, models) wins; then a regex path of higher priority; then the
longest prefix.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import NamedTuple, Optional

import attrs

from ..model import Route, Service
from ..records import route_regex


class Match(NamedTuple):
    """
    The outcome of routing one request.

    A named tuple rather than a frozen attrs class: one is made per request,
    and a frozen attrs C{__init__} costs several times a tuple's.

    @ivar path: the path to forward, after C{strip_path}, before the
        service's own path is prepended.
    @ivar captures: named groups of a regex path, for hashing.
    """

    route: Route
    service: Service
    path: str
    captures: Mapping[str, str]


@attrs.frozen
class _Entry:
    route: Route
    service: Service
    specificity: int
    regex: Optional[re.Pattern[str]] = None


def _host_matches(patterns: tuple[str, ...], host: str) -> bool:
    for pattern in patterns:
        if pattern == host:
            return True
        if pattern.startswith("*.") and host.endswith(pattern[1:]):
            return True
        if pattern.endswith(".*") and host.startswith(pattern[:-1]):
            return True
    return False


def _other_criteria(
    entry: _Entry, host: str, method: str, model: Callable[[], str | None]
) -> bool:
    route = entry.route
    if route.methods and method not in route.methods:
        return False
    if route.hosts and not _host_matches(route.hosts, host):
        return False
    return not (route.models and model() not in route.models)


class Router:
    """
    Matches requests against the routes of one snapshot.
    """

    def __init__(
        self, routes: tuple[Route, ...], services: Mapping[str, Service]
    ) -> None:
        self._prefixes: dict[str, list[_Entry]] = {}
        self._regexes: list[_Entry] = []
        self._anywhere: list[_Entry] = []
        self.uses_models = any(r.models for r in routes)
        for route in routes:
            service = services.get(route.service_id)
            if service is None:
                continue
            specificity = bool(route.hosts) + bool(route.methods) + bool(route.models)
            if not route.paths:
                self._anywhere.append(_Entry(route, service, specificity))
            for path in route.paths:
                if path.startswith("~"):
                    regex = re.compile(route_regex(path))
                    self._regexes.append(_Entry(route, service, specificity, regex))
                else:
                    self._prefixes.setdefault(path, []).append(
                        _Entry(route, service, specificity)
                    )
        for entries in self._prefixes.values():
            entries.sort(key=lambda e: -e.specificity)
        self._regexes.sort(key=lambda e: (-e.specificity, -e.route.regex_priority))
        self._anywhere.sort(key=lambda e: -e.specificity)
        self._lengths = sorted({len(p) for p in self._prefixes}, reverse=True)

    def match(
        self,
        host: str,
        method: str,
        path: str,
        model: Callable[[], str | None] = lambda: None,
    ) -> Match | None:
        """
        Find the route for a request.

        @param host: the request's host, lower case, without port.
        @param model: returns the JSON body's C{model}; called only when a
            candidate route matches on models, so bodies are parsed only then.
        """
        best: tuple[int, int, int] | None = None
        found: Match | None = None
        for entry in self._regexes:
            m = entry.regex.match(path) if entry.regex else None
            if m is None or not _other_criteria(entry, host, method, model):
                continue
            rank = (entry.specificity, 1, entry.route.regex_priority)
            if best is None or rank > best:
                best = rank
                rest = path[m.end() :] if entry.route.strip_path else path
                captures = {k: v for k, v in m.groupdict().items() if v is not None}
                found = Match(entry.route, entry.service, rest, captures)
            break
        for length in self._lengths:
            if length > len(path):
                continue
            entries = self._prefixes.get(path[:length])
            if not entries:
                continue
            for entry in entries:
                if best is not None and entry.specificity <= best[0]:
                    break
                if _other_criteria(entry, host, method, model):
                    best = (entry.specificity, 0, length)
                    rest = path[length:] if entry.route.strip_path else path
                    found = Match(entry.route, entry.service, rest, {})
                    break
        for entry in self._anywhere:
            if best is not None and entry.specificity <= best[0]:
                break
            if _other_criteria(entry, host, method, model):
                return Match(entry.route, entry.service, path, {})
        return found


def join_path(service_path: str | None, rest: str) -> str:
    """
    The path sent upstream: the service's path followed by what is left of
    the request path after stripping, with one slash between them.
    """
    if not service_path:
        return rest if rest.startswith("/") else "/" + rest
    if not rest:
        return service_path
    if service_path.endswith("/") and rest.startswith("/"):
        return service_path + rest[1:]
    if not service_path.endswith("/") and not rest.startswith("/"):
        return service_path + "/" + rest
    return service_path + rest


def normalize_path(path: str) -> str:
    """
    C{path} with percent-encoded dots decoded and dot segments removed
    (RFC 3986 sections 6.2.2 and 5.2.4), as nginx and Kong route and
    forward it.

    Otherwise C{/v1/chat/../../admin} would match a route for C{/v1/chat}
    and reach that service's target as C{/admin}: a path outside the
    prefix the route was meant to expose.  Paths without dot segments,
    nearly all, are returned as they are after two substring tests.
    """
    if "%2" in path:
        path = path.replace("%2e", ".").replace("%2E", ".")
    if "/." not in path:
        return path
    segments = path.split("/")
    kept: list[str] = []
    for segment in segments[1:]:
        if segment == "..":
            if kept:
                kept.pop()
        elif segment != ".":
            kept.append(segment)
    # A path ending in a dot segment names a directory: "/a/b/.." is "/a/".
    tail = "/" if segments[-1] in (".", "..") and kept else ""
    return "/" + "/".join(kept) + tail

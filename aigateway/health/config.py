# -*- test-case-name: tests.test_schema -*-
"""
The C{healthchecks} tree of an upstream: its schema (Kong's, with our two
documented differences) and the frozen values the health checkers read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from ..addresses import check_host
from ..schema import Field, absolute_path, header_map, record

_COUNTER = (0, 255)
_INTERVAL = (0, 65535)
_STATUS = Field("integer", between=(100, 999))


def _statuses(default: list[int]) -> Field:
    return Field("array", default=default, elements=_STATUS, unique=True)


_PASSIVE_HEALTHY = [*range(200, 209), 226, *range(300, 309)]

SCHEMA = record(
    threshold=Field("number", default=0, between=(0, 100)),
    active=record(
        type=Field("string", default="http", one_of=("http", "https", "tcp")),
        timeout=Field("number", default=1, between=(0, 65535)),
        concurrency=Field("integer", default=10, between=(1, 2147483648)),
        http_path=Field(
            "string",
            default="/",
            check=absolute_path,
        ),
        https_verify_certificate=Field("boolean", default=True),
        https_sni=Field("string", check=check_host),
        headers=Field("map", default={}, check=header_map),
        healthy=record(
            interval=Field("number", default=0, between=_INTERVAL),
            http_statuses=_statuses([200, 302]),
            # Ours: Kong's 0 probes but never acts on success.
            successes=Field("integer", default=2, between=_COUNTER),
        ),
        unhealthy=record(
            interval=Field("number", default=0, between=_INTERVAL),
            http_statuses=_statuses([429, 404, 500, 501, 502, 503, 504, 505]),
            tcp_failures=Field("integer", default=2, between=_COUNTER),
            timeouts=Field("integer", default=2, between=_COUNTER),
            http_failures=Field("integer", default=2, between=_COUNTER),
        ),
    ),
    passive=record(
        type=Field("string", default="http", one_of=("http", "https", "tcp")),
        healthy=record(
            http_statuses=_statuses(_PASSIVE_HEALTHY),
            successes=Field("integer", default=0, between=_COUNTER),
        ),
        unhealthy=record(
            http_statuses=_statuses([429, 500, 503]),
            tcp_failures=Field("integer", default=0, between=_COUNTER),
            timeouts=Field("integer", default=0, between=_COUNTER),
            http_failures=Field("integer", default=0, between=_COUNTER),
            # Ours: seconds before a passively failed target gets a trial.
            cooldown=Field("number", default=30, between=_INTERVAL),
        ),
    ),
)


@attrs.frozen
class Healthy:
    """
    When a target counts as healthy again.
    """

    http_statuses: frozenset[int]
    successes: int
    interval: float = 0


@attrs.frozen
class Unhealthy:
    """
    When a target counts as unhealthy.
    """

    http_statuses: frozenset[int]
    tcp_failures: int
    timeouts: int
    http_failures: int
    interval: float = 0
    cooldown: float = 0


@attrs.frozen
class Active:
    """
    Active probing settings.
    """

    type: str
    timeout: float
    concurrency: int
    http_path: str
    https_verify_certificate: bool
    https_sni: str | None
    headers: tuple[tuple[str, str], ...]
    healthy: Healthy
    unhealthy: Unhealthy

    @property
    def enabled(self) -> bool:
        """
        Whether any probing happens.
        """
        return bool(self.healthy.interval or self.unhealthy.interval)


@attrs.frozen
class Passive:
    """
    Passive (proxied traffic) settings.
    """

    type: str
    healthy: Healthy
    unhealthy: Unhealthy

    @property
    def enabled(self) -> bool:
        """
        Whether any proxied outcome can change a target's health.
        """
        u = self.unhealthy
        return bool(u.tcp_failures or u.timeouts or u.http_failures)

    @property
    def on(self) -> bool:
        """
        Whether proxied outcomes are counted at all: some passive threshold
        is set.  Unlike L{enabled}, C{healthy.successes} alone turns this
        on (proxied successes may bring back what active checks took out),
        but it does not turn health checking on by itself, as in Kong.
        """
        return self.enabled or bool(self.healthy.successes)


@attrs.frozen
class Healthchecks:
    """
    The whole C{healthchecks} tree of an upstream.
    """

    threshold: float
    active: Active
    passive: Passive

    @property
    def enabled(self) -> bool:
        """
        Whether health checking is on at all (else C{HEALTHCHECKS_OFF}).
        """
        return self.active.enabled or self.passive.enabled

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> Healthchecks:
        """
        Build from a validated C{healthchecks} record.
        """
        a, p = data["active"], data["passive"]
        return cls(
            threshold=data["threshold"],
            active=Active(
                type=a["type"],
                timeout=a["timeout"],
                concurrency=a["concurrency"],
                http_path=a["http_path"],
                https_verify_certificate=a["https_verify_certificate"],
                https_sni=a["https_sni"],
                headers=tuple(sorted(a["headers"].items())),
                healthy=Healthy(
                    frozenset(a["healthy"]["http_statuses"]),
                    a["healthy"]["successes"],
                    a["healthy"]["interval"],
                ),
                unhealthy=Unhealthy(
                    frozenset(a["unhealthy"]["http_statuses"]),
                    a["unhealthy"]["tcp_failures"],
                    a["unhealthy"]["timeouts"],
                    a["unhealthy"]["http_failures"],
                    a["unhealthy"]["interval"],
                ),
            ),
            passive=Passive(
                type=p["type"],
                healthy=Healthy(
                    frozenset(p["healthy"]["http_statuses"]),
                    p["healthy"]["successes"],
                ),
                unhealthy=Unhealthy(
                    frozenset(p["unhealthy"]["http_statuses"]),
                    p["unhealthy"]["tcp_failures"],
                    p["unhealthy"]["timeouts"],
                    p["unhealthy"]["http_failures"],
                    cooldown=p["unhealthy"]["cooldown"],
                ),
            ),
        )

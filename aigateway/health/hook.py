# -*- test-case-name: tests.test_service -*-
"""
The health object the proxy and Admin API talk to.
"""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from ..balancer.interfaces import IHealthView
from ..config import ConfigSnapshot
from ..model import Target


@implementer(IHealthView)
class NullHealth:
    """
    Health checking off: every target is available.
    """

    def update(self, snapshot: ConfigSnapshot) -> None:
        pass

    def available(self, target: Target) -> bool:
        return True

    def report_status(self, target: Target, status: int, retry_after: bytes | None) -> None:
        pass

    def report_failure(self, target: Target, timeout: bool) -> None:
        pass

    def describe(self, target: Target) -> dict[str, Any]:
        return {"health": "HEALTHCHECKS_OFF"}

    def set_manual(self, target: Target, healthy: bool) -> None:
        pass

    def stop(self) -> None:
        pass


def build_health(reactor: Any, metrics: Any) -> NullHealth:
    """
    The node's health object.
    """
    return NullHealth()

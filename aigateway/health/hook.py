# -*- test-case-name: tests.test_health_e2e -*-
"""
Building the node's health object.
"""

from __future__ import annotations

from typing import Any

from .active import AgentProber
from .manager import HealthManager


def build_health(reactor: Any) -> HealthManager:
    """
    The node's health manager, probing targets with real connections.
    """
    return HealthManager(reactor, AgentProber(reactor))

# -*- test-case-name: tests.test_health_e2e -*-
"""
Building the node's health object.
"""

from __future__ import annotations

from typing import Any

from .active import AgentProber
from .dns import ReactorNames
from .manager import HealthManager


def build_health(reactor: Any) -> HealthManager:
    """
    The node's health manager, probing targets with real connections and
    looking their names up with the reactor's resolver, as the proxy does.
    """
    return HealthManager(reactor, AgentProber(reactor), resolver=ReactorNames(reactor))

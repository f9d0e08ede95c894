"""
Shared fixtures: a running gateway on loopback ports with its own SQLite
file, and target servers that are closed after each test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest_twisted

from .gatewaykit import Gateway


@pytest_twisted.async_yield_fixture
async def gateway(tmp_path: Any) -> AsyncIterator[Gateway]:
    node = await Gateway(str(tmp_path / "aigateway.db")).start()
    yield node
    await node.stop()


@pytest_twisted.async_yield_fixture
async def servers() -> AsyncIterator[list[Any]]:
    """
    A list the test appends listening ports to; they are closed after it.
    """
    ports: list[Any] = []
    yield ports
    for port in ports:
        await port.stopListening()

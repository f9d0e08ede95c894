"""
Shared fixtures: a running gateway on loopback ports with its own SQLite
file, and target servers that are closed after each test.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
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


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """
    The URL of a new, empty PostgreSQL database, dropped after the test, on
    the server named by C{AIGATEWAY_TEST_POSTGRES} (C{bash .ci/postgres
    start} starts one and prints its URL; C{.ci/run} does both).  Without
    it the test is skipped, except in CI, where it fails.
    """
    server = os.environ.get("AIGATEWAY_TEST_POSTGRES")
    if not server:
        message = "no PostgreSQL: set AIGATEWAY_TEST_POSTGRES (bash .ci/postgres start)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    import psycopg

    name = f"aigw_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server, autocommit=True) as db:
        db.execute(f'CREATE DATABASE "{name}"')
    yield urlsplit(server)._replace(path=f"/{name}").geturl()
    with psycopg.connect(server, autocommit=True) as db:
        db.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: Any, tmp_path: Any) -> str:
    """
    A new configuration database of each kind: an SQLite file path, or a
    PostgreSQL URL (see L{postgres_url}).
    """
    if request.param == "sqlite":
        return str(tmp_path / "shared.db")
    return str(request.getfixturevalue("postgres_url"))

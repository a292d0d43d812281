"""Fixtures of the security suite: real login roles, a real `pgpush serve` process running as the service
role, and connections as a writer and as an outsider (a role with no grant at all)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from tests.conftest import Roles, _admin, as_role
from tests.polling import wait_until
from tests.serve_process import ServerProcess

# Notifications on the private channel arrive within milliseconds; the safety net is pushed far out so a
# row that arrives at all arrived live, and a stalled stream shows as a timeout.
LIVE_SETTINGS = {"safety_net_seconds": 600, "listener_probe_seconds": 1, "listener_probe_timeout_seconds": 5}


@pytest.fixture(scope="session")
def outsider_role(pg_url: str) -> Iterator[tuple[str, str]]:
    """`CREATE ROLE reporter LOGIN` as the review did it: it may connect and nothing more."""
    name, password = f"pgpush_outsider_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    _admin(pg_url, f"CREATE ROLE {name} LOGIN PASSWORD '{password}'")
    yield name, password
    with contextlib.suppress(asyncpg.PostgresError):
        _admin(pg_url, f"DROP ROLE IF EXISTS {name}")


@pytest.fixture
async def outsider(database_url: str, outsider_role: tuple[str, str]) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(as_role(database_url, *outsider_role))
    yield conn
    await conn.close()


@pytest.fixture
async def writer(database_url: str, roles: Roles) -> AsyncIterator[asyncpg.Connection]:
    """A product backend's connection: INSERT on messages and nothing else (deploy/roles.sql)."""
    conn = await asyncpg.connect(roles.writer_url(database_url))
    yield conn
    await conn.close()


@pytest.fixture
async def service(database_url: str, roles: Roles) -> AsyncIterator[ServerProcess]:
    """`pgpush serve` as a child process, connected as the service role."""
    process = ServerProcess(roles.service_url(database_url), **LIVE_SETTINGS)
    try:
        await process.ready()

        async def listening() -> bool:
            return await process.metric("pgpush_listener_connected") == 1

        await wait_until(listening, within=30, what="the listener is connected")
        yield process
    finally:
        await process.stop()

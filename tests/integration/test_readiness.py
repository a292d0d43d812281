"""GET /readyz: 200 while the process accepts streams, with the database's and the listener's state;
?strict=true: 503 unless both are up. (A Postgres outage: tests/integration/test_postgres_outage.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.conftest import RunningServer, make_token, settings_for
from tests.serve_process import free_port
from tests.sse_client import open_stream


async def test_a_healthy_process_is_ready_in_both_modes(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        for params in ({}, {"strict": "true"}):
            response = await client.get("/readyz", params=params)
            assert response.status_code == 200, response.text
            assert response.json() == {"status": "ready", "database": "up", "listener": "connected"}


@pytest.fixture
async def server_without_listener(database_url: str) -> AsyncIterator[RunningServer]:
    """The LISTEN connection points at a port where nothing listens: queries work, notifications never do."""
    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    settings = settings_for(database_url, listen_database_url=nowhere)
    server = await asyncio.to_thread(RunningServer(settings).start)
    yield server
    await asyncio.to_thread(server.stop)


async def test_without_a_listener_the_process_still_accepts_streams_and_strict_readiness_says_so(
    server_without_listener: RunningServer,
) -> None:
    server = server_without_listener
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        plain = await client.get("/readyz")
        assert plain.status_code == 200, plain.text
        assert plain.json() == {"status": "degraded", "database": "up", "listener": "disconnected"}
        strict = await client.get("/readyz", params={"strict": "true"})
        assert strict.status_code == 503, strict.text
        assert strict.json() == {
            "error": "not_ready",
            "detail": "not ready: the listener is disconnected",
            "database": "up",
            "listener": "disconnected",
        }
    stream = await open_stream(server.url, make_token("alice"))  # what plain readiness promised
    await stream.close()


async def test_a_draining_process_is_not_ready(server: RunningServer) -> None:
    """Draining is what `pgpush serve` does on SIGTERM (DrainingServer.handle_exit): the same call here."""
    hub = server.app.state.hub
    server.server.servers[0].get_loop().call_soon_threadsafe(hub.shutdown)
    await server.wait_for(lambda: not hub.accepting)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        for params in ({}, {"strict": "true"}):
            response = await client.get("/readyz", params=params)
            assert response.status_code == 503, response.text
            body = response.json()
            assert body["error"] == "shutting_down", body
            assert (body["database"], body["listener"]) == ("up", "connected")


async def test_a_strict_value_that_is_not_a_boolean_is_a_422(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        response = await client.get("/readyz", params={"strict": "maybe"})
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "invalid_request"

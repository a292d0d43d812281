"""10,000 stream requests from one user in a few seconds: those over the per-user cap get 429, everyone else
is still served, and no stream leaks (the live-stream gauge returns to bob's one).

The server runs as its own process, so the flood's client side and the server each get a CPU.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from tests.conftest import make_token
from tests.hostile.conftest import watching
from tests.polling import wait_until
from tests.serve_process import HOST, ServerProcess

ATTEMPTS = 10_000
AT_ONCE = 200
CAP = 10  # PGPUSH_MAX_STREAMS_PER_USER's default


@pytest.fixture
async def serve(database_url: str) -> AsyncIterator[ServerProcess]:
    server = ServerProcess(database_url, log_level="warning", max_streams_per_user=CAP)
    await server.ready()
    yield server
    assert await server.stop() == 0


async def attempt(port: int, request: bytes, held: list[asyncio.StreamWriter]) -> int:
    """Connect, ask for a stream, read the status; a granted stream is kept open (it holds a slot)."""
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(request)
    status = int((await reader.readuntil(b"\r\n")).split()[1])
    if status == 200:
        held.append(writer)
    else:
        writer.close()
    return status


@pytest.mark.timeout(400)
async def test_ten_thousand_stream_requests_from_one_user_get_429_beyond_the_cap_and_leak_nothing(
    serve: ServerProcess, db: asyncpg.Connection
) -> None:
    token = make_token("mallory")
    request = f"GET /events HTTP/1.1\r\nHost: pgpush\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    held: list[asyncio.StreamWriter] = []
    statuses: dict[int, int] = {}
    gate = asyncio.Semaphore(AT_ONCE)

    async def one() -> None:
        async with gate:
            status = await attempt(serve.port, request, held)
        statuses[status] = statuses.get(status, 0) + 1

    health_times: list[float] = []

    async def probe_health(stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(base_url=serve.url, timeout=60) as client:
            while not stop.is_set():
                started = time.monotonic()
                assert (await client.get("/healthz")).status_code == 200
                health_times.append(time.monotonic() - started)
                await asyncio.sleep(0.2)

    async with watching(serve.port, db) as bob:
        stop = asyncio.Event()
        checker = asyncio.create_task(bob.keep_checking(stop, every=0.2))
        prober = asyncio.create_task(probe_health(stop))
        started = time.monotonic()
        # A bound for a wedged server, not a speed target: a loaded machine takes minutes, not seconds.
        async with asyncio.timeout(300):
            await asyncio.gather(*(one() for _ in range(ATTEMPTS)))
        flood_seconds = time.monotonic() - started
        stop.set()
        delivery_times = await checker
        await prober
        assert statuses == {200: CAP, 429: ATTEMPTS - CAP}
        assert await serve.metric("pgpush_streams") == CAP + 1  # mallory's granted streams and bob's
        assert await serve.metric("pgpush_streams_rejected_total", reason="per_user") == ATTEMPTS - CAP
        for writer in held:
            writer.close()

        async def only_bobs_left() -> bool:
            return await serve.metric("pgpush_streams") == 1

        await wait_until(only_bobs_left, what="the refused and closed streams are all gone")
    print(
        f"\nflood: {ATTEMPTS} attempts in {flood_seconds:.1f}s -> {statuses}; bob served "
        f"{len(delivery_times)} times (max {max(delivery_times):.3f}s); /healthz max {max(health_times):.3f}s"
    )
    assert delivery_times and health_times  # bob and /healthz were served during the flood

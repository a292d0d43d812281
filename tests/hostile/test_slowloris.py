"""Slowloris: clients that send their request headers one byte a second must not starve anyone else.

uvicorn arms no timer while a request's headers are incomplete (its keep-alive timeout only runs between
requests), so such a connection is held open for as long as the client trickles; what it costs is one
socket and one small parser each. The test bounds the attack to ~5 s and checks that bob's stream, new
streams and /healthz are served throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx
import pytest

from tests.conftest import RunningServer, make_token
from tests.faults.client import LightStream
from tests.hostile.conftest import Bystander, port_of

SLOW_CLIENTS = 50
SECONDS = 5


async def trickle(port: int, request: bytes, seconds: int, still_open: list[bool]) -> None:
    """Send the request one byte a second for `seconds`; note whether the server kept the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for byte in request[:seconds]:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(1)
        with contextlib.suppress(TimeoutError):
            still_open.append(await asyncio.wait_for(reader.read(1), 0.1) != b"")
            return
        still_open.append(True)  # nothing to read and not closed: the server still waits for the headers
    except ConnectionError:
        still_open.append(False)
    finally:
        writer.close()


@pytest.mark.timeout(30)
async def test_clients_trickling_their_headers_do_not_stop_the_server_serving_others(
    server: RunningServer, bystander: Bystander
) -> None:
    port = port_of(server)
    request = (
        f"GET /events HTTP/1.1\r\nHost: pgpush\r\nAuthorization: Bearer {make_token('eve')}\r\n\r\n".encode()
    )
    still_open: list[bool] = []
    attack = [asyncio.create_task(trickle(port, request, SECONDS, still_open)) for _ in range(SLOW_CLIENTS)]
    stop = asyncio.Event()
    checker = asyncio.create_task(bystander.keep_checking(stop, every=0.3))
    health_times: list[float] = []
    newcomers = 0
    async with httpx.AsyncClient(base_url=server.url, timeout=5) as client:
        while not all(task.done() for task in attack):
            started = time.monotonic()
            assert (await client.get("/healthz")).status_code == 200
            health_times.append(time.monotonic() - started)
            newcomer = await LightStream.open("127.0.0.1", port, make_token(f"newcomer{newcomers}"), within=3)
            assert newcomer.status == 200
            await newcomer.close()
            newcomers += 1
            await asyncio.sleep(0.25)
    stop.set()
    delivery_times = await checker
    await asyncio.gather(*attack)
    print(
        f"\nslowloris: {sum(still_open)}/{SLOW_CLIENTS} trickling connections still open after {SECONDS}s; "
        f"bob served {len(delivery_times)} times (max {max(delivery_times):.3f}s), /healthz max "
        f"{max(health_times):.3f}s, {newcomers} new streams opened"
    )
    # Each check had its own bounded wait; what counts is that they kept succeeding during the attack.
    assert len(delivery_times) >= SECONDS and len(health_times) >= SECONDS and newcomers >= SECONDS
    await server.wait_for(lambda: server.stream_count == 1)  # bob's: no trickling client got a stream

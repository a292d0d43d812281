"""`pgpush serve` refuses request heads that trickle in (408) or that are too large (431), then closes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from tests.conftest import make_token
from tests.serve_process import HOST, ServerProcess
from tests.sse_client import open_stream


@pytest.fixture
async def serve(database_url: str) -> AsyncIterator[ServerProcess]:
    server = ServerProcess(database_url, header_timeout_seconds=1)
    await server.ready()
    yield server
    await server.stop()


async def raw_exchange(port: int, head: bytes, *, then_wait: float) -> bytes:
    """Send `head`, then read until the server closes the connection (at most `then_wait` seconds)."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(head)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), then_wait)
    finally:
        writer.close()


def status_and_body(response: bytes) -> tuple[int, dict[str, str]]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


async def test_a_head_that_does_not_arrive_in_time_gets_408_and_is_closed(serve: ServerProcess) -> None:
    response = await raw_exchange(serve.port, b"GET /events HTTP/1.1\r\nHost: x\r\n", then_wait=5)
    status, body = status_and_body(response)
    assert status == 408 and body["error"] == "request_timeout"


async def test_a_connection_that_sends_nothing_gets_408(serve: ServerProcess) -> None:
    status, body = status_and_body(await raw_exchange(serve.port, b"", then_wait=5))
    assert status == 408 and "did not arrive" in body["detail"]


async def test_a_huge_head_gets_431_but_a_16_kib_token_still_reaches_the_api(serve: ServerProcess) -> None:
    huge = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 100_000 + b"\r\n\r\n"
    status, body = status_and_body(await raw_exchange(serve.port, huge, then_wait=5))
    assert status == 431 and body["error"] == "headers_too_large"
    async with httpx.AsyncClient(base_url=serve.url) as client:
        big_token = await client.get("/events", headers={"Authorization": "Bearer " + "x" * 16_384})
        assert big_token.status_code == 401
        assert (await client.get("/healthz")).status_code == 200


async def test_a_stream_outlives_the_header_deadline(serve: ServerProcess, db: asyncpg.Connection) -> None:
    async with await open_stream(serve.url, make_token("alice")) as stream:
        await asyncio.sleep(1.5)  # past the 1 s head deadline: the stream's head was complete long ago
        await db.execute("INSERT INTO messages (recipient, data) VALUES ('alice', '1')")
        assert [e.data for e in await stream.messages(1)] == ["1"]

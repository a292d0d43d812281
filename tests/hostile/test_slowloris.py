"""Slowloris: clients that send their request headers a byte at a time must not starve anyone else.

uvicorn alone arms no timer while a request's headers are incomplete; the server `pgpush serve` runs does
(service/http_protocol.py): a head not complete within PGPUSH_HEADER_TIMEOUT_SECONDS is answered 408 and the
connection closed. The test trickles 50 such heads, checks that each connection stays open until that
deadline and is then refused, and that bob's stream, new streams and /healthz are served throughout.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import asyncpg
import httpx
import pytest

from tests.conftest import RunningServer, ServerFactory, make_token
from tests.hostile.conftest import port_of, watching
from tests.polling import wait_until
from tests.sse_client import SSEStream

SLOW_CLIENTS = 50
HEADER_TIMEOUT = 2.0
# Far beyond the deadline: a loaded machine only makes the refusal late, never early.
GIVE_UP_AFTER = 30.0


@dataclass
class Trickled:
    still_open_until_deadline: bool  # the server kept the connection until its header timer fired
    answer: bytes  # what it sent when it refused the head


async def trickle(port: int, request: bytes) -> Trickled:
    """Send the request a byte every 0.2 s (never completing it) until the server answers and hangs up."""
    # Before connecting: the server arms its timer when it accepts, which its own thread may do before this
    # busy loop resumes after the connect (a start taken after it once measured less than the deadline).
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        answer = asyncio.create_task(reader.read())  # everything until the server closes
        async with asyncio.timeout(GIVE_UP_AFTER):
            for byte in request[:-4]:  # the blank line that would end the head never comes
                if answer.done():
                    break
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.2)
            text = await answer
        return Trickled(time.monotonic() - started >= HEADER_TIMEOUT, text)
    finally:
        writer.close()


@pytest.mark.timeout(90)
async def test_clients_trickling_their_headers_are_refused_with_408_and_do_not_stop_the_server(
    start_server: ServerFactory, db: asyncpg.Connection
) -> None:
    server: RunningServer = await start_server(header_timeout_seconds=HEADER_TIMEOUT)
    port = port_of(server)
    request = (
        f"GET /events HTTP/1.1\r\nHost: pgpush\r\nX-Padding: {'p' * 200}\r\n"
        f"Authorization: Bearer {make_token('eve')}\r\n\r\n".encode()
    )
    async with watching(port, db) as bystander:
        attack = [asyncio.create_task(trickle(port, request)) for _ in range(SLOW_CLIENTS)]
        rounds = 0
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            while not all(task.done() for task in attack):
                assert (await client.get("/healthz")).status_code == 200
                newcomer = await SSEStream.open("127.0.0.1", port, make_token(f"newcomer{rounds}"), within=30)
                assert newcomer.status == 200
                await newcomer.close()
                await bystander.assert_served(within=30)
                rounds += 1
        results = await asyncio.gather(*attack)
    assert rounds >= 1
    assert all(r.still_open_until_deadline for r in results), (
        "a trickling connection was cut before its deadline"
    )
    for result in results:
        head, _, body = result.answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 "), result.answer[:200]
        assert b'"error":"request_timeout"' in body
    await wait_until(lambda: server.stream_count == 0)  # no trickling client ever got a stream

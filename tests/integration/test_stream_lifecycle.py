"""Heartbeats, pause, token expiry and stream caps (docs/protocol.md §3)."""

from __future__ import annotations

import asyncio
import json
import time

import asyncpg
import httpx
import pytest

from tests.conftest import RunningServer, ServerFactory, make_token
from tests.polling import wait_until
from tests.sse_client import open_stream


async def test_a_quiet_stream_gets_ping_comments(start_server: ServerFactory) -> None:
    server = await start_server(heartbeat_seconds=0.2)
    async with await open_stream(server.url, make_token("alice")) as stream:
        await wait_until(lambda: stream.comments.count("ping") >= 2, what="two pings")
        assert not stream.closed.is_set()


async def test_an_idle_stream_is_paused_and_a_reconnect_loses_nothing(
    start_server: ServerFactory, db: asyncpg.Connection
) -> None:
    server = await start_server(idle_timeout_seconds=0.5, heartbeat_seconds=0.1, pause_retry_ms=1234)
    async with await open_stream(server.url, make_token("alice")) as stream:
        await db.execute("INSERT INTO messages (recipient, data) VALUES ('alice', '1')")
        [first] = await stream.messages(1)
        before = time.time() * 1000
        rest = await stream.rest(timeout=30)
    pause = rest[-1]
    assert pause.type == "pause" and pause.last_event_id == str(first.seq)  # pause carries no id
    assert pause.retry == 1234
    reconnect_at = json.loads(pause.data)["reconnect_at"]
    assert before + 1234 - 100 <= reconnect_at <= time.time() * 1000 + 1234 + 100
    await db.execute("INSERT INTO messages (recipient, data) VALUES ('alice', '2'), ('alice', '3')")
    async with await open_stream(server.url, make_token("alice"), last_event_id=pause.last_event_id) as again:
        assert [e.data for e in await again.messages(2)] == ["2", "3"]


async def test_heartbeats_do_not_keep_a_stream_from_pausing(start_server: ServerFactory) -> None:
    server = await start_server(idle_timeout_seconds=0.6, heartbeat_seconds=0.1)
    async with await open_stream(server.url, make_token("alice")) as stream:
        events = await stream.rest(timeout=30)
    assert [e.type for e in events] == ["pause"]
    assert stream.comments.count("ping") >= 3


async def test_the_stream_ends_with_token_expired_when_the_jwt_expires(server: RunningServer) -> None:
    async with await open_stream(server.url, make_token("alice", ttl=1.5)) as stream:
        events = await stream.rest(timeout=30)
    assert [e.type for e in events] == ["token_expired"]
    assert json.loads(events[0].data)["exp"] > 0


async def test_more_streams_than_the_per_user_cap_get_429(start_server: ServerFactory) -> None:
    server = await start_server(max_streams_per_user=2)
    token = make_token("alice")
    streams = [await open_stream(server.url, token) for _ in range(2)]
    try:
        async with httpx.AsyncClient(base_url=server.url) as client:
            refused = await client.get("/events", headers={"Authorization": f"Bearer {token}"})
            other_user = await open_stream(server.url, make_token("bob"))
            await other_user.close()
    finally:
        for s in streams:
            await s.close()
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"] == "too_many_streams"
    await wait_until(lambda: server.stream_count == 0)


async def test_more_streams_than_the_process_cap_get_503(start_server: ServerFactory) -> None:
    server = await start_server(max_streams=1)
    async with (
        await open_stream(server.url, make_token("alice")),
        httpx.AsyncClient(base_url=server.url) as client,
    ):
        refused = await client.get("/events", headers={"Authorization": f"Bearer {make_token('bob')}"})
    assert refused.status_code == 503
    assert "retry-after" in refused.headers
    assert refused.json()["error"] == "server_full"


async def test_a_closed_client_frees_its_slot(server: RunningServer) -> None:
    stream = await open_stream(server.url, make_token("alice"))
    await wait_until(lambda: server.stream_count == 1)
    await stream.close()
    await wait_until(lambda: server.stream_count == 0)


@pytest.mark.timeout(300)
async def test_a_client_that_stops_reading_is_cut_and_resumes_from_the_table(
    start_server: ServerFactory, db: asyncpg.Connection
) -> None:
    server = await start_server(stream_buffer_bytes=4096)
    _reader, writer = await asyncio.open_connection("127.0.0.1", int(server.url.rsplit(":", 1)[1]))
    token = make_token("alice")
    writer.write(f"GET /events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
    await writer.drain()
    await wait_until(lambda: server.stream_count == 1)
    payload = json.dumps({"pad": "x" * 2000})
    for _ in range(20):  # never read by the client: the socket buffers fill, then the stream's buffer
        await db.execute(
            "INSERT INTO messages (recipient, data) SELECT 'alice', $1::jsonb FROM generate_series(1, 500)",
            payload,
        )
    # 20 MB of frames to read and push before the buffer overflows: minutes on a loaded box, a bound only.
    await wait_until(lambda: server.stream_count == 0, within=120, what="the stalled stream was cut")
    writer.close()
    assert server.metric("pgpush_streams_closed_total", reason="overflow") == 1
    async with await open_stream(server.url, token, last_event_id=0) as stream:
        events = await stream.messages(10_000, timeout=30)
    assert len({e.seq for e in events}) == 10_000

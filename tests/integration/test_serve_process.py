"""`pgpush serve` as a real process: zero-configuration start, and a drained SIGTERM that exits 0."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.conftest import JWT_SECRET, make_token
from tests.serve_process import ServerProcess
from tests.sse_client import open_stream


@pytest.fixture
async def serve(database_url: str) -> AsyncIterator[ServerProcess]:
    proc = ServerProcess(database_url, shutdown_jitter_ms=2000)
    await proc.ready()
    yield proc
    await proc.stop()


async def test_sigterm_sends_every_stream_a_jittered_retry_closes_it_and_exits_0(
    serve: ServerProcess, db: asyncpg.Connection
) -> None:
    streams = [await open_stream(serve.url, make_token(f"user{i}")) for i in range(20)]
    await db.execute(
        "INSERT INTO messages (recipient, data) SELECT 'user' || n, '1' FROM generate_series(0, 19) n"
    )
    for s in streams:
        await s.messages(1)
    code = await serve.stop()
    assert code == 0
    retries = []
    for s in streams:
        await asyncio.wait_for(s.closed.wait(), 30)
        assert s.retries[0] == 3000  # the first frame
        retries.append(s.retries[-1])
        await s.close()
    assert all(0 <= r <= 2000 for r in retries)
    assert len(set(retries)) > 1, "the retry values are spread, so clients do not return in one wave"
    assert JWT_SECRET not in serve.output


async def test_after_a_restart_clients_resume_from_their_last_event_id(
    serve: ServerProcess, db: asyncpg.Connection, database_url: str
) -> None:
    token = make_token("alice")
    async with await open_stream(serve.url, token) as stream:
        await db.execute("INSERT INTO messages (recipient, data) VALUES ('alice', '1')")
        [first] = await stream.messages(1)
        assert await serve.stop() == 0
        await asyncio.wait_for(stream.closed.wait(), 30)
    await db.execute("INSERT INTO messages (recipient, data) VALUES ('alice', '2'), ('alice', '3')")
    again = ServerProcess(database_url, port=serve.port)
    try:
        await again.ready()
        async with await open_stream(again.url, token, last_event_id=first.last_event_id) as resumed:
            assert [e.data for e in await resumed.messages(2)] == ["2", "3"]
    finally:
        assert await again.stop() == 0


async def test_zero_configuration_serve_starts_postgres_prints_a_token_and_delivers(
    postgres_tmp: Path,
) -> None:
    proc = ServerProcess(None, data_dir=postgres_tmp / "data")
    try:
        await proc.ready(within=120)
        banner = proc.output
        token = re.search(r"#token=(\S+)", banner)
        database = re.search(r"PGPASSFILE=(\S+) psql '?(postgresql://\S+?)'? -c", banner)
        assert token and database, banner
        assert (postgres_tmp / "data" / "jwt-secret").exists()
        async with await open_stream(proc.url, token.group(1)) as stream:
            conn = await asyncpg.connect(database.group(2), passfile=database.group(1))
            try:
                await conn.execute(
                    "INSERT INTO messages (recipient, event, data) "
                    "VALUES ('demo', 'lead', '{\"company\": \"ACME\"}')"
                )
            finally:
                await conn.close()
            [event] = await stream.messages(1)
        assert event.type == "lead"
        async with httpx.AsyncClient(base_url=proc.url) as client:
            page = await client.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    finally:
        assert await proc.stop() == 0

"""Streams cannot starve the process of file descriptors: the stream cap stops short of the open-files limit.

A stream is a socket, and so is a database connection. Under a limit of 256 files and the default
PGPUSH_MAX_STREAMS (50,000), a flood of streams used to take every descriptor: new connections were no
longer accepted and the pool could not reach Postgres. Now the cap is lowered at startup, the stream past
it gets `503 server_full`, and Postgres, the open streams and the REST API keep working.
"""

from __future__ import annotations

import asyncio

import asyncpg
import httpx

from tests.conftest import make_token
from tests.polling import wait_until
from tests.serve_process import HOST, ServerProcess
from tests.sse_client import SSEStream

OPEN_FILES = 256


async def test_a_stream_flood_stops_at_503_before_the_open_files_limit_and_postgres_stays_reachable(
    database_url: str, db: asyncpg.Connection
) -> None:
    server = ServerProcess(database_url, open_files=OPEN_FILES)
    streams: list[SSEStream] = []
    refused: SSEStream | None = None
    try:
        await server.ready()
        assert "does not fit the open-files limit of 256" in server.output

        for n in range(OPEN_FILES):  # more streams than the process could ever hold
            token = make_token(f"user{n}")
            stream = await SSEStream.open(HOST, server.port, token, keep_events=True, within=30)
            if stream.status != 200:
                refused = stream
                break
            streams.append(stream)
        assert refused is not None, f"{len(streams)} streams opened under a {OPEN_FILES}-file limit"
        assert refused.status == 503 and b'"server_full"' in refused.body
        assert 0 < len(streams) < OPEN_FILES - 100, "the cap keeps a reserve for the database and requests"

        # The pool still opens connections: rows reach the first and the last stream through it.
        for user, stream in (("user0", streams[0]), (f"user{len(streams) - 1}", streams[-1])):
            await db.execute("INSERT INTO messages (recipient, event, data) VALUES ($1, 'lead', '1')", user)
            await wait_until(lambda s=stream: len(s.seqs) == 1, within=30, what=f"{user} got the row")
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            assert (await client.get("/readyz?strict=true")).status_code == 200
            bearer = {"Authorization": f"Bearer {make_token('user0')}"}
            inbox = await client.get("/me/messages", headers=bearer)
            assert inbox.status_code == 200 and len(inbox.json()["messages"]) == 1
        assert "Too many open files" not in server.output
    finally:
        await asyncio.gather(*(s.close() for s in [*streams, *([refused] if refused else [])]))
        assert await server.stop() == 0

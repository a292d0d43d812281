"""A row Postgres cannot send stalls only its own recipient: the others keep their delivery latency.

In a SQL_ASCII database (legacy clusters have them) a writer can store bytes that are not UTF-8; reading
such a row over pgpush's UTF-8 connection fails in Postgres ("invalid byte sequence"). 0.3.0 read new rows
and newcomers' cursors in batched queries and retried a failed batch forever, so one such row for mallory
stopped delivery to everyone read with her (a 22-recipient statement) and, while her stream was open,
every new stream of anyone. Now a failed batch is split until the one recipient it fails for, whose
streams are closed; the test measures the others' delivery while the failure is injected.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest
from pgpush.migrate import migrate

from tests.conftest import make_token, scratch_database
from tests.hostile.conftest import watching
from tests.polling import wait_until
from tests.serve_process import HOST, ServerProcess
from tests.sse_client import SSEStream

# A jsonb value holding the byte 0xff, too big to ride in the notification (so the hub reads it).
POISON = "jsonb_build_object('bad', convert_from('\\xff'::bytea, 'SQL_ASCII'), 'pad', repeat('p', 9000))"
OTHERS = [f"user{n:02}" for n in range(20)]


@pytest.fixture
async def ascii_url(pg_url: str) -> AsyncIterator[str]:
    """A database of our own in SQL_ASCII (no encoding checks on what writers store), migrated."""
    options = "ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
    async with scratch_database(pg_url, options, prefix="pgpush_ascii") as url:
        await asyncio.to_thread(migrate, url)
        yield url


@pytest.fixture
async def serve(ascii_url: str) -> AsyncIterator[ServerProcess]:
    server = ServerProcess(ascii_url, log_level="warning")
    await server.ready()
    yield server
    await server.stop()


async def keep_reconnecting(port: int, user: str, stop: asyncio.Event, opened: list[int]) -> None:
    """A client of `user` that reconnects at once whenever its stream ends (the failure stays injected)."""
    while not stop.is_set():
        stream = await SSEStream.open(HOST, port, make_token(user))
        opened.append(stream.status)
        done = asyncio.ensure_future(stop.wait())
        await asyncio.wait([done, asyncio.ensure_future(stream.closed.wait())], return_when="FIRST_COMPLETED")
        done.cancel()
        await stream.close()


@pytest.mark.timeout(120)
async def test_a_row_postgres_cannot_send_stalls_only_its_recipient(
    serve: ServerProcess, ascii_url: str
) -> None:
    db = await asyncpg.connect(ascii_url)
    port = serve.port
    try:
        async with watching(port, db) as bob:
            baseline = [await bob.assert_served(within=10) for _ in range(5)]
            # 1. The live read: mallory's stream is open (her cursor was read cleanly); one statement writes
            # a row for 22 recipients, hers poisoned.
            mallory = await SSEStream.open(HOST, port, make_token("mallory"))
            alice = await SSEStream.open(HOST, port, make_token("alice"))
            carol = await SSEStream.open(HOST, port, make_token("carol"))
            # A first row each, so their cursors are read (cleanly) before the poisoned statement.
            await db.execute(
                "INSERT INTO messages (recipient, data) SELECT r, '1' FROM unnest($1::text[]) r ORDER BY r",
                ["alice", "carol", "mallory"],
            )
            await wait_until(
                lambda: all(len(s.seqs) == 1 for s in (mallory, alice, carol)), within=10, what="first rows"
            )
            started = time.monotonic()
            await db.execute(
                "INSERT INTO messages (recipient, data) SELECT r, CASE WHEN r = 'mallory' THEN "
                + POISON
                + " ELSE jsonb_build_object('to', r) END FROM unnest($1::text[]) r ORDER BY r",
                ["alice", "carol", "mallory", *OTHERS],
            )
            await wait_until(
                lambda: len(alice.seqs) == 2 and len(carol.seqs) == 2, within=10, what="the 22-recipient row"
            )
            fan_out = time.monotonic() - started
            await wait_until(lambda: mallory.closed.is_set(), within=10, what="mallory's stream closed")

            # 2. Newcomers: mallory's client keeps reconnecting (her unread row fails her cursor read each
            # time) while bob's rows go on and dave's new stream gets his unread rows.
            stop = asyncio.Event()
            attempts: list[int] = []
            poisoned = asyncio.create_task(keep_reconnecting(port, "mallory", stop, attempts))
            await wait_until(lambda: len(attempts) >= 3, within=30, what="mallory reconnected")
            during = [await bob.assert_served(within=10) for _ in range(10)]
            await db.execute(
                "INSERT INTO messages (recipient, data) "
                "SELECT 'dave', to_jsonb(n) FROM generate_series(1, 3) n"
            )
            started = time.monotonic()
            dave = await SSEStream.open(HOST, port, make_token("dave"))
            await wait_until(lambda: len(dave.seqs) == 3, within=10, what="dave's unread rows")
            newcomer = time.monotonic() - started
            stop.set()
            await poisoned
            for opened in (alice, carol, dave):
                assert not opened.closed.is_set()
                await opened.close()
    finally:
        await db.close()
    assert "reading one recipient's rows failed" in serve.output
    print(
        f"\nbob's delivery before: median {statistics.median(baseline) * 1000:.0f} ms, "
        f"max {max(baseline) * 1000:.0f} ms; while mallory's row failed her reads ({len(attempts)} "
        f"reconnections): median {statistics.median(during) * 1000:.0f} ms, max {max(during) * 1000:.0f} ms; "
        f"the 22-recipient row reached alice and carol in {fan_out * 1000:.0f} ms; "
        f"dave's 3 unread rows in {newcomer * 1000:.0f} ms"
    )

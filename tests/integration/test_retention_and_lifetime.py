"""Retention deletes old read rows and unread rows past the cap, one replica at a time; streams retire."""

from __future__ import annotations

import asyncio
import time

import asyncpg
from pgpush.db import Database
from pgpush.retention import RETENTION_LOCK_KEY, Retention

from tests.conftest import ServerFactory, make_token
from tests.sse_client import open_stream


def retention(db: Database, *, cap: int = 3, batch: int = 2) -> Retention:
    return Retention(db, days=30, max_unread_per_user=cap, interval=3600, batch_rows=batch)


async def test_old_read_rows_go_and_everything_else_stays(database_url: str, db: asyncpg.Connection) -> None:
    await db.execute(
        "INSERT INTO messages (recipient, data, created_at, read_at) "
        "SELECT 'alice', to_jsonb(n), now() - interval '40 days', "
        "       CASE WHEN n % 2 = 0 THEN now() - interval '35 days' END FROM generate_series(1, 10) n"
    )
    await db.execute(
        "INSERT INTO messages (recipient, data, read_at) SELECT 'alice', to_jsonb(n), now() "
        "FROM generate_series(11, 13) n"
    )
    pool = await Database.connect(database_url)
    try:
        result = await retention(pool, cap=100).run_once()
    finally:
        await pool.close()
    assert result is not None and result.old_read == 5 and result.over_cap == 0
    remaining = [r["data"] for r in await db.fetch("SELECT data::int FROM messages ORDER BY seq")]
    assert remaining == [1, 3, 5, 7, 9, 11, 12, 13]  # old unread rows and recent read rows stay


async def test_unread_rows_past_the_cap_go_oldest_first(database_url: str, db: asyncpg.Connection) -> None:
    await db.execute(
        "INSERT INTO messages (recipient, data) SELECT 'alice', to_jsonb(n) FROM generate_series(1, 8) n"
    )
    await db.execute(
        "INSERT INTO messages (recipient, data) SELECT 'bob', to_jsonb(n) FROM generate_series(1, 2) n"
    )
    pool = await Database.connect(database_url)
    try:
        result = await retention(pool, cap=3).run_once()
    finally:
        await pool.close()
    assert result is not None and result.over_cap == 5
    alice = [
        r[0] for r in await db.fetch("SELECT data::int FROM messages WHERE recipient = 'alice' ORDER BY seq")
    ]
    assert alice == [6, 7, 8]
    assert await db.fetchval("SELECT count(*) FROM messages WHERE recipient = 'bob'") == 2


async def test_only_one_replica_runs_retention_at_a_time(database_url: str, db: asyncpg.Connection) -> None:
    await db.execute("SELECT pg_advisory_lock($1)", RETENTION_LOCK_KEY)  # another replica is at it
    pool = await Database.connect(database_url)
    try:
        assert await retention(pool).run_once() is None
        await db.execute("SELECT pg_advisory_unlock($1)", RETENTION_LOCK_KEY)
        assert await retention(pool).run_once() is not None
    finally:
        await pool.close()


async def test_retention_does_not_block_inserts(database_url: str, db: asyncpg.Connection) -> None:
    await db.execute(
        "INSERT INTO messages (recipient, data, created_at, read_at) "
        "SELECT 'u' || (n % 50), '1', now() - interval '60 days', now() FROM generate_series(1, 20000) n"
    )
    pool = await Database.connect(database_url)
    try:
        # An insert that had to wait for a lock the sweep holds fails with lock_not_available.
        await db.execute("SET lock_timeout = '50ms'")
        sweep = asyncio.create_task(retention(pool, cap=10_000, batch=500).run_once())
        inserted = 0
        while not sweep.done():
            await db.execute("INSERT INTO messages (recipient, data) VALUES ('u1', '2')")
            inserted += 1
        result = await sweep
    finally:
        await pool.close()
    assert result is not None and result.old_read == 20000
    assert inserted > 0 and await db.fetchval("SELECT count(*) FROM messages WHERE data = '2'") == inserted


async def test_streams_retire_after_a_jittered_lifetime_and_resume(
    start_server: ServerFactory, db: asyncpg.Connection
) -> None:
    lifetime = 3.0
    server = await start_server(max_stream_seconds=lifetime, retry_ms=300, heartbeat_seconds=0.2)
    token = make_token("alice")
    # Measured from before the request to after the close: never shorter than the stream really lived.
    opened = time.monotonic()
    async with await open_stream(server.url, token) as stream:
        await db.execute("INSERT INTO messages (recipient, data) VALUES ('alice', '1')")
        [first] = await stream.messages(1)
        await asyncio.wait_for(stream.closed.wait(), 60)  # idle timeout and token expiry are far off
    lived = time.monotonic() - opened
    assert lived >= 0.8 * lifetime, f"the stream retired after {lived:.2f} s, before 80 % of {lifetime} s"
    assert 0 <= stream.retries[-1] <= 300
    assert server.metric("pgpush_streams_closed_total", reason="max_lifetime") == 1
    await db.execute("INSERT INTO messages (recipient, data) VALUES ('alice', '2')")
    async with await open_stream(server.url, token, last_event_id=first.last_event_id) as again:
        assert [e.data for e in await again.messages(1)] == ["2"]


async def test_a_token_that_expires_first_ends_the_stream_with_token_expired(
    start_server: ServerFactory,
) -> None:
    server = await start_server(max_stream_seconds=60)
    async with await open_stream(server.url, make_token("alice", ttl=1)) as stream:
        events = await stream.rest(timeout=30)
    assert [e.type for e in events] == ["token_expired"]

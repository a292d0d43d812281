"""What the server does on its own schedule, end to end: the listener's safety-net resync and retention.

Other tests call `resync()` or `run_once()` directly; these start a real server with short intervals and
only write to the table, so a timer that never fires fails them.
"""

from __future__ import annotations

import asyncpg
from pgpush import announcer

from tests.conftest import ServerFactory, make_token
from tests.polling import wait_until
from tests.sse_client import open_stream

OLD_READ_ROWS = (
    "INSERT INTO messages (recipient, data, created_at, read_at) "
    "SELECT 'alice', to_jsonb(n), now() - interval '40 days', now() - interval '35 days' "
    "FROM generate_series(1, 5) n"
)


async def test_the_safety_net_delivers_a_row_whose_notification_never_came(
    start_server: ServerFactory, db: asyncpg.Connection, database_url: str
) -> None:
    server = await start_server(safety_net_seconds=2)
    # The test wakes as the announcer would and never announces: a statement hands its recipients to
    # message_changes instead of notifying, so only a resync from the table can find its row.
    silent = await asyncpg.connect(database_url)
    try:
        assert await announcer.wake(silent)
        async with await open_stream(server.url, make_token("alice")) as stream:
            received = []
            # Twice: once the first row is in, the stream is past its first read, and no hint is pending
            # anywhere (none was sent), so only the timer's resync can bring the second.
            for n in (1, 2):
                await db.execute("INSERT INTO messages (recipient, data) VALUES ('alice', $1)", str(n))
                assert await db.fetchval("SELECT count(*) FROM message_changes") == n, "no NOTIFY was sent"
                received += await stream.messages(1, timeout=30)
    finally:
        await silent.close()
    assert [e.data for e in received] == ["1", "2"]


async def test_retention_runs_on_its_interval_without_being_asked(
    start_server: ServerFactory, db: asyncpg.Connection
) -> None:
    await start_server(retention_interval_seconds=0.5)
    for _ in range(2):  # twice: a schedule, not a single run at start-up
        await db.execute(OLD_READ_ROWS)
        await db.execute("INSERT INTO messages (recipient, data) VALUES ('alice', '\"kept\"')")

        async def old_rows_gone() -> bool:
            return bool(await db.fetchval("SELECT count(*) FROM messages WHERE read_at IS NOT NULL") == 0)

        await wait_until(old_rows_gone, interval=0.1, what="retention deleted the old read rows")
    assert await db.fetchval("SELECT count(*) FROM messages") == 2  # the unread rows stay

"""Advisory locks carry no privilege: any role that can connect may take the announcer's (migration 0003).

Holding "awake" made every writer hand its notification to an announcer that was not there (live delivery
stopped until the safety net); holding "handover" as well made every insert wait forever. Since 0004 a
writer hands over only when the elected announcer also says it is awake, and only tries locks.
"""

from __future__ import annotations

import asyncio

import asyncpg
from pgpush.announcer import AWAKE_LOCK_KEY, HANDOVER_LOCK_KEY

from tests.conftest import make_token
from tests.serve_process import ServerProcess
from tests.sse_client import open_stream

# An insert that waits on a lock waits for as long as the lock is held: this bound only ends the test.
INSERT_BOUND = 30


async def test_an_outsider_holding_the_announcer_locks_neither_stalls_writers_nor_delays_rows(
    service: ServerProcess, writer: asyncpg.Connection, outsider: asyncpg.Connection, db: asyncpg.Connection
) -> None:
    async with await open_stream(service.url, make_token("alice")) as alice:
        await writer.execute("INSERT INTO messages (recipient, event, data) VALUES ('alice', 'lead', '1')")
        await alice.messages(1, timeout=30)

        await outsider.execute("SELECT pg_advisory_lock($1)", AWAKE_LOCK_KEY)
        await writer.execute("INSERT INTO messages (recipient, event, data) VALUES ('alice', 'lead', '2')")
        [second] = await alice.messages(1, timeout=30)  # live: the safety net is minutes away
        assert second.data == "2"

        await outsider.execute("SELECT pg_advisory_lock($1)", HANDOVER_LOCK_KEY)
        await asyncio.wait_for(
            writer.execute("INSERT INTO messages (recipient, event, data) VALUES ('alice', 'lead', '3')"),
            INSERT_BOUND,
        )
        [third] = await alice.messages(1, timeout=30)
        assert third.data == "3"
    assert await db.fetchval("SELECT count(*) FROM message_changes") == 0  # nothing was handed over

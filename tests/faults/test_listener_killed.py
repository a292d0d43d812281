"""The LISTEN connection killed ten times under continuous writes: every row arrives once, in order.

protocol §2.2-3: notifications are hints, and after every reconnect each live stream re-reads from its cursor.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import asyncpg
import pytest

from tests.conftest import ServerFactory, make_token
from tests.faults.client import open_ledger_streams
from tests.faults.ledger import Ledger
from tests.faults.writers import committed, write_until
from tests.polling import wait_until

USERS = 20
STREAMS_PER_USER = 3
WRITERS = 6
KILLS = 10

LAST_ROWS = """
INSERT INTO messages (recipient, event, data) SELECT u, 'last', '"last"' FROM unnest($1::text[]) u ORDER BY u
RETURNING recipient, seq
"""
KILL_LISTENER = """
SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
WHERE application_name = 'pgpush-listener' AND datname = current_database()
"""


@pytest.mark.timeout(300)
async def test_the_listener_killed_repeatedly_under_writes_loses_nothing(
    start_server: ServerFactory, db: asyncpg.Connection, database_url: str
) -> None:
    server = await start_server(safety_net_seconds=3600)  # a safety-net resync would mask a missing one
    port = int(server.url.rsplit(":", 1)[1])
    users = [f"user{u}" for u in range(USERS)]
    ledger = Ledger()
    streams = await open_ledger_streams(port, users, STREAMS_PER_USER, ledger, make_token)
    await wait_until(lambda: server.stream_count == USERS * STREAMS_PER_USER)
    stop = asyncio.Event()
    writers = [
        asyncio.create_task(write_until(stop, database_url, users, ledger, writer=w)) for w in range(WRITERS)
    ]

    listener = server.app.state.listener

    async def kill() -> Callable[[], bool]:
        """Terminate the listening backend; returns "it is back on a new one"."""
        killed = listener.backend_pid
        assert await db.fetchval(KILL_LISTENER) == 1
        return lambda: bool(listener.connected and listener.backend_pid != killed)

    for _ in range(KILLS - 1):
        await asyncio.sleep(0.15)  # rows keep committing while the listener is up …
        await wait_until(await kill())  # … and while it is down
    await asyncio.sleep(0.15)
    stop.set()
    written = sum(await asyncio.gather(*writers))
    # The last kill comes after the writers stopped, and one more row per user commits while the listener is
    # down: no later write will mention these users, so only the resync after the reconnect delivers them.
    back = await kill()
    for row in await db.fetch(LAST_ROWS, users):
        ledger.record_sent(row["recipient"], row["seq"])
    await wait_until(back)

    await ledger.settle(within=120)
    for stream in streams:
        assert not stream.closed.is_set() and stream.violation is None
        await stream.close()
    assert sorted_seqs(ledger.sent) == await committed(database_url), "the writers' acks match the table"
    tally = ledger.assert_exact()
    print(f"\nlistener killed {KILLS} times: {tally}")
    assert tally.sent == written + USERS and written > 1000
    assert tally.received == tally.expected == tally.sent * STREAMS_PER_USER
    assert server.metric("pgpush_listener_reconnects_total") >= KILLS


def sorted_seqs(rows: dict[str, list[int]]) -> dict[str, list[int]]:
    return {user: sorted(seqs) for user, seqs in rows.items()}

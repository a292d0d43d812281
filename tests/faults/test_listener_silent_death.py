"""The LISTEN connection dies silently (no FIN, no reset) under writes: the probe notices, nothing is lost.

PGPUSH_LISTEN_DATABASE_URL points at a proxy the test controls; freezing it leaves the listener's socket
open and silent at both ends, as an expired NAT entry or a black-holing firewall would. Notifications for
rows committed meanwhile go into the void. The listener's NOTIFY round trip (every
PGPUSH_LISTENER_PROBE_SECONDS, answer within PGPUSH_LISTENER_PROBE_TIMEOUT_SECONDS) finds the connection
dead, the listener reconnects (through the proxy, which forwards new connections) and re-reads every live
stream from its cursor. The safety-net resync is set to an hour, so only that path can deliver the rows.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from tests.conftest import make_token
from tests.faults.blackhole import BlackholeProxy
from tests.faults.client import open_ledger_streams
from tests.faults.ledger import Ledger
from tests.faults.writers import committed, write_until
from tests.polling import wait_until
from tests.serve_process import ServerProcess

USERS = 10
STREAMS_PER_USER = 2
WRITERS = 3
PROBE_SECONDS = 1
# Long enough that the rows written right after the freeze surely commit before the listener can notice.
PROBE_TIMEOUT_SECONDS = 5
SETTINGS = {
    "listener_probe_seconds": PROBE_SECONDS,
    "listener_probe_timeout_seconds": PROBE_TIMEOUT_SECONDS,
    "safety_net_seconds": 3600,  # would mask a missing resync after the reconnect
    "reconnect_backoff_max_seconds": 0.5,
}
LAST_ROWS = """
INSERT INTO messages (recipient, event, data) SELECT u, 'last', '"last"' FROM unnest($1::text[]) u ORDER BY u
RETURNING recipient, seq
"""
LISTENER_SESSIONS = """
SELECT count(*) FROM pg_stat_activity
WHERE application_name = 'pgpush-listener' AND datname = current_database()
"""


@pytest.fixture
async def proxy(database_url: str) -> AsyncIterator[BlackholeProxy]:
    target = urlsplit(database_url)
    running = await BlackholeProxy(target.hostname or "127.0.0.1", target.port or 5432).start()
    yield running
    await running.close()


def through(proxy: BlackholeProxy, database_url: str) -> str:
    parts = urlsplit(database_url)
    auth = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=f"{auth}@127.0.0.1:{proxy.port}"))


@pytest.mark.timeout(120)
async def test_a_silently_dead_listen_connection_is_replaced_and_nothing_is_lost(
    proxy: BlackholeProxy, database_url: str, db: asyncpg.Connection
) -> None:
    server = ServerProcess(database_url, listen_database_url=through(proxy, database_url), **SETTINGS)
    try:
        await server.ready()
        users = [f"user{u}" for u in range(USERS)]
        ledger = Ledger()
        streams = await open_ledger_streams(server.port, users, STREAMS_PER_USER, ledger, make_token)
        await wait_until(
            lambda: _metric_is(server, "pgpush_streams", USERS * STREAMS_PER_USER), within=30, what="streams"
        )
        stop = asyncio.Event()
        writers = [
            asyncio.create_task(write_until(stop, database_url, users, ledger, writer=w))
            for w in range(WRITERS)
        ]
        await wait_until(lambda: bool(ledger.sent) and ledger.caught_up(), within=30, what="rows flow")
        await asyncio.sleep(0.5)  # rows keep committing and arriving while the listener is healthy …

        assert proxy.freeze() == 1, "the one open connection through the proxy is the listener's"
        frozen_at = time.monotonic()
        await asyncio.sleep(0.5)  # … and while its connection is silently dead
        stop.set()
        written = sum(await asyncio.gather(*writers))
        # One more row per user, and nothing mentions these users afterwards: only the resync after the
        # reconnect can deliver them (the safety net is an hour away).
        for row in await db.fetch(LAST_ROWS, users):
            ledger.record_sent(row["recipient"], row["seq"])
        assert await server.metric("pgpush_listener_probe_failures_total") == 0, (
            "the premise: these rows committed while the listener still held the dead connection"
        )

        await wait_until(
            lambda: _metric_is(server, "pgpush_listener_reconnects_total", 1),
            within=60,
            what="the listener reconnected",
        )
        await ledger.settle(within=30)
        resumed = time.monotonic() - frozen_at
        for stream in streams:
            assert not stream.closed.is_set() and stream.violation is None
            await stream.close()
        assert await server.metric("pgpush_listener_probe_failures_total") >= 1, "the probe noticed"
        # No reset ever reached Postgres: it still holds the old session next to the new one.
        assert await db.fetchval(LISTENER_SESSIONS) == 2
    finally:
        await server.stop()

    assert {user: sorted(seqs) for user, seqs in ledger.sent.items()} == await committed(database_url)
    tally = ledger.assert_exact()
    print(
        f"\nsilent LISTEN death: {tally}; caught up {resumed:.1f}s after the freeze "
        f"(probe every {PROBE_SECONDS}s, timeout {PROBE_TIMEOUT_SECONDS}s)"
    )
    assert tally.sent == written + USERS and written > 0
    assert tally.received == tally.expected == tally.sent * STREAMS_PER_USER


async def _metric_is(server: ServerProcess, name: str, at_least: float) -> bool:
    return await server.metric(name) >= at_least

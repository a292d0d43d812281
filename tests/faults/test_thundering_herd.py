"""1,000 clients reconnecting at the same moment (a deploy just ended): every one is served its replay and
then live rows."""

from __future__ import annotations

import asyncio
import resource

import asyncpg
import pytest

from tests.conftest import ServerFactory, make_token
from tests.faults.ledger import Ledger
from tests.polling import wait_until
from tests.sse_client import SSEStream

CLIENTS = 1000
USERS = 250
MISSED = 2  # rows each user got while its clients were away


@pytest.fixture
def many_files() -> None:
    """Both ends of 1,000 sockets live in this process: raise the soft fd limit as far as allowed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4 * CLIENTS + 1024
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 2 * CLIENTS + 256:
        pytest.fail(f"the fd limit ({hard}) is too low for {CLIENTS} streams")


@pytest.mark.timeout(90)
@pytest.mark.usefixtures("many_files")
async def test_a_thousand_clients_reconnecting_at_once_all_get_their_replay_then_live_rows(
    start_server: ServerFactory, db: asyncpg.Connection
) -> None:
    server = await start_server(max_streams_per_user=CLIENTS // USERS, max_streams=CLIENTS)
    port = int(server.url.rsplit(":", 1)[1])
    users = [f"user{u:03d}" for u in range(USERS)]
    ledger = Ledger()
    insert = (
        "INSERT INTO messages (recipient, event, data) "
        "SELECT u, 'herd', to_jsonb(n) FROM unnest($1::text[]) u, generate_series(1, $2) n ORDER BY u, n "
        "RETURNING recipient, seq"
    )
    seen = {row["recipient"]: row["seq"] for row in await db.fetch(insert, users, 1)}  # before the deploy
    for row in await db.fetch(insert, users, MISSED):  # while the clients were away
        ledger.record_sent(row["recipient"], row["seq"])
    tokens = {user: make_token(user) for user in users}
    logs = [
        ledger.client(f"{users[c % USERS]}/{c}", users[c % USERS], seen[users[c % USERS]])
        for c in range(CLIENTS)
    ]

    streams = await asyncio.gather(
        *(
            SSEStream.open(
                "127.0.0.1", port, tokens[log.user], last_event_id=log.after, seqs=log.seqs, within=60
            )
            for log in logs
        ),
        return_exceptions=True,
    )
    try:
        failures = [s for s in streams if not isinstance(s, SSEStream) or s.status != 200]
        assert not failures, f"{len(failures)} of {CLIENTS} were not served, e.g. {failures[:3]}"
        await wait_until(lambda: all(len(log.seqs) >= MISSED for log in logs), within=30, what="every replay")
        replayed = sum(len(log.seqs) for log in logs)
        for row in await db.fetch(insert, users, 1):  # one live row each, after every stream is registered
            ledger.record_sent(row["recipient"], row["seq"])
        await ledger.settle(within=30)
        assert server.stream_count == CLIENTS
    finally:
        await asyncio.gather(*(s.close() for s in streams if isinstance(s, SSEStream)))
    tally = ledger.assert_exact()
    print(f"\nthundering herd: {tally}")
    assert replayed == CLIENTS * MISSED
    assert tally.received == CLIENTS * (MISSED + 1)
    await wait_until(lambda: server.stream_count == 0)

"""SIGTERM under heavy streaming, then a restart on the same port (protocol §3 "the server shuts down").

Every stream gets its own jittered `retry:` and is closed within the drain timeout, the process exits 0,
and the clients, honouring their retry, resume from their Last-Event-ID with nothing lost or duplicated.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from pgpush.cli import GRACEFUL_SHUTDOWN_SECONDS

from tests.conftest import make_token
from tests.faults.client import ResumingClient
from tests.faults.ledger import Ledger
from tests.faults.writers import committed, write_until
from tests.polling import wait_until
from tests.serve_process import HOST, ServerProcess

USERS = 25
CLIENTS_PER_USER = 2
WRITERS = 3
JITTER_MS = 2000
RETRY_MS = 3000


@pytest.mark.timeout(90)
async def test_sigterm_drains_every_stream_with_a_jittered_retry_and_clients_resume_after_a_restart(
    database_url: str,
) -> None:
    first = ServerProcess(database_url, shutdown_jitter_ms=JITTER_MS, retry_ms=RETRY_MS, log_level="warning")
    second: ServerProcess | None = None
    users = [f"user{u}" for u in range(USERS)]
    ledger = Ledger()
    clients = [
        ResumingClient(
            HOST, first.port, make_token(user), ledger.client(f"{user}/{c}", user).seqs, cursor=0, max_delay=3
        )
        for user in users
        for c in range(CLIENTS_PER_USER)
    ]
    stop_clients, stop_writers = asyncio.Event(), asyncio.Event()
    runners: list[asyncio.Task[None]] = []
    writers: list[asyncio.Task[int]] = []
    try:
        await first.ready()
        runners = [asyncio.create_task(client.run(stop_clients)) for client in clients]
        await wait_until(lambda: all(c.current for c in clients), what="all clients connected")
        writers = [
            asyncio.create_task(write_until(stop_writers, database_url, users, ledger, writer=w))
            for w in range(WRITERS)
        ]
        await asyncio.sleep(1)
        before = [len(c.seqs) for c in clients]
        assert all(before), "every client is receiving rows when SIGTERM comes"

        signalled = time.monotonic()
        first.terminate()
        assert await first.wait() == 0
        exited = time.monotonic() - signalled
        # A client only reconnects after its retry, so the first connection of each is the drained one.
        drained = [c.connections[0] for c in clients]
        second = ServerProcess(
            database_url,
            port=first.port,
            shutdown_jitter_ms=JITTER_MS,
            retry_ms=RETRY_MS,
            log_level="warning",
        )
        await second.ready()
        await wait_until(
            lambda: all(len(c.connections) >= 2 and c.current for c in clients),
            within=20,
            what="every client reconnected to the new process",
        )
        await asyncio.sleep(0.5)  # live rows through the new process too
        stop_writers.set()
        written = sum(await asyncio.gather(*writers))
        await ledger.settle(within=20)
    finally:
        stop_writers.set()
        stop_clients.set()
        await asyncio.gather(*runners, return_exceptions=True)
        for task in writers:
            task.cancel()
        await first.stop()
        if second is not None:
            assert await second.stop() == 0

    for stream in drained:
        assert stream.closed_at is not None and stream.violation is None
        assert stream.closed_at - signalled < GRACEFUL_SHUTDOWN_SECONDS, "closed within the drain timeout"
        assert stream.retries[0] == RETRY_MS, "the stream began with the normal retry"
        assert len(stream.retries) == 2 and 0 <= stream.retries[-1] <= JITTER_MS, stream.retries
    jitter = [stream.retries[-1] for stream in drained]
    assert len(set(jitter)) > len(jitter) // 2, f"the retries are spread: {sorted(jitter)}"
    assert {user: sorted(seqs) for user, seqs in ledger.sent.items()} == await committed(database_url)
    tally = ledger.assert_exact()
    closed = max(stream.closed_at - signalled for stream in drained if stream.closed_at is not None)
    print(
        f"\nSIGTERM + restart: {tally}; all streams closed {closed:.2f}s and the process gone {exited:.2f}s "
        f"after SIGTERM; retries {min(jitter)}…{max(jitter)} ms"
    )
    assert tally.received == tally.expected == written * CLIENTS_PER_USER
    for client in clients:  # a quick reconnect may still reach the draining process: it refuses with 503
        assert client.statuses[0] == client.statuses[-1] == 200 and set(client.statuses) <= {200, 503}

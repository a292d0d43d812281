"""Postgres stopped and started again under streams and retrying writers: the streams stay open and catch up.

/readyz?strict=true turns 503 and back to 200 by itself while /readyz stays 200 (the process accepts streams
all along), every stream stays open, and every committed row arrives once.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from pgpush.embedded import EmbeddedPostgres
from pgpush.migrate import migrate

from tests.conftest import RunningServer, make_token, settings_for, with_database
from tests.faults.client import open_ledger_streams, wait_until
from tests.faults.ledger import Ledger
from tests.faults.writers import committed, write_until

USERS = 10
STREAMS_PER_USER = 2
WRITERS = 3  # per half of the users


@pytest.fixture
async def own_cluster() -> AsyncIterator[tuple[EmbeddedPostgres, str]]:
    """A Postgres of this test alone, since the test stops it.

    Not under tmp_path: another pytest session starting meanwhile chmods /tmp/pytest-of-<user> back to 0700,
    and the server user (we may be root) could then no longer reach the data folder.
    """
    with tempfile.TemporaryDirectory(prefix="pgpush-restart-") as tmp:
        cluster = EmbeddedPostgres(Path(tmp) / "pg", durable=False)
        url = await asyncio.to_thread(cluster.start)
        try:
            conn = await asyncpg.connect(url)
            await conn.execute("CREATE DATABASE restart")
            await conn.close()
            database_url = with_database(url, "restart")
            await asyncio.to_thread(migrate, database_url)
            yield cluster, database_url
        finally:
            await asyncio.to_thread(cluster.stop, "immediate")


async def watch_readyz(url: str, stop: asyncio.Event, statuses: list[int], *, strict: bool) -> None:
    """Record each change of /readyz's status (with ?strict=true when `strict`), polling every 50 ms."""
    params = {"strict": "true"} if strict else {}
    async with httpx.AsyncClient(base_url=url, timeout=5) as client:
        while not stop.is_set():
            try:
                status = (await client.get("/readyz", params=params)).status_code
            except httpx.TransportError:
                status = 0  # the server itself did not answer: recorded, and the test fails on it
            if not statuses or statuses[-1] != status:
                statuses.append(status)
            await asyncio.sleep(0.05)


@pytest.mark.timeout(90)
async def test_a_postgres_restart_under_writers_and_streams_loses_nothing(
    own_cluster: tuple[EmbeddedPostgres, str],
) -> None:
    cluster, database_url = own_cluster
    server = await asyncio.to_thread(RunningServer(settings_for(database_url)).start)
    stop, stop_last, stop_watch = asyncio.Event(), asyncio.Event(), asyncio.Event()
    statuses: list[int] = []  # /readyz?strict=true, what monitors watch
    probed: list[int] = []  # /readyz, what Kubernetes probes
    tasks: list[asyncio.Task[int]] = []
    try:
        await server.wait_for(lambda: server.listener_connected)
        port = int(server.url.rsplit(":", 1)[1])
        users = [f"user{u}" for u in range(USERS)]
        ledger = Ledger()
        streams = await open_ledger_streams(port, users, STREAMS_PER_USER, ledger, make_token)
        await server.wait_for(lambda: server.stream_count == USERS * STREAMS_PER_USER)
        watchers = [
            asyncio.create_task(watch_readyz(server.url, stop_watch, statuses, strict=True)),
            asyncio.create_task(watch_readyz(server.url, stop_watch, probed, strict=False)),
        ]
        # Half the users get rows all along; the other half's writers are told to stop during the outage, so
        # their last rows commit as Postgres comes back (before the listener does) and nothing mentions those
        # users again: only the resync after the listener's reconnect delivers them.
        steady, last = users[: USERS // 2], users[USERS // 2 :]
        tasks = [
            asyncio.create_task(write_until(stop, database_url, steady, ledger, writer=w, pause=0.005))
            for w in range(WRITERS)
        ]
        tasks += [
            asyncio.create_task(write_until(stop_last, database_url, last, ledger, writer=w, pause=0.005))
            for w in range(WRITERS, 2 * WRITERS)
        ]
        await asyncio.sleep(0.7)
        before_outage = sum(len(seqs) for seqs in ledger.sent.values())

        await asyncio.to_thread(cluster.stop, "fast")
        await wait_until(lambda: statuses[-1] == 503, within=10, what="/readyz?strict=true says 503")
        await asyncio.sleep(1)  # the writers keep retrying against a stopped database
        stop_last.set()
        during_outage = sum(len(seqs) for seqs in ledger.sent.values())
        await asyncio.to_thread(cluster.start)
        await wait_until(lambda: statuses[-1] == 200, within=15, what="strict readiness is back by itself")
        await asyncio.sleep(0.7)
        stop.set()
        written = sum(await asyncio.gather(*tasks))
        stop_watch.set()
        await asyncio.gather(*watchers)

        await ledger.settle(within=20)  # under the 30 s safety-net resync, which would mask a missing one
        for stream in streams:
            assert not stream.closed.is_set(), "a stream stays open while Postgres is away"
            assert stream.violation is None
            await stream.close()
    finally:
        stop.set()
        stop_last.set()
        stop_watch.set()
        for task in tasks:
            task.cancel()
        await asyncio.to_thread(server.stop)

    assert statuses == [200, 503, 200]
    assert probed == [200], "the pod accepted streams all along: Kubernetes must keep routing to it"
    assert {user: sorted(seqs) for user, seqs in ledger.sent.items()} == await committed(database_url)
    tally = ledger.assert_exact()
    print(f"\npostgres restart: {tally}")
    assert before_outage > 0 and written > during_outage + WRITERS, (
        "rows were written before and after the outage"
    )
    assert tally.received == tally.expected == written * STREAMS_PER_USER
    assert all(ledger.sent[user] for user in users)

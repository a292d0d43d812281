"""Three `pgpush serve` replicas on one database behind nginx, no sticky sessions (docs/protocol.md §7).

300 EventSource-like clients connect through nginx, which spreads them round-robin over the replicas. Rows
written with plain SQL reach each client exactly once whichever replica holds it; a replica killed with
SIGKILL mid-stream sends its clients, with their Last-Event-ID, through nginx to the others; a rolling
restart under load (SIGTERM, start again on the same port, wait for /readyz, next) loses and duplicates
nothing. The ledger counts every row sent and every event received.

It runs twice: with writers notifying for themselves (the default), and with batched notifications on,
where the replica killed is the announcer while it is awake, holding the writers' notifications.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import make_token
from tests.faults.client import ResumingClient
from tests.faults.ledger import Ledger
from tests.faults.writers import committed, write_until
from tests.polling import wait_until
from tests.scale.nginx import Nginx, find_nginx
from tests.serve_process import HOST, ServerProcess, free_port

REPLICAS = 3
USERS = 150
CLIENTS_PER_USER = 2  # 300 clients; a user's two streams usually land on different replicas
ROWS_PER_USER = 4  # the first, quiet round: SQL inserts for everyone
WRITERS = 3
JITTER_MS = 500  # PGPUSH_SHUTDOWN_JITTER_MS: the drained clients come back within half a second
CLIENT_MAX_DELAY = 1.0  # the clients' own cap on `retry:` (3 s by default), to keep the test short
SETTINGS = {"host": HOST, "shutdown_jitter_ms": JITTER_MS, "log_level": "warning"}
# The writers' few hundred statements per second keep a replica's announcer awake at this threshold.
BATCHED = {"notify_batch_above": 50}


@pytest.fixture
def nginx_binary() -> str:
    binary = find_nginx()
    if binary is None:
        install = "apt-get install -y nginx-light"
        if os.environ.get("PGPUSH_REQUIRE_NGINX"):
            pytest.fail(f"PGPUSH_REQUIRE_NGINX is set but there is no nginx binary ({install})")
        pytest.skip(f"no nginx binary ({install}; PGPUSH_REQUIRE_NGINX=1 turns this skip into a failure)")
    return binary


class Cluster:
    """The replicas (by slot: a restarted one takes its slot and port) and the nginx in front of them."""

    def __init__(
        self, database_url: str, nginx_binary: str, prefix: Path, settings: dict[str, object]
    ) -> None:
        self.database_url = database_url
        self.settings = settings
        self.ports = [free_port() for _ in range(REPLICAS)]
        self.replicas = [self._spawn(port) for port in self.ports]
        self.retired: list[ServerProcess] = []
        self.nginx = Nginx(nginx_binary, prefix, free_port(), self.ports)

    def _spawn(self, port: int) -> ServerProcess:
        return ServerProcess(self.database_url, port=port, **self.settings)

    async def ready(self) -> None:
        await asyncio.gather(self.nginx.ready(), *(replica.ready() for replica in self.replicas))

    async def streams(self) -> list[int]:
        """Each replica's `pgpush_streams` gauge, read from the replica itself (not through nginx)."""
        return [int(await replica.metric("pgpush_streams")) for replica in self.replicas]

    async def kill(self, slot: int) -> None:
        """SIGKILL: no drain, no goodbye; the kernel resets its connections."""
        replica = self.replicas[slot]
        replica.process.kill()
        await replica.wait()

    async def restart(self, slot: int) -> None:
        """SIGTERM (it must drain and exit 0, unless already dead), then a new process on the same port."""
        old = self.replicas[slot]
        if old.process.poll() is None:
            assert await old.stop() == 0, old.output
        self.retired.append(old)
        self.replicas[slot] = self._spawn(self.ports[slot])
        await self.replicas[slot].ready()

    async def stop(self) -> None:
        await self.nginx.stop()
        for replica in self.replicas:
            await replica.stop()

    async def awake_announcer(self) -> int | None:
        """The slot of the replica whose announcer is batching, if one is."""
        for slot, replica in enumerate(self.replicas):
            if await replica.metric("pgpush_announcer_awake") == 1:
                return slot
        return None


@pytest.fixture(params=[False, True], ids=["writers-notify", "batched"])
def batched(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture
async def cluster(
    database_url: str, nginx_binary: str, tmp_path: Path, batched: bool
) -> AsyncIterator[Cluster]:
    running = Cluster(database_url, nginx_binary, tmp_path, {**SETTINGS, **(BATCHED if batched else {})})
    try:
        await running.ready()
        yield running
    finally:
        await running.stop()


@pytest.mark.timeout(90)
async def test_three_replicas_behind_nginx_deliver_each_row_once_through_a_kill_and_a_rolling_restart(
    cluster: Cluster, database_url: str, db: asyncpg.Connection, batched: bool
) -> None:
    users = [f"user{u:03d}" for u in range(USERS)]
    ledger = Ledger()
    clients = [
        ResumingClient(
            HOST,
            cluster.nginx.port,
            make_token(user),
            ledger.client(f"{user}/{c}", user).seqs,
            cursor=0,
            max_delay=CLIENT_MAX_DELAY,
        )
        for user in users
        for c in range(CLIENTS_PER_USER)
    ]
    everyone = len(clients)
    stop_clients, stop_writers = asyncio.Event(), asyncio.Event()
    runners = [asyncio.create_task(client.run(stop_clients)) for client in clients]
    writers: list[asyncio.Task[int]] = []

    async def all_held() -> bool:
        return sum(await cluster.streams()) == everyone and all(c.current for c in clients)

    try:
        # 1. Spread over the replicas; rows written with SQL reach every client of their user, once.
        await wait_until(all_held, what="every client holds a stream")
        spread = await cluster.streams()
        assert all(held >= everyone // REPLICAS // 2 for held in spread), f"round-robin spread: {spread}"
        rows = await db.fetch(
            "INSERT INTO messages (recipient, data) "
            "SELECT u, jsonb_build_object('to', u, 'n', n) "
            "FROM unnest($1::text[]) AS u, generate_series(1, $2) AS n ORDER BY u "
            "RETURNING recipient, seq",
            users,
            ROWS_PER_USER,
        )
        for row in rows:
            ledger.record_sent(row["recipient"], row["seq"])
        await wait_until(ledger.caught_up, what="every client got the SQL rows")
        assert ledger.assert_exact().received == USERS * ROWS_PER_USER * CLIENTS_PER_USER

        # 2. SIGKILL one replica while writers run: exactly its clients come back, through nginx, elsewhere.
        writers = [
            asyncio.create_task(write_until(stop_writers, database_url, users, ledger, writer=w))
            for w in range(WRITERS)
        ]
        await asyncio.sleep(1)
        victim = 0
        if batched:
            awake: list[int] = []

            async def announcing() -> bool:
                slot = await cluster.awake_announcer()
                awake[:] = [] if slot is None else [slot]
                return bool(awake)

            await wait_until(announcing, what="a replica's announcer batches the writers' notifications")
            victim = awake[0]
        doomed = (await cluster.streams())[victim]
        before = [len(c.connections) for c in clients]
        await cluster.kill(victim)
        survivors = [r for slot, r in enumerate(cluster.replicas) if slot != victim]

        async def moved() -> bool:
            held = [int(await r.metric("pgpush_streams")) for r in survivors]
            return sum(held) == everyone and all(c.current for c in clients)

        await wait_until(moved, what="the killed replica's clients are held by the survivors")
        cut = sum(len(c.connections) > n for c, n in zip(clients, before, strict=True))
        assert cut == doomed, f"{doomed} streams were on the killed replica, {cut} clients reconnected"
        await asyncio.sleep(0.5)  # live rows through two replicas

        # 3. Bring the killed one back, then a rolling restart of all three, writers still running.
        await cluster.restart(victim)
        for slot in range(REPLICAS):
            await cluster.restart(slot)
            await wait_until(all_held, what=f"every client held again after restarting replica {slot}")
        await asyncio.sleep(0.5)
        stop_writers.set()
        written = sum(await asyncio.gather(*writers))
        await wait_until(ledger.caught_up, what="every client caught up after the restarts")
        await asyncio.sleep(0.3)  # a duplicate would arrive now
    finally:
        stop_writers.set()
        stop_clients.set()
        await asyncio.gather(*runners, *writers, return_exceptions=True)

    assert {user: sorted(seqs) for user, seqs in ledger.sent.items()} == await committed(database_url)
    tally = ledger.assert_exact()
    reconnects = sum(len(c.connections) - 1 for c in clients)
    print(
        f"\n{REPLICAS} replicas behind nginx{', batched' if batched else ''}, {everyone} clients: {tally}; "
        f"{written} rows from the writers; "
        f"spread {spread}; {doomed} clients moved off the killed replica; {reconnects} reconnections"
    )
    assert tally.received == tally.expected == (USERS * ROWS_PER_USER + written) * CLIENTS_PER_USER
    for client in clients:
        assert all(stream.violation is None for stream in client.connections)
        assert set(client.statuses) <= {200, 502, 503}, client.statuses
    assert "[emerg]" not in cluster.nginx.errors

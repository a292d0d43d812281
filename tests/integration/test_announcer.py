"""The batching announcer (migration 0003, service/announcer.py): writers hand over, nothing is stranded.

The property that matters: every committed statement's recipients are named in some notification on the
`pgpush` channel, whether the statement notified for itself or handed over, however the announcer wakes
and sleeps around it. Each test listens on the channel the way a replica does and checks that.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest
from pgpush import announcer
from pgpush.db import CHANNEL_QUERY
from pgpush.hints import parse_hint

from tests.conftest import ServerFactory, make_token
from tests.polling import wait_until
from tests.sse_client import open_stream


class Heard:
    """Every recipient named on the channel, as a replica's listener would take them in."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.everyone = False
        self.notifications = 0
        self.changed = asyncio.Event()

    def __call__(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self.notifications += 1
        hint = parse_hint(payload)
        if hint.recipients is None:
            self.everyone = True
        else:
            self.names.update(hint.recipients)
        self.names.update(row.recipient for row in hint.rows)
        self.changed.set()

    async def until_named(self, recipients: set[str], timeout: float = 30) -> None:
        async with asyncio.timeout(timeout):
            while not recipients <= self.names:
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture
async def heard(database_url: str) -> AsyncIterator[Heard]:
    conn = await asyncpg.connect(database_url)
    ledger = Heard()
    await conn.add_listener(await conn.fetchval(CHANNEL_QUERY), ledger)
    yield ledger
    await conn.close()


@pytest.fixture
async def announcer_conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


async def insert(conn: asyncpg.Connection, recipient: str) -> None:
    await conn.execute("INSERT INTO messages (recipient, data) VALUES ($1, '{}')", recipient)


async def wait_until_blocked_on_a_lock(db: asyncpg.Connection, conn: asyncpg.Connection) -> None:
    """Until `conn`'s backend is seen waiting for a lock (the announcer queued behind writers)."""
    pid = conn.get_server_pid()

    async def blocked() -> bool:
        state = await db.fetchval("SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1", pid)
        return bool(state == "Lock")

    await wait_until(blocked, interval=0.005, what="the announcer waits for a lock")


async def test_while_awake_a_statement_hands_over_and_the_announce_names_it(
    db: asyncpg.Connection, announcer_conn: asyncpg.Connection, heard: Heard
) -> None:
    assert await announcer.wake(announcer_conn)
    await insert(db, "alice")
    await db.execute("INSERT INTO messages (recipient, data) VALUES ('bob', '1'), ('carol', '2')")
    assert await db.fetchval("SELECT count(*) FROM message_changes") == 2

    assert await announcer.announce(announcer_conn) == 2
    await heard.until_named({"alice", "bob", "carol"})
    assert heard.notifications == 1  # one batch, not one per statement
    assert await db.fetchval("SELECT count(*) FROM message_changes") == 0


async def test_asleep_a_statement_notifies_for_itself_with_its_rows(
    db: asyncpg.Connection, heard: Heard
) -> None:
    await insert(db, "alice")
    await heard.until_named({"alice"})
    assert await db.fetchval("SELECT count(*) FROM message_changes") == 0


async def test_a_batch_past_the_payload_limit_is_split_and_names_everyone(
    db: asyncpg.Connection, announcer_conn: asyncpg.Connection, heard: Heard
) -> None:
    recipients = [f"user-with-a-long-name-{i:05d}" for i in range(1000)]  # ~29 KB of names
    assert await announcer.wake(announcer_conn)
    await db.execute(
        "INSERT INTO messages (recipient, data) SELECT r, '{}' FROM unnest($1::text[]) AS r ORDER BY r",
        recipients,
    )
    assert await announcer.announce(announcer_conn) == 1
    await heard.until_named(set(recipients))
    assert heard.notifications >= 4
    assert not heard.everyone


async def test_falling_asleep_waits_for_a_writer_that_saw_it_awake(
    database_url: str, db: asyncpg.Connection, announcer_conn: asyncpg.Connection, heard: Heard
) -> None:
    slow = await asyncpg.connect(database_url)
    try:
        assert await announcer.wake(announcer_conn)
        slow_tx = slow.transaction()
        await slow_tx.start()
        await insert(slow, "slow")  # handed over, not yet committed

        await announcer.fall_asleep(announcer_conn)
        settling = asyncio.create_task(announcer.settle(announcer_conn, announcer.announce))
        # Meanwhile the others are not held up: asleep, a new statement notifies for itself.
        await insert(db, "quick")
        await heard.until_named({"quick"})
        await wait_until_blocked_on_a_lock(db, announcer_conn)  # settling, it waits for the slow writer
        assert not settling.done(), "settled while a statement that saw the announcer awake was open"

        await slow_tx.commit()
        await settling  # its announcement is sent; the listening connection hears it a moment later
        await heard.until_named({"slow"})
        assert await db.fetchval("SELECT count(*) FROM message_changes") == 0
    finally:
        await slow.close()


async def test_a_wake_that_times_out_leaves_nothing_stranded(
    database_url: str,
    db: asyncpg.Connection,
    announcer_conn: asyncpg.Connection,
    heard: Heard,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The announcer's lock wait, long enough that the write below surely lands while it waits.
    monkeypatch.setattr(announcer, "LOCK_WAIT_MS", 5000)
    direct = await asyncpg.connect(database_url)
    try:
        open_tx = direct.transaction()
        await open_tx.start()
        await insert(direct, "open")  # asleep: it holds its share of "awake" until it ends

        waking = asyncio.create_task(announcer.wake(announcer_conn))
        await wait_until_blocked_on_a_lock(db, announcer_conn)
        # The waiting announcer holds no lock and has not said it is awake (migration 0004): this write
        # notifies for itself instead of handing over to an announcer that may never come.
        await insert(db, "during")
        assert not waking.done(), "the wake gave up before the write: the waiting case was not exercised"
        assert await db.fetchval("SELECT count(*) FROM message_changes") == 0, "the write handed over"
        await heard.until_named({"during"})
        assert not await waking
        await announcer.settle(announcer_conn, announcer.announce)

        await open_tx.commit()
        await heard.until_named({"open"})
    finally:
        await direct.close()


async def test_no_hint_is_stranded_while_the_announcer_flips_between_awake_and_asleep(
    database_url: str, announcer_conn: asyncpg.Connection, heard: Heard
) -> None:
    """Writers in both isolation levels, some holding their transaction open, against rapid flips."""
    written: set[str] = set()
    stop = asyncio.Event()
    announced = 0

    async def writer(number: int) -> None:
        conn = await asyncpg.connect(database_url)
        isolation = "repeatable_read" if number % 2 else "read_committed"
        rng = random.Random(number)
        try:
            i = 0
            while not stop.is_set():
                recipient = f"w{number}-{i}"
                async with conn.transaction(isolation=isolation):
                    await insert(conn, recipient)
                    if rng.random() < 0.2:
                        await asyncio.sleep(rng.uniform(0, 0.02))
                written.add(recipient)
                i += 1
        finally:
            await conn.close()

    async def count_announce(conn: asyncpg.Connection) -> int:
        nonlocal announced
        n = await announcer.announce(conn)
        announced += n
        return n

    writers = [asyncio.create_task(writer(n)) for n in range(6)]
    try:
        rng = random.Random(0)
        for _ in range(40):
            if await announcer.wake(announcer_conn):
                for _ in range(rng.randint(0, 3)):
                    await count_announce(announcer_conn)
                    await asyncio.sleep(0.005)
                await announcer.fall_asleep(announcer_conn)
            await announcer.settle(announcer_conn, count_announce)
            await asyncio.sleep(rng.uniform(0, 0.02))
    finally:
        stop.set()
        await asyncio.gather(*writers)

    assert announced > 0, "no statement was handed over: the test did not exercise the handover"
    assert len(written) > announced, "no statement notified for itself"
    assert not heard.everyone
    await heard.until_named(written)


async def test_the_service_batches_a_busy_stream_and_delivers_everything_once_in_order(
    start_server: ServerFactory, db: asyncpg.Connection
) -> None:
    server = await start_server(notify_batch_above=20, notify_batch_interval_ms=5)
    app_announcer: announcer.Announcer = server.app.state.announcer
    await wait_until(lambda: app_announcer.elected)
    async with await open_stream(server.url, make_token("alice")) as stream:
        await wait_until(lambda: stream.retries != [])
        for _ in range(400):  # about 150 statements/s for over two seconds: well past 20/s
            await insert(db, "alice")
            await asyncio.sleep(0.005)
        events = await stream.messages(400, timeout=20)
        assert await stream.quiet(0.5) == [], "an event was delivered twice"
    seqs = [event.seq for event in events]
    assert seqs == sorted(set(seqs))
    async with httpx.AsyncClient(base_url=server.url) as client:
        metrics = (await client.get("/metrics")).text
    [announced] = [
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("pgpush_statements_announced_total ")
    ]
    assert announced > 0, "the announcer never batched"


async def test_one_announcer_at_a_time_and_a_standby_announces_what_was_left(
    database_url: str, db: asyncpg.Connection, heard: Heard
) -> None:
    def quiet_announcer() -> announcer.Announcer:
        return announcer.Announcer(
            database_url, heard=lambda: 0, batch_above=1000, interval=0.005, backoff_max=0.2
        )

    first, standby = quiet_announcer(), quiet_announcer()
    first.start()
    await wait_until(lambda: first.elected)
    standby.start()
    try:
        # A statement handed over to an announcer whose session then died: nobody announced it.
        dying = await asyncpg.connect(database_url)
        assert await announcer.wake(dying)
        await insert(db, "left-behind")
        await dying.close()
        assert "left-behind" not in heard.names
        assert not standby.elected

        await first.stop()
        await wait_until(lambda: standby.elected)
        await heard.until_named({"left-behind"})
    finally:
        await first.stop()
        await standby.stop()


async def test_ending_a_previous_session_ends_that_one_and_not_a_reused_pid(database_url: str) -> None:
    """A session cut off without a reset may live on in the server, holding "awake" for nobody."""
    previous, bystander, admin = [await asyncpg.connect(database_url) for _ in range(3)]
    try:
        assert await announcer.wake(previous)
        session = await previous.fetchrow(announcer.THIS_SESSION)
        # The bystander's pid with another start time: what a pid since reused looks like. Left alone.
        reused = await bystander.fetchrow(
            "SELECT pid, backend_start - interval '1 second' AS backend_start "
            "FROM pg_stat_activity WHERE pid = pg_backend_pid()"
        )
        await announcer.end_session(admin, reused)
        assert await bystander.fetchval("SELECT 1") == 1

        await announcer.end_session(admin, session)
        alive = "SELECT count(*) FROM pg_stat_activity WHERE pid = $1"

        async def ended() -> bool:
            return not await admin.fetchval(alive, session["pid"])

        await wait_until(ended, what="the ended session is gone")
        assert await announcer.wake(admin), '"awake" was still held by the ended session'
    finally:
        for conn in (previous, bystander, admin):
            conn.terminate()

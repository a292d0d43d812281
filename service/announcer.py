"""While writes are fast, one replica notifies for them in batches, so writers skip the NOTIFY lock.

Every notifying commit holds Postgres' cluster-wide NOTIFY lock through its WAL flush and the signalling of
every listener, so notifying commits queue behind each other (docs/scaling.md). Migration 0003 lets a
statement hand its recipients to `message_changes` instead while an announcer holds the "awake" lock; the
announcer then sends one notification per batch (`pgpush_announce()`), a few hundred notifying commits per
second whatever the write rate.

One replica at a time is the announcer: the others wait on a session advisory lock, idle, on a connection
of their own. The announcer is asleep (it holds nothing but that lock and runs no query) until the
notifications its replica hears pass `batch_above` per second. It then takes "awake" and announces every
`interval`, until the statements it announces fall below half that rate. Going back to sleep, it waits
for every writer that saw it awake before its last read (migration 0003 explains the handover), so no
statement's hint is stranded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import asyncpg

from .background import BackgroundTask
from .db import APPLICATION_NAME, server_settings

log = logging.getLogger("pgpush.announcer")

# Advisory lock keys; migration 0003 holds the same two numbers for writers.
ANNOUNCER_LOCK_KEY = 0x70677075736805
AWAKE_LOCK_KEY = 0x70677075736803
HANDOVER_LOCK_KEY = 0x70677075736804

# Standbys wait for the election lock in one long statement: a role's statement or lock timeout would
# only make them reconnect over and over.
ANNOUNCER_SETTINGS = {**server_settings(APPLICATION_NAME), "statement_timeout": "0", "lock_timeout": "0"}

# A session is its pid and start time: a pid alone may since belong to another backend.
THIS_SESSION = "SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()"
END_SESSION = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = $1 AND backend_start = $2"

# How long the announcer waits for a lock before it gives up for now: writers hold their share of a lock
# only until they commit, so a longer wait means a transaction left open, which must not stall the rest.
LOCK_WAIT_MS = 200


class Announcer(BackgroundTask):
    """Runs the announcer's election, sleep and batching loop on a connection of its own."""

    task_name = "pgpush-announcer"

    def __init__(
        self,
        dsn: str,
        *,
        heard: Callable[[], int],
        batch_above: float,
        interval: float,
        backoff_max: float,
        window: float = 1.0,
        on_announced: Callable[[float], None] | None = None,
    ) -> None:
        self._dsn = dsn
        self._heard = heard
        self._batch_above = batch_above
        self._interval = interval
        self._backoff_max = backoff_max
        self._window = window  # the rate is judged over windows this long
        self._on_announced = on_announced
        self._last_session: asyncpg.Record | None = None
        self.elected = False
        self.awake = False

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self._dsn, timeout=5, server_settings=ANNOUNCER_SETTINGS)
                await self._end_previous_session(conn)
                self._last_session = await conn.fetchrow(THIS_SESSION)
                await conn.execute("SELECT pg_advisory_lock($1)", ANNOUNCER_LOCK_KEY)
                self.elected = True
                backoff = 0.1
                log.info("this replica is the announcer")
                await say_awake(conn, False)  # a previous announcer may have died awake
                await self._settle(conn)  # a previous announcer may have left statements behind
                await self._lead(conn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("announcer connection failed: %r; reconnecting in %.1fs", exc, backoff)
            finally:
                self.elected = self.awake = False
                if conn is not None:
                    conn.terminate()  # the server releases every lock the session held
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._backoff_max)

    async def _end_previous_session(self, conn: asyncpg.Connection) -> None:
        """A connection that died without a reset may live on in the server, still holding "awake"."""
        if self._last_session is None:
            return
        try:
            await end_session(conn, self._last_session)
        except asyncpg.PostgresError as exc:  # no right to end it: it ends when its keepalives fail
            log.info("could not end the previous announcer session: %r", exc)

    async def _lead(self, conn: asyncpg.Connection) -> None:
        while True:
            await self._sleep_until_busy()
            if not await wake(conn):
                await self._settle(conn)
                continue
            self.awake = True
            log.info("announcer awake: writers hand their notifications over")
            await self._batch_while_busy(conn)
            await fall_asleep(conn)
            self.awake = False
            await self._settle(conn)
            log.info("announcer asleep: writers notify for themselves")

    async def _sleep_until_busy(self) -> None:
        """Return once this replica hears `batch_above` notifications per second (no query meanwhile)."""
        before = self._heard()
        while True:
            await asyncio.sleep(self._window)
            now = self._heard()
            if now - before >= self._batch_above * self._window:
                return
            before = now

    async def _batch_while_busy(self, conn: asyncpg.Connection) -> None:
        loop = asyncio.get_running_loop()
        started, statements = loop.time(), 0
        while True:
            statements += await self._announce(conn)
            now = loop.time()
            if now - started >= self._window:
                if statements < self._batch_above / 2 * (now - started):
                    return
                started, statements = now, 0
            await asyncio.sleep(self._interval)

    async def _announce(self, conn: asyncpg.Connection) -> int:
        statements = await announce(conn)
        if statements and self._on_announced is not None:
            self._on_announced(statements)
        return statements

    async def _settle(self, conn: asyncpg.Connection) -> None:
        await settle(conn, self._announce)


# The handover protocol (migration 0003), one step per function, each on the announcer's connection.


async def wake(conn: asyncpg.Connection) -> bool:
    """Take "awake" and say so (writers hand over from now on); False when others held a share of it."""
    if not await _lock_within(conn, "SELECT pg_advisory_lock($1)", AWAKE_LOCK_KEY):
        return False
    await say_awake(conn, True)
    return True


async def fall_asleep(conn: asyncpg.Connection) -> None:
    """Stop saying "awake", then release it: writers that start from now on notify for themselves. Then
    `settle`. The order matters (migration 0004): a writer that still saw the word holds its share of
    "handover", which `settle` waits for."""
    await say_awake(conn, False)
    await conn.execute("SELECT pg_advisory_unlock($1)", AWAKE_LOCK_KEY)


async def say_awake(conn: asyncpg.Connection, awake: bool) -> None:
    """Set the announcer's word (migration 0004): any role may take the "awake" lock, only we may say it.

    A database before 0004 has no word to set; its writers go by the lock alone.
    """
    with contextlib.suppress(asyncpg.UndefinedFunctionError):
        await conn.execute("SELECT pgpush_announcer_awake($1)", awake)


async def announce(conn: asyncpg.Connection) -> int:
    """Notify for every statement handed over and committed so far; how many statements that was."""
    return int(await conn.fetchval("SELECT pgpush_announce()"))


async def settle(
    conn: asyncpg.Connection, announce_step: Callable[[asyncpg.Connection], Awaitable[int]]
) -> None:
    """Announce everything handed over, waiting out every writer that may still hand over.

    Exclusive "handover" is granted once no writer holds its share, i.e. every statement that found "awake"
    taken has committed or rolled back; one that comes later finds "awake" free and notifies. A writer that
    keeps its transaction open past LOCK_WAIT_MS makes this announce and try again, so the others' hints
    keep flowing meanwhile.
    """
    while True:
        await announce_step(conn)
        if await _lock_within(conn, "SELECT pg_advisory_xact_lock($1)", HANDOVER_LOCK_KEY):
            break
    await announce_step(conn)


async def end_session(conn: asyncpg.Connection, session: asyncpg.Record) -> None:
    """End the server side of a session read with THIS_SESSION, if it is still the same session."""
    await conn.execute(END_SESSION, session["pid"], session["backend_start"])


async def _lock_within(conn: asyncpg.Connection, query: str, key: int) -> bool:
    try:
        async with conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = {LOCK_WAIT_MS}")
            await conn.execute(query, key)
    except asyncpg.LockNotAvailableError:
        return False
    return True

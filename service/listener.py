"""The one LISTEN connection of a process: reconnects with capped backoff, resyncs, proves it is alive.

NOTIFY is only a hint (docs/protocol.md §2): after every (re)connect the hub re-reads every live recipient
from its cursor, a periodic NOTIFY round trip catches a connection that died without a TCP reset, and a slow
safety-net resync bounds the delay of any hint that was lost anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable
from typing import Literal

import asyncpg

from .background import BackgroundTask
from .connections import behind_pooler, connect
from .db import APPLICATION_NAME, LISTENER_APPLICATION_NAME, Channel, notify_channel, server_settings
from .hints import Hint, names_only, parse_hint

log = logging.getLogger("pgpush.listener")

HintHandler = Callable[[Hint], None]
ListenerState = Literal["connected", "disconnected", "misconfigured"]
CONNECT_TIMEOUT = 5.0


class ListenThroughPooler(Exception):
    """The LISTEN connection reaches Postgres through a transaction-mode pooler: no notification arrives."""


class SilentListenConnection(Exception):
    """A notification sent from another session did not arrive on the listening connection in time."""


class Listener(BackgroundTask):
    """Holds the LISTEN connection and turns notifications into hub hints."""

    task_name = "pgpush-listener"

    def __init__(
        self,
        dsn: str,
        *,
        on_hint: HintHandler,
        on_connected: Callable[[], None],
        probe_interval: float,
        probe_timeout: float,
        safety_net_interval: float,
        backoff_max: float,
        on_reconnect: Callable[[], None] | None = None,
        on_probe_failed: Callable[[], None] | None = None,
    ) -> None:
        self._dsn = dsn
        self._on_hint = on_hint
        self._on_connected = on_connected
        self._on_reconnect = on_reconnect
        self._on_probe_failed = on_probe_failed
        self._probe_interval = probe_interval
        self._probe_timeout = probe_timeout
        self._safety_net_interval = safety_net_interval
        self._backoff_max = backoff_max
        # A channel of our own for the probe, so replicas do not hear each other's probes.
        self._probe_channel = f"pgpush_probe_{uuid.uuid4().hex[:12]}"
        self._probe_waiter: asyncio.Future[None] | None = None
        self._lost: asyncio.Event = asyncio.Event()
        self._channel = Channel("", private=False)
        self.connected = False
        self.notifications = 0
        self.backend_pid: int | None = None
        # Set once the first connection attempt has ended either way (the app waits for it at startup).
        self.first_attempt_done = asyncio.Event()
        # Why the listener gave up for good: a configuration only the operator can fix.
        self.failure: str | None = None

    async def first_attempt(self) -> None:
        """Until the first connection attempt has ended, or as long as one can take."""
        bound = 2 * CONNECT_TIMEOUT + 2 * self._probe_timeout  # two connects, LISTEN and the round trip
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.first_attempt_done.wait(), bound)

    @property
    def state(self) -> ListenerState:
        if self.failure is not None:
            return "misconfigured"
        return "connected" if self.connected else "disconnected"

    async def _run(self) -> None:
        backoff = 0.1
        first = True
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await connect(
                    self._dsn, server_settings(LISTENER_APPLICATION_NAME), timeout=CONNECT_TIMEOUT
                )
                self._lost.clear()
                conn.add_termination_listener(lambda _conn: self._lost.set())
                self._channel = await notify_channel(conn)
                await conn.add_listener(self._channel.name, self._on_notification)
                await conn.add_listener(self._probe_channel, self._on_probe)
                await self._prove_notifications_arrive(conn)
                # LISTEN is in place: anything committed from now on is announced, so re-read the rest.
                self.connected = True
                self.first_attempt_done.set()
                self.backend_pid = conn.get_server_pid()
                if not first and self._on_reconnect is not None:
                    self._on_reconnect()
                first = False
                # The private channel's name is a secret: never logged.
                log.info(
                    "listening on the %s channel (backend pid %s)",
                    "private" if self._channel.private else "legacy public",
                    self.backend_pid,
                )
                self._on_connected()
                backoff = 0.1
                await self._supervise(conn)
            except asyncio.CancelledError:
                raise
            except ListenThroughPooler as exc:
                self.failure = str(exc)
                log.error("%s", exc)
                return  # no retry can help: only a restart with a direct URL can
            except Exception as exc:
                log.warning("listener connection failed: %r; reconnecting in %.1fs", exc, backoff)
            finally:
                self.connected = False
                self.first_attempt_done.set()
                if conn is not None:
                    conn.terminate()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._backoff_max)

    async def _supervise(self, conn: asyncpg.Connection) -> None:
        """Return when the connection is lost or fails a probe; resync on the safety-net interval."""
        loop = asyncio.get_running_loop()
        next_resync = loop.time() + self._safety_net_interval
        while True:
            try:
                await asyncio.wait_for(self._lost.wait(), self._probe_interval)
            except TimeoutError:
                pass
            else:
                log.warning("listener connection closed by the server")
                return
            if not await self._probe(conn):
                log.warning("listener probe got no answer in %.1fs; reconnecting", self._probe_timeout)
                if self._on_probe_failed is not None:
                    self._on_probe_failed()
                return
            if loop.time() >= next_resync:
                next_resync = loop.time() + self._safety_net_interval
                if await self._channel_moved(conn):
                    return
                self._on_connected()

    async def _prove_notifications_arrive(self, conn: asyncpg.Connection) -> None:
        """NOTIFY from another session and wait for it here: LISTEN works only on a session of its own.

        Behind a transaction-mode pooler the LISTEN stays on a server connection that other clients then
        borrow, so the notification goes elsewhere; the periodic probe, sent over the listening session,
        would come back all the same and hide it.
        """
        self._probe_waiter = asyncio.get_running_loop().create_future()
        try:
            notifier = await connect(
                self._dsn, server_settings(APPLICATION_NAME), timeout=CONNECT_TIMEOUT, statement_cache_size=0
            )
            try:
                await notifier.execute(f"NOTIFY {self._probe_channel}", timeout=self._probe_timeout)
            finally:
                await notifier.close(timeout=self._probe_timeout)
            try:
                await asyncio.wait_for(self._probe_waiter, self._probe_timeout)
            except TimeoutError:
                if await asyncio.wait_for(behind_pooler(conn), self._probe_timeout):
                    raise ListenThroughPooler(
                        "the LISTEN connection reaches Postgres through a connection pooler in transaction "
                        "mode (PgBouncer or alike), where notifications cannot arrive: point "
                        "PGPUSH_LISTEN_DATABASE_URL at Postgres itself (or at a session-mode pool); "
                        "DATABASE_URL may keep going through the pooler"
                    ) from None
                raise SilentListenConnection(
                    f"a notification from another session did not arrive within {self._probe_timeout:.1f}s"
                ) from None
        finally:
            self._probe_waiter = None

    async def _probe(self, conn: asyncpg.Connection) -> bool:
        """NOTIFY ourselves over the listening connection and wait for it to come back."""
        self._probe_waiter = asyncio.get_running_loop().create_future()
        try:
            await conn.execute(f"NOTIFY {self._probe_channel}", timeout=self._probe_timeout)
            await asyncio.wait_for(self._probe_waiter, self._probe_timeout)
        except (TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            return False
        finally:
            self._probe_waiter = None
        return True

    async def _channel_moved(self, conn: asyncpg.Connection) -> bool:
        """True when a migration (0004 applied, or undone) changed the channel since we began listening."""
        try:
            current = await notify_channel(conn)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            log.warning("could not check the notification channel: %r", exc)
            return False
        if current == self._channel:
            return False
        log.warning("the notification channel changed (a migration ran); listening again")
        return True

    def _on_probe(self, _conn: object, _pid: int, _channel: str, _payload: str) -> None:
        if self._probe_waiter is not None and not self._probe_waiter.done():
            self._probe_waiter.set_result(None)

    def _on_notification(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self.notifications += 1
        hint = parse_hint(payload)
        # Anyone can send on the legacy public channel: there a notification may only name recipients.
        self._on_hint(hint if self._channel.private else names_only(hint))

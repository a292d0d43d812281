"""The one LISTEN connection of a process: reconnects with capped backoff, resyncs, proves it is alive.

NOTIFY is only a hint (docs/protocol.md §2): after every (re)connect the hub re-reads every live recipient
from its cursor, a periodic NOTIFY round trip catches a connection that died without a TCP reset, and a slow
safety-net resync bounds the delay of any hint that was lost anyway.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable

import asyncpg

from .background import BackgroundTask
from .db import LISTENER_APPLICATION_NAME, Channel, notify_channel, server_settings
from .hints import Hint, names_only, parse_hint

log = logging.getLogger("pgpush.listener")

HintHandler = Callable[[Hint], None]


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
    ) -> None:
        self._dsn = dsn
        self._on_hint = on_hint
        self._on_connected = on_connected
        self._on_reconnect = on_reconnect
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

    async def _run(self) -> None:
        backoff = 0.1
        first = True
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(
                    self._dsn, timeout=5, server_settings=server_settings(LISTENER_APPLICATION_NAME)
                )
                self._lost.clear()
                conn.add_termination_listener(lambda _conn: self._lost.set())
                self._channel = await notify_channel(conn)
                await conn.add_listener(self._channel.name, self._on_notification)
                await conn.add_listener(self._probe_channel, self._on_probe)
                # LISTEN is in place: anything committed from now on is announced, so re-read the rest.
                self.connected = True
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
            except Exception as exc:
                log.warning("listener connection failed: %r; reconnecting in %.1fs", exc, backoff)
            finally:
                self.connected = False
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
                return
            if loop.time() >= next_resync:
                next_resync = loop.time() + self._safety_net_interval
                if await self._channel_moved(conn):
                    return
                self._on_connected()

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

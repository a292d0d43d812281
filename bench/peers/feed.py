"""What the straightforward peers share: one LISTEN connection and a per-recipient read of new rows.

This is the plain way to do it: on each NOTIFY, read the rows after each named recipient's last seq and
hand them on. Reads are serialised (one at a time, hints arriving meanwhile are merged), so rows of one
recipient are handed on in seq order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import asyncpg

# pgpush's private channel (migration 0004): its name is in a table only the owner and the service read.
CHANNEL_QUERY = "SELECT name FROM pgpush_channel"
NEW_ROWS = """
SELECT c.recipient, m.seq, m.event, m.data::text
FROM unnest($1::text[], $2::bigint[]) AS c(recipient, after_seq)
CROSS JOIN LATERAL (
    SELECT seq, event, data FROM messages
    WHERE recipient = c.recipient AND seq > c.after_seq ORDER BY seq
) AS m
ORDER BY c.recipient, m.seq
"""


def hinted_recipients(payload: str) -> list[str] | None:
    """The recipients a pgpush notification names (None: everyone). Lines that carry a whole row (migration
    0002) start with the recipient; the peers ignore the rest and read the table as they always did."""
    if payload == "*":
        return None
    return [line.split("\t", 1)[0] for line in payload.split("\n")]


LAST_SEQ = "SELECT coalesce(max(last_seq), 0) FROM message_counters WHERE recipient = $1"

RowHandler = Callable[[list[asyncpg.Record]], None]


class Feed:
    """LISTEN on pgpush's channel; for the recipients a hint names (or all, '*'), read and hand on rows."""

    def __init__(self, dsn: str, on_rows: RowHandler, wanted: Callable[[], set[str]]) -> None:
        self.dsn = dsn
        self.on_rows = on_rows
        self.wanted = wanted  # recipients someone is listening for
        self.cursors: dict[str, int] = {}
        self.dirty: set[str] = set()
        self.everyone = False
        self.work = asyncio.Event()
        self.pool: asyncpg.Pool | None = None
        self.listen_conn: asyncpg.Connection | None = None
        self.channel = ""
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=10)
        self.listen_conn = await asyncpg.connect(self.dsn)
        self.channel = str(await self.listen_conn.fetchval(CHANNEL_QUERY))
        await self.listen_conn.add_listener(self.channel, self._hint)
        self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
        if self.listen_conn:
            await self.listen_conn.close()
        if self.pool:
            await self.pool.close()

    async def subscribe(self, recipient: str) -> None:
        """Start this recipient's cursor at its last seq (called once per newly wanted recipient)."""
        if recipient not in self.cursors:
            assert self.pool is not None
            self.cursors[recipient] = await self.pool.fetchval(LAST_SEQ, recipient)

    def _hint(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        names = hinted_recipients(payload)
        if names is None:
            self.everyone = True
        else:
            self.dirty.update(names)
        self.work.set()

    async def _run(self) -> None:
        assert self.pool is not None
        while True:
            await self.work.wait()
            self.work.clear()
            wanted = self.wanted()
            names = wanted if self.everyone else self.dirty & wanted
            self.dirty, self.everyone = set(), False
            names = {n for n in names if n in self.cursors}
            if not names:
                continue
            order = sorted(names)
            rows = await self.pool.fetch(NEW_ROWS, order, [self.cursors[n] for n in order])
            for row in rows:
                self.cursors[row[0]] = max(self.cursors[row[0]], row[1])
            if rows:
                self.on_rows(rows)

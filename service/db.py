"""The connection pool and every SQL statement pgpush runs (queries as named constants)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

APPLICATION_NAME = "pgpush"
LISTENER_APPLICATION_NAME = "pgpush-listener"
NOTIFY_CHANNEL = "pgpush"

# Errors that mean "Postgres is not answering right now" rather than "this query is wrong".
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.ConnectionFailureError,
)

LAST_SEQS = """
SELECT recipient, last_seq FROM message_counters WHERE recipient = ANY($1::text[])
"""

# New rows for many recipients in one round trip, each from its own cursor, at most $3 per recipient.
NEW_ROWS = """
SELECT c.recipient, m.seq, m.event, m.data::text AS data, m.created_at
FROM unnest($1::text[], $2::bigint[]) WITH ORDINALITY AS c(recipient, after_seq, ord)
CROSS JOIN LATERAL (
    SELECT seq, event, data, created_at FROM messages
    WHERE recipient = c.recipient AND seq > c.after_seq
    ORDER BY seq LIMIT $3
) AS m
ORDER BY c.ord, m.seq
"""

# The seq before the newest $3 unread rows up to $2 (replay starts after it), or nothing when fewer.
UNREAD_BOUNDARY = """
SELECT seq FROM messages
WHERE recipient = $1 AND read_at IS NULL AND seq <= $2
ORDER BY seq DESC OFFSET $3 LIMIT 1
"""

UNREAD_PAGE = """
SELECT seq, event, data::text AS data, created_at FROM messages
WHERE recipient = $1 AND read_at IS NULL AND seq > $2 AND seq <= $3
ORDER BY seq LIMIT $4
"""


@dataclass(frozen=True, slots=True)
class Row:
    """One message as the stream needs it; `data` is the jsonb text."""

    recipient: str
    seq: int
    event: str
    data: str
    created_at: datetime


def server_settings(application_name: str) -> dict[str, str]:
    """Session settings: a name operators can find, and keepalives so a dead peer is noticed."""
    return {
        "application_name": application_name,
        "tcp_keepalives_idle": "30",
        "tcp_keepalives_interval": "10",
        "tcp_keepalives_count": "3",
    }


class Database:
    """The pool. Streams never hold a connection: each call borrows one for a single statement."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @classmethod
    async def connect(cls, dsn: str, *, max_size: int = 10) -> Database:
        """A lazy pool: no connection is opened until needed, so pgpush starts while Postgres is down."""
        pool = await asyncpg.create_pool(
            dsn,
            min_size=0,
            max_size=max_size,
            timeout=5,
            command_timeout=30,
            server_settings=server_settings(APPLICATION_NAME),
        )
        return cls(pool)

    async def close(self) -> None:
        await self.pool.close()

    async def ping(self) -> bool:
        """True while Postgres answers a trivial query within two seconds."""
        try:
            await self.pool.fetchval("SELECT 1", timeout=2)
        except (*UNAVAILABLE_ERRORS, asyncpg.PostgresError):
            return False
        return True

    async def notification_queue_usage(self) -> float | None:
        """How full Postgres' NOTIFY queue is (0..1); None when Postgres does not answer."""
        try:
            return float(await self.pool.fetchval("SELECT pg_notification_queue_usage()", timeout=2))
        except (*UNAVAILABLE_ERRORS, asyncpg.PostgresError):
            return None

    async def last_seqs(self, recipients: Sequence[str]) -> dict[str, int]:
        """The last committed seq of each recipient (0 when it never had a row)."""
        records = await self.pool.fetch(LAST_SEQS, list(recipients))
        found = {r["recipient"]: r["last_seq"] for r in records}
        return {recipient: found.get(recipient, 0) for recipient in recipients}

    async def new_rows(self, cursors: Iterable[tuple[str, int]], per_recipient: int) -> list[Row]:
        """Rows after each recipient's cursor, grouped by recipient in cursor order, oldest first."""
        pairs = list(cursors)
        recipients = [recipient for recipient, _ in pairs]
        after = [seq for _, seq in pairs]
        records = await self.pool.fetch(NEW_ROWS, recipients, after, per_recipient)
        return [Row(r[0], r[1], r[2], r[3], r[4]) for r in records]

    async def unread_boundary(self, recipient: str, upto: int, newest: int) -> int | None:
        """The seq just before the newest `newest` unread rows, or None when there are no more than that."""
        value = await self.pool.fetchval(UNREAD_BOUNDARY, recipient, upto, newest)
        return int(value) if value is not None else None

    async def unread_page(self, recipient: str, after: int, upto: int, limit: int) -> list[Row]:
        """Unread rows with after < seq <= upto, oldest first."""
        records = await self.pool.fetch(UNREAD_PAGE, recipient, after, upto, limit)
        return [Row(recipient, r[0], r[1], r[2], r[3]) for r in records]

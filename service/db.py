"""The connection pool and every SQL statement pgpush runs (queries as named constants)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import cast

import asyncpg

from .connections import PoolConnector

APPLICATION_NAME = "pgpush"
LISTENER_APPLICATION_NAME = "pgpush-listener"
# The public channel of releases up to 0.3.0: it is only listened on while the database has not been
# migrated to 0004 yet, and then only for recipient names (anyone can send on it).
LEGACY_NOTIFY_CHANNEL = "pgpush"
# The private channel's name (migration 0004): readable by the owner and the roles granted SELECT on it.
CHANNEL_QUERY = "SELECT name FROM pgpush_channel"

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
    # Raised instead of a connection error when the server goes away mid-query (MagicStack/asyncpg#784).
    asyncpg.exceptions.InternalClientError,
)

# Each newcomer's last seq and, from the same snapshot, its newest unread rows up to it (at most $2):
# one query starts a batch of fresh streams instead of one query per stream.
NEWCOMERS = """
SELECT r.recipient, coalesce(c.last_seq, 0), m.seq, m.event, m.data::text,
       extract(epoch FROM m.created_at)::float8
FROM unnest($1::text[]) AS r(recipient)
LEFT JOIN message_counters AS c ON c.recipient = r.recipient
LEFT JOIN LATERAL (
    SELECT seq, event, data, created_at FROM messages
    WHERE messages.recipient = r.recipient AND read_at IS NULL AND seq <= c.last_seq
    ORDER BY seq DESC LIMIT $2
) AS m ON true
"""

# Which of these recipients' counters differ from the given cursors: the counter is advanced in the same
# transaction as the rows, so one index probe per recipient answers without touching the messages. A
# counter behind a cursor means the cursor went past what the table holds (the data was reset).
DRIFT = """
SELECT c.recipient, coalesce(m.last_seq, 0)::bigint, coalesce(m.last_seq, 0) > c.after_seq
FROM unnest($1::text[], $2::bigint[]) AS c(recipient, after_seq)
LEFT JOIN message_counters AS m ON m.recipient = c.recipient
WHERE coalesce(m.last_seq, 0) <> c.after_seq
"""

# New rows for many recipients in one round trip, each from its own cursor, at most row_limit rows and
# `budget` bytes of frames per recipient (its streams' free buffer space): one read never hands a stream
# more than it can hold, whatever the statement or row size. The first row comes even when larger, so a
# row bigger than the budget cannot wedge its recipient (a stream it overflows resumes from the table,
# whose replay sends it). `page_rows` (rows read before the byte cut) tells the hub whether rows were
# left behind.
# created_at comes as epoch seconds: a float is all the latency metric needs and is cheaper to decode.
NEW_ROWS = """
SELECT c.recipient, m.seq, m.event, m.data, m.created, m.page_rows
FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::int[]) WITH ORDINALITY
    AS c(recipient, after_seq, budget, row_limit, ord)
CROSS JOIN LATERAL (
    SELECT seq, event, data, created, count(*) OVER () AS page_rows,
           sum(octet_length(data) + octet_length(event) + 40) OVER (ORDER BY seq) AS running,
           row_number() OVER (ORDER BY seq) AS n
    FROM (
        SELECT seq, event, data::text AS data, extract(epoch FROM created_at)::float8 AS created
        FROM messages
        WHERE recipient = c.recipient AND seq > c.after_seq
        ORDER BY seq LIMIT c.row_limit
    ) AS page
) AS m
WHERE m.running <= c.budget OR m.n = 1
ORDER BY c.ord, m.seq
"""

# The seq before the newest $3 unread rows up to $2 (replay starts after it), or nothing when fewer.
UNREAD_BOUNDARY = """
SELECT seq FROM messages
WHERE recipient = $1 AND read_at IS NULL AND seq <= $2
ORDER BY seq DESC OFFSET $3 LIMIT 1
"""

# Unread rows with $2 < seq <= $3, at most $4 rows and $5 bytes of frames (the first row always comes), and
# how many rows the page held before the byte cut: a replay never holds more than one stream buffer.
UNREAD_PAGE = """
SELECT seq, event, data, created, page_rows FROM (
    SELECT seq, event, data, created, count(*) OVER () AS page_rows,
           sum(octet_length(data) + octet_length(event) + 40) OVER (ORDER BY seq) AS running,
           row_number() OVER (ORDER BY seq) AS n
    FROM (
        SELECT seq, event, data::text AS data, extract(epoch FROM created_at)::float8 AS created
        FROM messages
        WHERE recipient = $1 AND read_at IS NULL AND seq > $2 AND seq <= $3
        ORDER BY seq LIMIT $4
    ) AS page
) AS m
WHERE running <= $5 OR n = 1
ORDER BY seq
"""


@dataclass(frozen=True, slots=True)
class Channel:
    """Where the triggers announce new rows, and whether its notifications may be trusted for content."""

    name: str
    private: bool


class ChannelUnreadable(Exception):
    """The database has the private channel but this role was not granted SELECT on it."""


async def notify_channel(conn: asyncpg.Connection) -> Channel:
    """The channel to LISTEN on: the private one, or the legacy public one on a database before 0004.

    Missing privileges are an error, not a reason to fall back: the triggers no longer send on the
    public channel, so listening there would silently leave every stream to the safety net.
    """
    try:
        name = await conn.fetchval(CHANNEL_QUERY)
    except asyncpg.exceptions.UndefinedTableError:
        return Channel(LEGACY_NOTIFY_CHANNEL, private=False)
    except asyncpg.exceptions.InsufficientPrivilegeError as exc:
        raise ChannelUnreadable(
            "this role may not read pgpush_channel: GRANT SELECT ON pgpush_channel TO <service role>"
        ) from exc
    return Channel(str(name), private=True)


@dataclass(frozen=True, slots=True)
class Row:
    """One message as the stream needs it; `data` is the jsonb text, `created_at` epoch seconds."""

    recipient: str
    seq: int
    event: str
    data: str
    created_at: float


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A recipient's last seq and, when known, every unread row up to it (oldest first), read together."""

    seq: int
    unread: list[Row] | None  # None: not read, or more than the reader asked for


@dataclass(frozen=True, slots=True)
class RowsRead:
    """One recipient's part of a NEW_ROWS read: after which seq, at most how many bytes and rows."""

    recipient: str
    after: int
    budget: int
    row_limit: int


# (recipient, seq, event, jsonb text, created_at epoch seconds, rows read before the byte cut), as NEW_ROWS
# returns them.
NewRow = tuple[str, int, str, str, float, int]


def server_settings(application_name: str) -> dict[str, str]:
    """Session settings: a name operators can find, and keepalives so a dead peer is noticed."""
    return {
        "application_name": application_name,
        "tcp_keepalives_idle": "30",
        "tcp_keepalives_interval": "10",
        "tcp_keepalives_count": "3",
    }


async def _reset_connection(conn: asyncpg.Connection) -> None:
    """Our statements leave no session state behind, so only an unfinished transaction needs undoing.

    asyncpg's default reset runs its own statement on every release: a second round trip for each query.
    """
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


class Database:
    """The pool. Streams never hold a connection: each call borrows one for a single statement."""

    def __init__(self, pool: asyncpg.Pool, connector: PoolConnector | None = None) -> None:
        self.pool = pool
        self._connector = connector

    @property
    def pooled(self) -> bool:
        """True once a connection has shown that a pooler (PgBouncer) sits between us and Postgres."""
        return bool(self._connector is not None and self._connector.pooled)

    @classmethod
    async def connect(cls, dsn: str, *, max_size: int = 10) -> Database:
        """A lazy pool: no connection is opened until needed, so pgpush starts while Postgres is down."""
        connector = PoolConnector(server_settings(APPLICATION_NAME))
        pool = await asyncpg.create_pool(
            dsn,
            min_size=0,
            max_size=max_size,
            timeout=5,
            command_timeout=30,
            # Works through a transaction-mode pooler too (PgBouncer): see service/connections.py.
            connect=connector,
            reset=_reset_connection,
        )
        return cls(pool, connector)

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

    async def newcomers(self, recipients: Sequence[str], unread_limit: int) -> dict[str, Snapshot]:
        """Each recipient's last committed seq (0 when it never had a row) with its unread rows, when it
        has at most `unread_limit` of them."""
        last_seqs = dict.fromkeys(recipients, 0)
        unread: dict[str, list[Row]] = {recipient: [] for recipient in recipients}
        # One row past the limit tells "exactly the limit" from "more".
        records = await self.pool.fetch(NEWCOMERS, list(recipients), unread_limit + 1)
        for recipient, last_seq, seq, event, data, created_at in records:
            last_seqs[recipient] = last_seq
            if seq is not None:
                unread[recipient].append(Row(recipient, seq, event, data, created_at))
        return {
            name: Snapshot(last_seqs[name], unread[name][::-1] if len(unread[name]) <= unread_limit else None)
            for name in recipients
        }

    async def drift(self, cursors: Sequence[tuple[str, int]]) -> tuple[list[str], dict[str, int]]:
        """The recipients whose last committed seq is past their cursor, and those whose cursor is past
        their last committed seq (with that seq)."""
        records = await self.pool.fetch(DRIFT, [r for r, _ in cursors], [seq for _, seq in cursors])
        return [r[0] for r in records if r[2]], {r[0]: int(r[1]) for r in records if not r[2]}

    async def new_rows(self, reads: Sequence[RowsRead]) -> list[NewRow]:
        """Rows after each recipient's cursor, within its row and byte limits, grouped by recipient in
        `reads` order, oldest first (NEW_ROWS says how the byte limit is applied).

        The records are returned as they come (tuple-like): the hub reads millions of them, and copying
        each into an object of ours was a seventh of its time.
        """
        return cast(
            list[NewRow],
            await self.pool.fetch(
                NEW_ROWS,
                [r.recipient for r in reads],
                [r.after for r in reads],
                [r.budget for r in reads],
                [r.row_limit for r in reads],
            ),
        )

    async def unread_boundary(self, recipient: str, upto: int, newest: int) -> int | None:
        """The seq just before the newest `newest` unread rows, or None when there are no more than that."""
        value = await self.pool.fetchval(UNREAD_BOUNDARY, recipient, upto, newest)
        return int(value) if value is not None else None

    async def unread_page(
        self, recipient: str, after: int, upto: int, limit: int, budget: int
    ) -> tuple[list[Row], bool]:
        """Unread rows with after < seq <= upto, oldest first, at most `limit` rows and about `budget`
        bytes of frames; and whether rows were left out (by either limit)."""
        records = await self.pool.fetch(UNREAD_PAGE, recipient, after, upto, limit, budget)
        rows = [Row(recipient, r[0], r[1], r[2], r[3]) for r in records]
        more = bool(records) and (len(records) < records[0][4] or len(records) >= limit)
        return rows, more

    # ---- Publishing and the inbox (POST /messages, GET /me/messages, POST /me/messages/read, CLI) ----

    async def publish(self, recipients: Sequence[str], event: str, data: str, key: str | None) -> Published:
        """One message (`data` is JSON text) to every recipient, in one transaction, idempotent by `key`.

        A recipient that already has a row with this key gets no new row; its existing row is returned, or
        IdempotencyConflict is raised (and nothing is written) when that row's event or data differ.
        """
        for attempt in range(_PUBLISH_ATTEMPTS):
            try:
                async with _translated_errors(), self.pool.acquire() as conn, conn.transaction():
                    created = await conn.fetch(PUBLISH_INSERT, list(recipients), event, data, key)
                    rows = {r["recipient"]: PublishedRow(r["id"], r["recipient"], r["seq"]) for r in created}
                    missing = [recipient for recipient in recipients if recipient not in rows]
                    if missing and key is not None:
                        # A new statement, so a new snapshot: it sees rows a concurrent publish committed
                        # while ON CONFLICT waited for it, which the INSERT's own snapshot could not.
                        existing = await conn.fetch(PUBLISH_EXISTING, missing, key, event, data)
                        differing = sorted(r["recipient"] for r in existing if not r["same"])
                        if differing:
                            raise IdempotencyConflict(key, differing)
                        for r in existing:
                            rows[r["recipient"]] = PublishedRow(r["id"], r["recipient"], r["seq"])
                    if any(recipient not in rows for recipient in recipients):
                        # The row we conflicted with was deleted before we could read it: start over.
                        raise _Retry()
                    return Published([rows[recipient] for recipient in recipients], len(created))
            except _Retry:
                await asyncio.sleep(0.01 * (attempt + 1))
        raise DatabaseUnavailable("the message could not be written after several attempts; try again")

    async def publish_lines(
        self, recipients: Sequence[str], event: str, datas: Sequence[str], keys: Sequence[str | None]
    ) -> int:
        """Several messages (JSON texts, in order) to every recipient in one statement; returns rows written.

        A row whose (recipient, key) already exists is skipped, so a batch retried after an unknown outcome
        (the connection dropped around COMMIT) is never written twice.
        """
        async with _translated_errors():
            status = await self.pool.execute(PUBLISH_LINES, list(recipients), event, list(datas), list(keys))
        return _row_count(status)

    async def inbox_page(
        self, recipient: str, *, unread: bool, ascending: bool, after: int, upto: int, limit: int
    ) -> list[InboxRow]:
        """One page of a recipient's rows with after < seq <= upto, in seq order (newest first unless
        `ascending`); only unread rows when `unread`."""
        query = {
            (False, True): INBOX_PAGE_ASC,
            (False, False): INBOX_PAGE_DESC,
            (True, True): INBOX_UNREAD_PAGE_ASC,
            (True, False): INBOX_UNREAD_PAGE_DESC,
        }[(unread, ascending)]
        async with _translated_errors():
            records = await self.pool.fetch(query, recipient, after, upto, limit)
        return [InboxRow(r[0], r[1], r[2], r[3], r[4], r[5]) for r in records]

    async def mark_read(self, recipient: str, seqs: Sequence[int]) -> int:
        """Mark these of the recipient's rows read; returns how many were unread. Unknown seqs are ignored."""
        return await self._mark(MARK_READ_SEQS, recipient, list(seqs))

    async def mark_read_through(self, recipient: str, seq: int) -> int:
        """Mark every row of the recipient up to `seq` read; returns how many were unread."""
        return await self._mark(MARK_READ_THROUGH, recipient, seq)

    async def _mark(self, query: str, recipient: str, arg: object) -> int:
        for attempt in range(_PUBLISH_ATTEMPTS):
            try:
                async with _translated_errors():
                    return _row_count(await self.pool.execute(query, recipient, arg))
            except _Retry:
                await asyncio.sleep(0.01 * (attempt + 1))
        raise DatabaseUnavailable("the rows could not be updated after several attempts; try again")

    # ---- retention ---------------------------------------------------------------------------------

    @asynccontextmanager
    async def exclusive(self, key: int) -> AsyncIterator[bool]:
        """A session advisory lock on one pooled connection: True when this process holds it.

        Behind a transaction-mode pooler a session lock would stay on whichever server connection took it
        (and the unlock land on another), so there the lock is a transaction's, held open meanwhile.
        """
        async with self.pool.acquire() as conn:
            if self.pooled:
                async with conn.transaction():
                    yield bool(await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", key))
                return
            held = bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", key))
            try:
                yield held
            finally:
                if held:
                    await conn.execute("SELECT pg_advisory_unlock($1)", key)

    async def delete_old_read(self, after_id: int, created_before: datetime, batch: int) -> RetentionStep:
        """Delete the read rows older than the cutoff among the next `batch` ids after `after_id`."""
        record = await self.pool.fetchrow(DELETE_OLD_READ, after_id, created_before, batch)
        assert record is not None
        return RetentionStep(record[0], record[1], record[2])

    async def last_counter_recipient(self, after_recipient: str, recipients: int) -> str | None:
        """The last recipient name of the next page of counters (None at the end)."""
        value = await self.pool.fetchval(LAST_COUNTER_RECIPIENT, after_recipient, recipients)
        return str(value) if value is not None else None

    async def unread_over_cap(self, after_recipient: str, recipients: int, cap: int) -> list[tuple[str, int]]:
        """Recipients after `after_recipient` with unread rows past the cap, and the last seq to drop."""
        records = await self.pool.fetch(UNREAD_OVER_CAP, after_recipient, recipients, cap)
        return [(r[0], r[1]) for r in records]

    async def delete_unread_through(self, recipient: str, seq: int, batch: int) -> int:
        """Delete up to `batch` of the recipient's oldest unread rows with seq <= `seq`."""
        return _row_count(await self.pool.execute(DELETE_UNREAD_THROUGH, recipient, seq, batch))


# ---- Retention: statements and results ----

# Walks the primary key in short ranges: every batch is an index range scan and a short statement, so no
# index is added to the write path and no lock is held for long. Returns (last id seen, oldest created_at
# seen, rows deleted); the walk stops once a range holds nothing older than the cutoff.
DELETE_OLD_READ = """
WITH span AS (
    SELECT id, created_at, read_at FROM messages WHERE id > $1 ORDER BY id LIMIT $3
), gone AS (
    DELETE FROM messages AS m USING span
    WHERE m.id = span.id AND span.read_at IS NOT NULL AND span.created_at < $2
    RETURNING m.id
)
SELECT (SELECT max(id) FROM span), (SELECT min(created_at) FROM span), (SELECT count(*) FROM gone)
"""

# For each recipient (in name order, a page at a time), the seq of its newest unread row beyond the cap.
UNREAD_OVER_CAP = """
SELECT c.recipient, b.seq FROM (
    SELECT recipient FROM message_counters WHERE recipient > $1 ORDER BY recipient LIMIT $2
) AS c
CROSS JOIN LATERAL (
    SELECT seq FROM messages AS m
    WHERE m.recipient = c.recipient AND m.read_at IS NULL
    ORDER BY seq DESC OFFSET $3 LIMIT 1
) AS b
ORDER BY c.recipient
"""

LAST_COUNTER_RECIPIENT = """
SELECT max(recipient) FROM (
    SELECT recipient FROM message_counters WHERE recipient > $1 ORDER BY recipient LIMIT $2
) AS page
"""

DELETE_UNREAD_THROUGH = """
DELETE FROM messages WHERE id IN (
    SELECT id FROM messages WHERE recipient = $1 AND read_at IS NULL AND seq <= $2 ORDER BY seq LIMIT $3
)
"""


@dataclass(frozen=True, slots=True)
class RetentionStep:
    """One batch of the read-row sweep: where it ended, the oldest row it saw, and how many it deleted."""

    last_id: int | None
    oldest: datetime | None
    deleted: int


# ---- Publishing and the inbox: statements, results and errors ----

# Rows are inserted in recipient order so that the trigger locks the recipients' counters in that order:
# two multi-recipient statements can then never deadlock (docs/protocol.md §1). The BEFORE trigger runs
# before the conflict check, so a skipped row still uses up a seq: seqs are increasing, not dense.
PUBLISH_INSERT = """
INSERT INTO messages (recipient, event, data, key)
SELECT r.recipient, $2, $3::jsonb, $4 FROM unnest($1::text[]) AS r(recipient)
ORDER BY r.recipient
ON CONFLICT (recipient, key) DO NOTHING
RETURNING id, recipient, seq
"""

PUBLISH_EXISTING = """
SELECT id, recipient, seq, (event = $3 AND data = $4::jsonb) AS same
FROM messages WHERE recipient = ANY($1::text[]) AND key = $2
"""

# Recipient order first (the counters' lock order), then line order (each recipient's seqs follow it).
PUBLISH_LINES = """
INSERT INTO messages (recipient, event, data, key)
SELECT r.recipient, $2, l.data::jsonb, l.key
FROM unnest($3::text[], $4::text[]) WITH ORDINALITY AS l(data, key, n)
CROSS JOIN unnest($1::text[]) AS r(recipient)
ORDER BY r.recipient, l.n
ON CONFLICT (recipient, key) DO NOTHING
"""

# Four fixed statements rather than one with "($n OR read_at IS NULL)": a prepared statement's generic plan
# could not use the partial unread index for the latter, whatever the parameter.
_INBOX_ROWS = """
SELECT id, seq, event, data::text AS data, created_at, read_at FROM messages
WHERE recipient = $1 AND seq > $2 AND seq <= $3
"""
INBOX_PAGE_ASC = _INBOX_ROWS + "ORDER BY seq LIMIT $4"
INBOX_PAGE_DESC = _INBOX_ROWS + "ORDER BY seq DESC LIMIT $4"
INBOX_UNREAD_PAGE_ASC = _INBOX_ROWS + "AND read_at IS NULL ORDER BY seq LIMIT $4"
INBOX_UNREAD_PAGE_DESC = _INBOX_ROWS + "AND read_at IS NULL ORDER BY seq DESC LIMIT $4"

MARK_READ_SEQS = """
UPDATE messages SET read_at = now()
WHERE recipient = $1 AND seq = ANY($2::bigint[]) AND read_at IS NULL
"""

MARK_READ_THROUGH = """
UPDATE messages SET read_at = now()
WHERE recipient = $1 AND seq <= $2 AND read_at IS NULL
"""

_PUBLISH_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class PublishedRow:
    """Where one published message landed."""

    id: int
    recipient: str
    seq: int


@dataclass(frozen=True, slots=True)
class Published:
    """The rows of one publish, in the order the recipients were given; `created` of them are new."""

    rows: list[PublishedRow]
    created: int


@dataclass(frozen=True, slots=True)
class InboxRow:
    """One message as the inbox lists it; `data` is the jsonb text."""

    id: int
    seq: int
    event: str
    data: str
    created_at: datetime
    read_at: datetime | None


class DatabaseUnavailable(Exception):
    """Postgres did not answer, or kept refusing to let the statement through; the caller may retry."""


class InvalidMessage(Exception):
    """Postgres refused a value (a CHECK constraint, or text jsonb cannot hold such as \\u0000)."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(detail)
        self.field = field
        self.detail = detail


class IdempotencyConflict(Exception):
    """The key is already used for these recipients by a message with another event or data."""

    def __init__(self, key: str, recipients: list[str]) -> None:
        super().__init__(f"key {key!r} is already used with another event or data")
        self.key = key
        self.recipients = recipients


class _Retry(Exception):
    """The statement lost a deadlock or serialization race; running it again will do."""


_CONSTRAINT_FIELDS = {
    "messages_recipient_valid": "recipients",
    "messages_event_valid": "event",
    "messages_event_not_reserved": "event",
    "messages_key_valid": "key",
}


@asynccontextmanager
async def _translated_errors() -> AsyncIterator[None]:
    """asyncpg's errors as ours, so the API never needs to know asyncpg."""
    try:
        yield
    except (asyncpg.exceptions.DeadlockDetectedError, asyncpg.exceptions.SerializationError) as exc:
        raise _Retry() from exc
    except asyncpg.exceptions.CheckViolationError as exc:
        field = _CONSTRAINT_FIELDS.get(exc.constraint_name or "", "body")
        raise InvalidMessage(field, f"Postgres refused the {field}: {exc.message}") from exc
    except (
        asyncpg.exceptions.UntranslatableCharacterError,
        asyncpg.exceptions.CharacterNotInRepertoireError,
    ) as exc:
        # In practice \u0000 in data: jsonb cannot hold it (other fields are checked before they get here).
        raise InvalidMessage("data", f"Postgres cannot store it ({exc.message}); \\u0000 is refused") from exc
    except UNAVAILABLE_ERRORS as exc:
        raise DatabaseUnavailable("the database is not answering; try again") from exc


def _row_count(status: str) -> int:
    """The row count of a command status such as 'UPDATE 3' or 'INSERT 0 3'."""
    return int(status.rsplit(" ", 1)[-1])

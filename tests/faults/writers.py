"""Product backends for the fault tests: writers that insert rows until told to stop, and retry on outages.

Each statement carries an idempotency key, so a writer that lost the answer to a COMMIT (Postgres stopped
under it) retries without writing the row twice, then reads back the seqs it got. Only acknowledged rows go
into the ledger; the tests also read the table itself, the truth of what was committed.
"""

from __future__ import annotations

import asyncio
import json
import random

import asyncpg
from pgpush.db import UNAVAILABLE_ERRORS

from tests.faults.ledger import Ledger

# Several recipients in one statement, in recipient order as docs/protocol.md §1 asks of multi-row writers.
INSERT_KEYED = """
INSERT INTO messages (recipient, event, data, key)
SELECT r, 'fault', $2::jsonb, $3 FROM unnest($1::text[]) AS r ORDER BY r
ON CONFLICT (recipient, key) DO NOTHING
RETURNING recipient, seq
"""
SEQS_OF_KEY = "SELECT recipient, seq FROM messages WHERE key = $2 AND recipient = ANY($1::text[])"
RETRY_PAUSE = 0.05


async def write_until(
    stop: asyncio.Event,
    database_url: str,
    users: list[str],
    ledger: Ledger,
    *,
    writer: int,
    pause: float = 0.002,
    max_fanout: int = 3,
    seed: int = 0,
) -> int:
    """Insert rows for random users (sometimes several in one statement) until `stop`; the rows written."""
    rng = random.Random(seed * 1000 + writer)
    conn: asyncpg.Connection | None = None
    written = 0
    n = 0
    while not stop.is_set():
        recipients = sorted(set(rng.choices(users, k=rng.randint(1, max_fanout))))
        key = f"w{writer}-{n}"
        data = json.dumps({"writer": writer, "n": n})
        while True:  # until this statement is known to be committed, whatever happens to Postgres
            try:
                if conn is None:
                    conn = await asyncpg.connect(database_url, timeout=2)
                rows = await conn.fetch(INSERT_KEYED, recipients, data, key, timeout=5)
                if len(rows) < len(recipients):  # committed by an attempt whose answer was lost
                    rows = await conn.fetch(SEQS_OF_KEY, recipients, key, timeout=5)
                break
            except (*UNAVAILABLE_ERRORS, asyncpg.InternalClientError):
                # InternalClientError: asyncpg's protocol state can trip when the server goes away mid-query
                # (MagicStack/asyncpg#784); the connection is dropped and the statement retried all the same.
                if conn is not None:
                    conn.terminate()
                    conn = None
                await asyncio.sleep(RETRY_PAUSE)
        for row in rows:
            ledger.record_sent(row["recipient"], row["seq"])
        written += len(rows)
        n += 1
        await asyncio.sleep(pause)
    if conn is not None:
        await conn.close()
    return written


async def committed(database_url: str) -> dict[str, list[int]]:
    """Every row in the table, by recipient: what must have been delivered."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT recipient, seq FROM messages ORDER BY recipient, seq")
    finally:
        await conn.close()
    found: dict[str, list[int]] = {}
    for row in rows:
        found.setdefault(row["recipient"], []).append(row["seq"])
    return found

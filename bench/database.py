"""The bench's own Postgres (never the one on 5432) and the writers that load it.

Every row the writers insert carries `{"t": <epoch ms>}` taken with clock_timestamp() inside the INSERT, so
the load generator can time each event from the row's write to its receipt.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from pgpush.embedded import EmbeddedPostgres
from pgpush.migrate import migrate

from bench.system import CLIENT_CPU, pin_pid

BENCH_DB = "pgpush_bench"
STAMP = "jsonb_build_object('t', extract(epoch FROM clock_timestamp()) * 1000)"
ONE_ROW = f"INSERT INTO messages (recipient, event, data) VALUES ($1, 'bench', {STAMP})"
# One row for each recipient, in recipient order so concurrent statements cannot deadlock (protocol §1).
FAN_OUT = f"""
INSERT INTO messages (recipient, event, data)
SELECT r, 'bench', {STAMP} FROM unnest($1::text[]) AS r ORDER BY r
"""
BURST = f"""
INSERT INTO messages (recipient, event, data)
SELECT ($1::text[])[1 + i % cardinality($1::text[])], 'bench', {STAMP}
FROM generate_series(0, $2 - 1) AS i ORDER BY 1
"""


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


class BenchPostgres:
    """A durable throwaway cluster under `root`, pinned to the client core, with a migrated database."""

    def __init__(self, root: Path) -> None:
        self.cluster = EmbeddedPostgres(root / "pgdata", durable=True)
        self.url = ""

    async def start(self) -> str:
        admin_url = await asyncio.to_thread(self.cluster.start)
        pid = int((self.cluster.data_dir / "postmaster.pid").read_text().split()[0])
        pin_pid(pid, CLIENT_CPU)
        conn = await asyncpg.connect(admin_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{BENCH_DB}" WITH (FORCE)')
            await conn.execute(f'CREATE DATABASE "{BENCH_DB}"')
        finally:
            await conn.close()
        self.url = with_database(admin_url, BENCH_DB)
        await asyncio.to_thread(migrate, self.url)
        return self.url

    def stop(self) -> None:
        self.cluster.stop("fast")

    async def reset(self) -> None:
        """Empty the tables between targets, so no stream replays another target's rows."""
        conn = await asyncpg.connect(self.url)
        try:
            await conn.execute("TRUNCATE messages, message_counters")
        finally:
            await conn.close()

    async def commits(self) -> int:
        """Transactions committed in the bench database so far (pg_stat_database.xact_commit)."""
        conn = await asyncpg.connect(self.url)
        try:
            await conn.execute("SELECT pg_stat_clear_snapshot()")
            value = await conn.fetchval(
                "SELECT xact_commit FROM pg_stat_database WHERE datname = $1", BENCH_DB
            )
        finally:
            await conn.close()
        return int(value)


@dataclass
class WriteResult:
    rows: int
    statements: int
    seconds: float
    last_commit: float  # wall clock, comparable with the load generator's receipts


async def _connections(url: str, n: int) -> list[asyncpg.Connection]:
    # The bench measures the push path, not the disk: a commit is visible (and notified) before its WAL
    # flush either way; not waiting for the flush keeps fsync noise out of every target's latency alike.
    settings = {"synchronous_commit": "off", "application_name": "pgpush-bench-writer"}
    return [await asyncpg.connect(url, server_settings=settings) for _ in range(n)]


async def _paced(
    url: str, rate: float, seconds: float, writers: int, statement: str, args: object
) -> WriteResult:
    """Run `statement` at `rate` per second (or as fast as it goes when rate is 0) from several sessions."""
    conns = await _connections(url, writers)
    stmts = [await c.prepare(statement) for c in conns]
    count = 0
    last_commit = 0.0
    start = time.perf_counter()
    stop_at = start + seconds

    async def worker(j: int) -> None:
        nonlocal count, last_commit
        i = 0
        while True:
            if rate > 0:
                due = start + (i * writers + j) / rate
                if due >= stop_at:
                    return
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            elif time.perf_counter() >= stop_at:
                return
            await stmts[j].fetch(*args(i * writers + j) if callable(args) else args)  # type: ignore[misc]
            last_commit = time.time()
            count += 1
            i += 1

    try:
        await asyncio.gather(*(worker(j) for j in range(writers)))
    finally:
        for conn in conns:
            await conn.close()
    return WriteResult(count, count, time.perf_counter() - start, last_commit)


async def write_targeted(
    url: str, users: list[str], rate: float, seconds: float, writers: int = 8
) -> WriteResult:
    """Single-row transactions to pseudo-random users (a fixed stride, so the run is repeatable)."""
    n = len(users)
    return await _paced(url, rate, seconds, writers, ONE_ROW, lambda k: (users[(k * 7919) % n],))


async def write_fan_out(
    url: str, users: list[str], rate: float, seconds: float, writers: int = 4
) -> WriteResult:
    """One INSERT … SELECT per tick writing one row for every user."""
    result = await _paced(url, rate, seconds, writers, FAN_OUT, (sorted(users),))
    result.rows = result.statements * len(users)
    return result


async def write_burst(url: str, users: list[str], rows: int) -> WriteResult:
    """All rows in one statement; returns when it has committed."""
    (conn,) = await _connections(url, 1)
    try:
        start = time.perf_counter()
        await conn.execute(BURST.replace("$2", str(int(rows))), users)
        committed = time.time()
        return WriteResult(rows, 1, time.perf_counter() - start, committed)
    finally:
        await conn.close()

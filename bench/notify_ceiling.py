"""`python -m bench.notify_ceiling`: where one Postgres stops keeping up with pgpush's write and notify path.

Three measurements on a throwaway durable Postgres of its own (never the one on 5432):

1. **Inserts.** Rows/s that 1, 4 and 16 concurrent writers commit, single-row and 100-row statements, with
   synchronous_commit on (the default) and off, into three tables with the same columns, constraints and
   indexes: `messages_plain` (no trigger; seq from a column default), `messages_quiet` (pgpush's triggers
   with the pg_notify call taken out) and `messages` (pgpush as migrated). The middle one tells the per-row
   seq work from NOTIFY's cost; `--repeat` keeps each table's best of several runs, the tables taking turns.
2. **Replicas on the write path.** Single-row inserts into `messages` while 0, 3, 10, 30 connections in
   another process LISTEN on the channel, as that many replicas' listeners do; writers notifying for
   themselves, then with the announcer awake.
3. **The listener.** Notifications/s one `pgpush serve` process consumes and routes: it holds N streams
   while several connections `pg_notify('pgpush', …)` as fast as they can in batches, and its own
   `pgpush_notifications_total` counter and /proc CPU tell what it took in. Three kinds of hint: recipients
   it holds no stream for (what every replica hears about the others' users), recipients it does hold (each
   costs a read of new rows), and hints naming 100 of its recipients at once (a multi-row statement's).

Prints markdown tables; docs/scaling.md explains what they mean for capacity planning.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
from pgpush import announcer
from pgpush.config import Settings
from pgpush.db import CHANNEL_QUERY
from pgpush.embedded import EmbeddedPostgres
from pgpush.migrate import migrate
from prometheus_client.parser import text_string_to_metric_families

from bench import targets as targets_mod
from bench.database import with_database
from bench.system import (
    CLIENT_CPU,
    SERVER_CPU,
    children,
    cpu_percent,
    machine,
    pin_pid,
    pin_self,
    pinned,
    raise_fd_limit,
    sample,
)

DATABASE = "pgpush_ceiling"
DATA = '{"company": "ACME", "phone": "+1 555 0100"}'

# The comparison table: what LIKE … INCLUDING ALL copies (columns, defaults, identity, CHECKs, the unique
# constraints and the partial index) minus the triggers; seq gets a default so the same INSERT works on it.
PLAIN_TABLE = [
    "CREATE SEQUENCE IF NOT EXISTS messages_plain_seq AS bigint",
    "CREATE TABLE IF NOT EXISTS messages_plain (LIKE messages INCLUDING ALL)",
    "ALTER TABLE messages_plain ALTER COLUMN seq SET DEFAULT nextval('messages_plain_seq')",
]
# The third table: pgpush's triggers with the NOTIFY taken out, to tell the per-row seq work from NOTIFY's
# cost. Its functions are copied from the migrated ones at start, so they follow the migration.
QUIET_TABLE = [
    "CREATE TABLE IF NOT EXISTS messages_quiet (LIKE messages INCLUDING ALL)",
    "CREATE TRIGGER messages_quiet_assign_seq BEFORE INSERT ON messages_quiet "
    "FOR EACH ROW EXECUTE FUNCTION pgpush_assign_seq()",
    "CREATE TRIGGER messages_quiet_advance AFTER INSERT ON messages_quiet REFERENCING NEW TABLE AS new_rows "
    "FOR EACH STATEMENT EXECUTE FUNCTION bench_advance_quietly()",
]
NOTIFY_CALL = "PERFORM pg_notify("
# What writers insert into: the three tables, and `messages` again while an announcer batches (0003).
BATCHED = "messages, announcer awake"
TABLES = ("messages_plain", "messages_quiet", "messages", BATCHED)
SINGLE = "INSERT INTO {table} (recipient, event, data) VALUES ($1, 'bench', $2::jsonb)"
# Recipients in order, as protocol §1 asks of multi-row writers (concurrent statements cannot deadlock).
MULTI = (
    "INSERT INTO {table} (recipient, event, data) "
    "SELECT r, 'bench', $2::jsonb FROM unnest($1::text[]) AS r ORDER BY r"
)
# One statement (one transaction) sends a batch of notifications; distinct payloads are never folded.
# On pgpush's private channel (migration 0004), read from the table like the service does.
NOTIFY_BATCH = f"SELECT count(pg_notify(({CHANNEL_QUERY}), p)) FROM unnest($1::text[]) AS p"


@dataclass(frozen=True)
class InsertPoint:
    commit: str
    writers: int
    rows_per_statement: int
    table: str
    rows_per_s: float
    statements_per_s: float
    pg_cpu: float  # % of one core, all Postgres processes
    client_cpu: float  # % of one core, this process (the writers' driver)


@dataclass(frozen=True)
class ListenerPoint:
    hints: str
    recipients_per_hint: int
    sent_per_s: float
    consumed_per_s: float
    server_cpu: float  # % of one core, the pgpush process
    drain_s: float | None  # time to consume the backlog once the senders stopped (None: gave up)
    queue_usage: float  # pg_notification_queue_usage() when the senders stopped


# --- the database ------------------------------------------------------------------------------------


class CeilingPostgres:
    """A durable cluster under a temporary folder, with a migrated database and the trigger-less copy."""

    def __init__(self, root: Path) -> None:
        self.cluster = EmbeddedPostgres(root / "pgdata", durable=True)
        self.url = ""

    async def start(self, users: list[str]) -> str:
        admin = await asyncio.to_thread(self.cluster.start)
        conn = await asyncpg.connect(admin)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
            await conn.execute(f'CREATE DATABASE "{DATABASE}"')
        finally:
            await conn.close()
        self.url = with_database(admin, DATABASE)
        await asyncio.to_thread(migrate, self.url)
        conn = await asyncpg.connect(self.url)
        try:
            for statement in PLAIN_TABLE:
                await conn.execute(statement)
            notifying = await conn.fetchval("SELECT pg_get_functiondef('pgpush_advance_and_notify'::regproc)")
            if NOTIFY_CALL not in notifying:
                raise RuntimeError("pgpush_advance_and_notify() no longer calls pg_notify: update the bench")
            await conn.execute(
                notifying.replace("pgpush_advance_and_notify", "bench_advance_quietly").replace(
                    NOTIFY_CALL, "-- " + NOTIFY_CALL
                )
            )
            for statement in QUIET_TABLE:
                await conn.execute(statement)
            # Every recipient's counter row exists, as in a running system: the seq trigger then locks an
            # existing row instead of inserting it.
            await conn.execute(MULTI.format(table="messages"), users, DATA)
        finally:
            await conn.close()
        return self.url

    @property
    def postmaster(self) -> int:
        return int((self.cluster.data_dir / "postmaster.pid").read_text().split()[0])

    def pids(self) -> list[int]:
        return [self.postmaster, *children(self.postmaster)]

    async def reset(self) -> None:
        """Empty both tables (counters stay) and checkpoint, so every point starts from the same state."""
        conn = await asyncpg.connect(self.url)
        try:
            await conn.execute("TRUNCATE messages, messages_plain, messages_quiet")
            await conn.execute("CHECKPOINT")
        finally:
            await conn.close()

    async def version(self) -> str:
        conn = await asyncpg.connect(self.url)
        try:
            return str(await conn.fetchval("SHOW server_version"))
        finally:
            await conn.close()

    def stop(self) -> None:
        self.cluster.stop("fast")


# --- 1. inserts --------------------------------------------------------------------------------------


async def insert_point(
    pg: CeilingPostgres,
    *,
    table: str,
    writers: int,
    rows: int,
    commit: str,
    users: list[str],
    seconds: float,
) -> InsertPoint:
    """Writers insert into `table` as fast as they can for `seconds`; the committed rows/s."""
    await pg.reset()
    settings = {"synchronous_commit": commit, "application_name": "pgpush-bench-writer"}
    conns = [await asyncpg.connect(pg.url, server_settings=settings) for _ in range(writers)]
    batched = table == BATCHED
    query = (SINGLE if rows == 1 else MULTI).format(table="messages" if batched else table)
    statements = 0
    stop_at = 0.0

    async def writer(conn: asyncpg.Connection, seed: int) -> None:
        nonlocal statements
        rng = random.Random(seed)
        while time.perf_counter() < stop_at:
            recipients: str | list[str] = rng.choice(users) if rows == 1 else sorted(rng.sample(users, rows))
            await conn.execute(query, recipients, DATA)
            statements += 1

    try:
        async with Announcing(pg.url) if batched else contextlib.nullcontext() as announcing:
            pg_before, client_before = sample(pg.pids()), sample([os.getpid()])
            started = time.perf_counter()
            stop_at = started + seconds
            await asyncio.gather(*(writer(conn, i) for i, conn in enumerate(conns)))
            elapsed = time.perf_counter() - started
            pg_after, client_after = sample(pg.pids()), sample([os.getpid()])
        if announcing is not None and announcing.statements != statements:
            raise RuntimeError(f"{statements} statements written, {announcing.statements} announced")
    finally:
        for conn in conns:
            await conn.close()
    return InsertPoint(
        commit,
        writers,
        rows,
        table,
        statements * rows / elapsed,
        statements / elapsed,
        cpu_percent(pg_before, pg_after),
        cpu_percent(client_before, client_after),
    )


class Announcing:
    """An announcer held awake for the duration, announcing every PGPUSH_NOTIFY_BATCH_INTERVAL_MS."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.interval = Settings.model_fields["notify_batch_interval_ms"].default / 1000
        self.statements = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._conn: asyncpg.Connection | None = None

    async def __aenter__(self) -> Announcing:
        self._conn = await asyncpg.connect(self.url)
        if not await announcer.wake(self._conn):
            raise RuntimeError("could not wake the announcer")
        self._task = asyncio.create_task(self._loop(self._conn))
        return self

    async def _announce(self, conn: asyncpg.Connection) -> int:
        found = await announcer.announce(conn)
        self.statements += found
        return found

    async def _loop(self, conn: asyncpg.Connection) -> None:
        while not self._stop.is_set():
            await self._announce(conn)
            await asyncio.sleep(self.interval)

    async def __aexit__(self, *exc: object) -> None:
        assert self._conn is not None and self._task is not None
        self._stop.set()
        await self._task
        await announcer.fall_asleep(self._conn)
        await announcer.settle(self._conn, self._announce)
        await self._conn.close()


async def best_of(
    repeat: int,
    pg: CeilingPostgres,
    *,
    writers: int,
    rows: int,
    commit: str,
    users: list[str],
    seconds: float,
) -> list[InsertPoint]:
    """Each table's best of `repeat` runs, the tables taking turns so that noise from outside hits all."""
    best: dict[str, InsertPoint] = {}
    for _ in range(repeat):
        for table in TABLES:
            print(f"[ceiling] {table}: {writers} writers x {rows} rows, commit {commit} …", file=sys.stderr)
            point = await insert_point(
                pg, table=table, writers=writers, rows=rows, commit=commit, users=users, seconds=seconds
            )
            if table not in best or point.rows_per_s > best[table].rows_per_s:
                best[table] = point
    return [best[table] for table in TABLES]


# --- 1b. the replicas' listeners, seen from the write path --------------------------------------------

REPLICA_WRITERS = 4


@dataclass(frozen=True)
class ReplicaPoint:
    listeners: int
    commit: str
    table: str  # "messages" (writers notify) or BATCHED
    rows_per_s: float
    pg_cpu: float
    # Notifications each listener received / statements committed (1.0: kept up); None with no listener.
    received_share: float | None


async def _listen_child(url: str, count: int) -> None:
    """The child process: `count` LISTENing connections counting what they hear until stdin closes."""
    heard = 0

    def hear(*_args: object) -> None:
        nonlocal heard
        heard += 1

    conns = [await asyncpg.connect(url) for _ in range(count)]
    for conn in conns:
        await conn.add_listener(await conn.fetchval(CHANNEL_QUERY), hear)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await asyncio.sleep(1)  # the last notifications in flight
    print(heard, flush=True)
    for conn in conns:
        await conn.close()


async def replica_points(
    pg: CeilingPostgres, listeners: list[int], *, commits: list[str], users: list[str], seconds: float
) -> list[ReplicaPoint]:
    """The write rate with each number of listening connections (each a child process's)."""
    found = []
    for commit, count, table in (
        (commit, count, table) for commit in commits for count in listeners for table in ("messages", BATCHED)
    ):
        print(f"[ceiling] {count} listeners, {table}, commit {commit} …", file=sys.stderr)
        child = await asyncio.create_subprocess_exec(
            *pinned(
                [sys.executable, "-m", "bench.notify_ceiling", "--listen-child", pg.url, str(count)],
                SERVER_CPU,
            ),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert child.stdin is not None and child.stdout is not None
        try:
            assert await asyncio.wait_for(child.stdout.readline(), 60) == b"ready\n"
            point = await insert_point(
                pg,
                table=table,
                writers=REPLICA_WRITERS,
                rows=1,
                commit=commit,
                users=users,
                seconds=seconds,
            )
            child.stdin.close()
            heard = int(await asyncio.wait_for(child.stdout.readline(), 60))
        finally:
            if child.returncode is None:
                child.kill()
            await child.wait()
        statements = point.statements_per_s * seconds
        share = heard / count / statements if count else None
        found.append(ReplicaPoint(count, commit, table, point.rows_per_s, point.pg_cpu, share))
    return found


def percent(share: float | None, decimals: int) -> str:
    return "-" if share is None else f"{share:.{decimals}%}"


def replica_table(points: list[ReplicaPoint]) -> str:
    lines = [
        "| synchronous_commit | listening replicas | pgpush rows/s | Postgres CPU % | heard by each "
        "| batched rows/s | batched / pgpush | batched Postgres CPU % | batched: heard per statement |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    by_key = {(p.commit, p.listeners, p.table): p for p in points}
    for (commit, count, table), p in by_key.items():
        if table != "messages":
            continue
        b = by_key.get((commit, count, BATCHED))
        batched = "- | - | - | -"
        if b is not None:
            gain = b.rows_per_s / p.rows_per_s
            batched = f"{b.rows_per_s:,.0f} | {gain:.2f} | {b.pg_cpu:.0f} | {percent(b.received_share, 1)}"
        lines.append(
            f"| {commit} | {count} | {p.rows_per_s:,.0f} | {p.pg_cpu:.0f} | {percent(p.received_share, 0)} "
            f"| {batched} |"
        )
    return "\n".join(lines)


# --- 2. the listener ---------------------------------------------------------------------------------


class Sink(asyncio.Protocol):
    """One stream held open; everything it receives is dropped (no rows are written in this part)."""

    def __init__(self, request: bytes, opened: asyncio.Future[bool]) -> None:
        self.request = request
        self.opened = opened

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if not self.opened.done():
            self.opened.set_result(data.startswith(b"HTTP/1.1 200"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_result(False)


async def open_streams(target: targets_mod.Target, users: list[str]) -> list[asyncio.BaseTransport]:
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(200)

    async def one(user: str) -> asyncio.BaseTransport:
        async with gate:
            opened: asyncio.Future[bool] = loop.create_future()
            request = target.request(user).encode()
            transport, _ = await loop.create_connection(
                lambda: Sink(request, opened), "127.0.0.1", target.port
            )
            if not await asyncio.wait_for(opened, 30):
                raise RuntimeError(f"the stream of {user} was refused")
            return transport

    return list(await asyncio.gather(*(one(user) for user in users)))


async def counter(client: httpx.AsyncClient, name: str) -> float:
    text = (await client.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name:
                return float(found.value)
    raise RuntimeError(f"/metrics has no {name}")


async def listener_point(
    pg: CeilingPostgres,
    target: targets_mod.Target,
    metrics: httpx.AsyncClient,
    *,
    hints: str,
    payloads: Callable[[random.Random, int], list[str]],
    recipients_per_hint: int,
    senders: int,
    seconds: float,
) -> ListenerPoint:
    """Senders NOTIFY as fast as Postgres takes it; what pgpush consumed over the same window, and its CPU."""
    conns = [await asyncpg.connect(pg.url) for _ in range(senders)]
    sent = 0
    stop_at = 0.0

    async def sender(conn: asyncpg.Connection, seed: int) -> None:
        nonlocal sent
        rng = random.Random(seed)
        while time.perf_counter() < stop_at:
            batch = payloads(rng, seed)
            done = await conn.fetchval(NOTIFY_BATCH, batch)
            sent += done  # not `sent += await …`: that reads `sent` before the await

    try:
        start_count = await counter(metrics, "pgpush_notifications_total")
        before = sample(target.pids())
        started = time.perf_counter()
        stop_at = started + seconds
        await asyncio.gather(*(sender(conn, i) for i, conn in enumerate(conns)))
        elapsed = time.perf_counter() - started
        consumed = await counter(metrics, "pgpush_notifications_total") - start_count
        after = sample(target.pids())
        usage = float(await conns[0].fetchval("SELECT pg_notification_queue_usage()"))
        drain_started = time.perf_counter()
        drain: float | None = None
        while time.perf_counter() - drain_started < 120:
            if await counter(metrics, "pgpush_notifications_total") - start_count >= sent:
                drain = time.perf_counter() - drain_started
                break
            await asyncio.sleep(0.1)
    finally:
        for conn in conns:
            await conn.close()
    return ListenerPoint(
        hints,
        recipients_per_hint,
        sent / elapsed,
        consumed / elapsed,
        cpu_percent(before, after),
        drain,
        usage,
    )


async def listener_points(
    pg: CeilingPostgres, *, streams: int, senders: int, batch: int, seconds: float
) -> list[ListenerPoint]:
    """Start pgpush (alone on core 0) with `streams` streams open, then one point per kind of hint."""
    # From here on new backends (the senders', pgpush's) share core 1 with this process; pgpush has core 0.
    pin_pid(pg.postmaster, CLIENT_CPU)
    pin_self(CLIENT_CPU)
    held = [f"held{i:06d}" for i in range(streams)]
    counter_of = [0]

    def strangers(_rng: random.Random, seed: int) -> list[str]:
        counter_of[0] += 1
        return [f"elsewhere{seed}-{counter_of[0]}-{i}" for i in range(batch)]

    def ours(rng: random.Random, _seed: int) -> list[str]:
        return rng.sample(held, min(batch, len(held)))

    def ours_grouped(rng: random.Random, _seed: int) -> list[str]:
        # Postgres folds identical payloads within a transaction: only distinct ones are sent and counted.
        hints = ("\n".join(sorted(rng.sample(held, min(100, len(held))))) for _ in range(max(1, batch // 10)))
        return list(dict.fromkeys(hints))

    kinds: list[tuple[str, Callable[[random.Random, int], list[str]], int]] = [
        ("recipients without a stream here", strangers, 1),
        ("recipients with a stream here", ours, 1),
        ("100 recipients with a stream here", ours_grouped, 100),
    ]
    target = await targets_mod.start("pgpush", pg.url, pin=True)
    transports: list[asyncio.BaseTransport] = []
    try:
        transports = await open_streams(target, held)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{target.port}", timeout=30) as metrics:
            await _until(lambda: _gauge_is(metrics, "pgpush_streams", streams), 30)
            results = []
            for hints, payloads, per_hint in kinds:
                print(f"[ceiling] listener: {hints} …", file=sys.stderr, flush=True)
                results.append(
                    await listener_point(
                        pg,
                        target,
                        metrics,
                        hints=hints,
                        payloads=payloads,
                        recipients_per_hint=per_hint,
                        senders=senders,
                        seconds=seconds,
                    )
                )
            return results
    finally:
        for transport in transports:
            transport.close()
        await asyncio.to_thread(target.stop)


async def _gauge_is(client: httpx.AsyncClient, name: str, value: float) -> bool:
    return await counter(client, name) == value


async def _until(check: Callable[[], Awaitable[bool]], within: float) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not met within {within}s")
        await asyncio.sleep(0.1)


# --- the report --------------------------------------------------------------------------------------


def insert_table(points: list[InsertPoint]) -> str:
    by_key = {(p.commit, p.writers, p.rows_per_statement, p.table): p for p in points}
    lines = [
        "| synchronous_commit | writers | rows/statement | no trigger rows/s | seq trigger, no NOTIFY "
        "| pgpush rows/s | pgpush / no trigger | pgpush batched rows/s | batched / pgpush "
        "| pgpush statements/s | Postgres CPU % | batched Postgres CPU % |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]

    def rate(point: InsertPoint | None) -> str:
        return f"{point.rows_per_s:,.0f}" if point else "-"

    for commit, writers, rows, table in list(by_key):
        if table != "messages":
            continue
        plain, quiet, pushed, batched = (by_key.get((commit, writers, rows, t)) for t in TABLES)
        assert pushed is not None
        ratio = f"{pushed.rows_per_s / plain.rows_per_s:.2f}" if plain else "-"
        gain = f"{batched.rows_per_s / pushed.rows_per_s:.2f}" if batched else "-"
        batched_cpu = f"{batched.pg_cpu:.0f}" if batched else "-"
        lines.append(
            f"| {commit} | {writers} | {rows} | {rate(plain)} | {rate(quiet)} | {rate(pushed)} | {ratio} "
            f"| {rate(batched)} | {gain} | {pushed.statements_per_s:,.0f} | {pushed.pg_cpu:.0f} "
            f"| {batched_cpu} |"
        )
    return "\n".join(lines)


def listener_table(points: list[ListenerPoint]) -> str:
    lines = [
        "| hints naming | recipients/hint | sent hints/s | consumed hints/s | recipients/s | pgpush CPU % "
        "| pgpush CPU µs/hint | backlog drained in | queue usage |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for p in points:
        drain = "gave up" if p.drain_s is None else f"{p.drain_s:.1f} s"
        lines.append(
            f"| {p.hints} | {p.recipients_per_hint} | {p.sent_per_s:,.0f} | {p.consumed_per_s:,.0f} "
            f"| {p.consumed_per_s * p.recipients_per_hint:,.0f} | {p.server_cpu:.0f} "
            f"| {p.server_cpu / 100 / p.consumed_per_s * 1e6:.1f} | {drain} "
            f"| {p.queue_usage:.4f} |"
        )
    return "\n".join(lines)


# --- the command -------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.notify_ceiling", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--seconds", type=float, default=5, help="length of each point (5)")
    parser.add_argument("--writers", type=_ints, default=[1, 4, 16], help="concurrent writers (1,4,16)")
    parser.add_argument("--rows", type=_ints, default=[1, 100], help="rows per statement (1,100)")
    parser.add_argument("--commit", default="on,off", help="synchronous_commit values to try (on,off)")
    parser.add_argument("--users", type=int, default=100_000, help="recipients the writers spread over")
    parser.add_argument("--streams", type=int, default=1000, help="streams pgpush holds in part 3 (1000)")
    parser.add_argument("--senders", type=int, default=4, help="NOTIFY connections in part 3 (4)")
    parser.add_argument("--batch", type=int, default=100, help="notifications per sender statement (100)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per insert point, best kept (1)")
    parser.add_argument(
        "--replicas",
        type=_ints,
        default=[0, 3, 10, 30],
        help="listening connections to try in part 2 (0,3,10,30; empty: skip)",
    )
    parser.add_argument("--listen-child", nargs=2, metavar=("URL", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--skip-inserts", action="store_true")
    parser.add_argument("--skip-listener", action="store_true")
    return parser.parse_args(argv)


async def run(args: argparse.Namespace) -> None:
    raise_fd_limit()
    root = Path(tempfile.mkdtemp(prefix="pgpush-ceiling-"))
    users = [f"user{i:07d}" for i in range(args.users)]
    pg = CeilingPostgres(root)
    try:
        await pg.start(users)
        print(f"Machine: {machine()}; Postgres {await pg.version()}, durable, data in {root}\n")
        if not args.skip_inserts:
            points = []
            for commit in args.commit.split(","):
                for rows in args.rows:
                    for writers in args.writers:
                        points += await best_of(
                            args.repeat,
                            pg,
                            writers=writers,
                            rows=rows,
                            commit=commit,
                            users=users,
                            seconds=args.seconds,
                        )
            print(
                f"Inserts ({args.seconds:g} s per point, best of {args.repeat}, recipients drawn from "
                f"{len(users):,}):\n"
            )
            print(insert_table(points) + "\n", flush=True)
        if args.replicas:
            found_replicas = await replica_points(
                pg, args.replicas, commits=args.commit.split(","), users=users, seconds=args.seconds
            )
            print(
                f"Single-row inserts into messages, {REPLICA_WRITERS} writers, with N other connections "
                "LISTENing on the channel (as N replicas' listeners do) in a separate process:\n"
            )
            print(replica_table(found_replicas) + "\n", flush=True)
        if not args.skip_listener:
            found = await listener_points(
                pg, streams=args.streams, senders=args.senders, batch=args.batch, seconds=args.seconds
            )
            print(
                f"One pgpush process (alone on core 0) holding {args.streams:,} streams; {args.senders} "
                f"connections NOTIFY in batches of {args.batch} per transaction for {args.seconds:g} s:\n"
            )
            print(listener_table(found), flush=True)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(pg.stop)
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    args = _args(argv)
    if args.listen_child:
        asyncio.run(_listen_child(args.listen_child[0], int(args.listen_child[1])))
    else:
        asyncio.run(run(args))


if __name__ == "__main__":
    main()

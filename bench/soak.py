"""`python -m bench.soak`: a long run under churn that proves nothing is lost, duplicated or reordered.

N clients hang up at random and reconnect with their Last-Event-ID (as EventSource does), writers insert rows
at a chosen rate, and the listening backend is killed at random. At the end every client must hold exactly
the rows of its user (the table is the truth), in order, once. Prints the counts; exits 1 on any loss.

By default it starts its own Postgres (pgpush.embedded, in a temporary folder) and its own `pgpush serve`;
`--database-url` uses an existing, migrated database instead, and `--url` (with `--database-url` and
`--jwt-secret`) an already running server.

    python -m bench.soak --duration 600 --clients 200 --rate 200
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
from pgpush.auth import mint_token
from pgpush.db import UNAVAILABLE_ERRORS
from pgpush.embedded import EmbeddedPostgres
from pgpush.migrate import migrate

from tests.faults.client import ResumingClient
from tests.faults.ledger import Ledger, Tally
from tests.faults.writers import INSERT_KEYED, SEQS_OF_KEY, committed
from tests.polling import wait_until

KILL_LISTENER = """
SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
WHERE application_name = 'pgpush-listener' AND datname = current_database()
"""
PROGRESS_EVERY = 30.0
CATCH_UP_SECONDS = 60.0


@dataclass
class Counters:
    """What happened during the run, besides the ledger."""

    kills: int = 0
    hangups: int = 0
    write_retries: int = 0
    started: float = field(default_factory=time.monotonic)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60, help="seconds of writing (default 60)")
    parser.add_argument("--clients", type=int, default=50, help="concurrent logical clients (default 50)")
    parser.add_argument("--users", type=int, help="distinct users (default: clients / 2)")
    parser.add_argument("--rate", type=float, default=100, help="rows per second, all writers (default 100)")
    parser.add_argument("--writers", type=int, default=4, help="writer connections (default 4)")
    parser.add_argument(
        "--hangup-every", type=float, default=10, help="mean seconds a client stays (default 10)"
    )
    parser.add_argument("--kill-every", type=float, default=20, help="mean seconds between listener kills")
    parser.add_argument("--max-retry-delay", type=float, default=1.0, help="cap on a client's retry wait (s)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    parser.add_argument("--url", help="a running pgpush (needs --database-url and --jwt-secret)")
    parser.add_argument("--database-url", help="an existing migrated database (default: an embedded one)")
    parser.add_argument("--jwt-secret", help="the server's PGPUSH_JWT_SECRET (only with --url)")
    args = parser.parse_args(argv)
    if args.url and not (args.database_url and args.jwt_secret):
        parser.error("--url needs --database-url (to write rows) and --jwt-secret (to mint tokens)")
    if args.clients < 1 or args.rate <= 0 or args.writers < 1 or args.duration <= 0:
        parser.error("--clients, --rate, --writers and --duration must be positive")
    args.users = args.users or max(1, args.clients // 2)
    args.seed = args.seed if args.seed is not None else random.randrange(2**32)
    return args


# --- what the soak runs against ------------------------------------------------------------------------


@asynccontextmanager
async def database(url: str | None) -> AsyncIterator[str]:
    """The given database, or a fresh embedded Postgres with a migrated `soak` database."""
    if url:
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="pgpush-soak-") as tmp:
        cluster = EmbeddedPostgres(Path(tmp) / "pg", durable=False)
        admin = await asyncio.to_thread(cluster.start)
        try:
            conn = await asyncpg.connect(admin)
            await conn.execute("CREATE DATABASE soak")
            await conn.close()
            soak_url = urlunsplit(urlsplit(admin)._replace(path="/soak"))
            await asyncio.to_thread(migrate, soak_url)
            yield soak_url
        finally:
            await asyncio.to_thread(cluster.stop, "immediate")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def server(args: argparse.Namespace, database_url: str) -> AsyncIterator[tuple[str, str]]:
    """(base URL, JWT secret) of the server under test: the given one, or a `pgpush serve` of our own."""
    if args.url:
        yield args.url.rstrip("/"), args.jwt_secret
        return
    secret = secrets.token_urlsafe(48)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGPUSH_") and k != "DATABASE_URL"}
    env |= {
        "DATABASE_URL": database_url,
        "PGPUSH_JWT_SECRET": secret,
        "PGPUSH_PORT": str(port),
        "PGPUSH_LOG_LEVEL": "warning",
        "PGPUSH_MAX_STREAMS_PER_USER": str(max(10, 2 * -(-args.clients // args.users))),
    }
    process, log_path = _spawn_server(env)
    url = f"http://127.0.0.1:{port}"
    try:
        async with asyncio.timeout(60), httpx.AsyncClient(base_url=url) as client:
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"pgpush serve exited with {process.returncode}; see {log_path}")
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get("/readyz")).status_code == 200:
                        break
                await asyncio.sleep(0.1)
        yield url, secret
    finally:
        await asyncio.to_thread(_stop_server, process, log_path)


def _spawn_server(env: dict[str, str]) -> tuple[subprocess.Popen[bytes], Path]:
    """`python -m pgpush serve` with its log in a temporary file (kept only if something goes wrong)."""
    with tempfile.NamedTemporaryFile("w+", prefix="pgpush-soak-server-", suffix=".log", delete=False) as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "pgpush", "serve"], env=env, stdout=subprocess.DEVNULL, stderr=log
        )
    return process, Path(log.name)


def _stop_server(process: subprocess.Popen[bytes], log_path: Path) -> None:
    """SIGTERM (a drained shutdown that exits 0), SIGKILL after 30 s."""
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        code = process.wait()
    if code != 0:
        print(f"soak: pgpush serve exited with {code}; its log: {log_path}", file=sys.stderr)
    else:
        log_path.unlink(missing_ok=True)


# --- the actors ------------------------------------------------------------------------------------------


async def write_at_rate(
    stop: asyncio.Event,
    database_url: str,
    users: list[str],
    ledger: Ledger,
    counters: Counters,
    *,
    writer: int,
    interval: float,
    rng: random.Random,
) -> None:
    """One row every `interval` seconds for a random user, keyed so a retried statement never doubles."""
    conn: asyncpg.Connection | None = None
    loop = asyncio.get_running_loop()
    due = loop.time() + rng.random() * interval
    n = 0
    while not stop.is_set():
        delay = due - loop.time()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                break
        due += interval
        recipients = [rng.choice(users)]
        key = f"soak-w{writer}-{n}"
        data = json.dumps({"writer": writer, "n": n, "at": time.time()})
        while True:
            try:
                if conn is None:
                    conn = await asyncpg.connect(database_url, timeout=5)
                rows = await conn.fetch(INSERT_KEYED, recipients, data, key, timeout=10)
                if len(rows) < len(recipients):
                    rows = await conn.fetch(SEQS_OF_KEY, recipients, key, timeout=10)
                break
            except (*UNAVAILABLE_ERRORS, asyncpg.InternalClientError):
                counters.write_retries += 1
                if conn is not None:
                    conn.terminate()
                    conn = None
                await asyncio.sleep(0.1)
        for row in rows:
            ledger.record_sent(row["recipient"], row["seq"])
        n += 1
    if conn is not None:
        await conn.close()


async def kill_listener(
    stop: asyncio.Event, database_url: str, mean: float, counters: Counters, rng: random.Random
) -> None:
    """pg_terminate_backend on the listening connection, at exponentially distributed intervals."""
    conn = await asyncpg.connect(database_url)
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), rng.expovariate(1 / mean))
            if not stop.is_set():
                counters.kills += await conn.fetchval(KILL_LISTENER)
    finally:
        await conn.close()


async def hang_up_at_random(
    stop: asyncio.Event, client: ResumingClient, mean: float, counters: Counters, rng: random.Random
) -> None:
    """Drop the client's connection now and then; its run loop reconnects with its Last-Event-ID."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), rng.expovariate(1 / mean))
        if not stop.is_set() and client.current is not None:
            await client.hang_up()
            counters.hangups += 1


async def report_progress(
    stop: asyncio.Event, ledger: Ledger, clients: list[ResumingClient], counters: Counters
) -> None:
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), PROGRESS_EVERY)
        sent = sum(len(seqs) for seqs in ledger.sent.values())
        received = sum(len(log.seqs) for log in ledger.clients.values())
        connected = sum(1 for c in clients if c.current is not None)
        print(
            f"soak: {time.monotonic() - counters.started:6.0f}s sent {sent} received {received} "
            f"connected {connected}/{len(clients)} hang-ups {counters.hangups} "
            f"listener kills {counters.kills}",
            flush=True,
        )


# --- the run ---------------------------------------------------------------------------------------------


async def soak(args: argparse.Namespace) -> Tally:
    rng = random.Random(args.seed)
    async with database(args.database_url) as database_url, server(args, database_url) as (url, secret):
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        users = [f"soak-user-{u}" for u in range(args.users)]
        ledger = Ledger()
        counters = Counters()
        ttl = int(args.duration + CATCH_UP_SECONDS + 3600)
        clients = [
            ResumingClient(
                host,
                port,
                mint_token(secret, users[c % len(users)], ttl_seconds=ttl),
                ledger.client(f"client-{c}", users[c % len(users)]).seqs,
                cursor=0,
                max_delay=args.max_retry_delay,
            )
            for c in range(args.clients)
        ]
        stop_clients, stop_churn, stop_writers = asyncio.Event(), asyncio.Event(), asyncio.Event()
        runners = [asyncio.create_task(c.run(stop_clients)) for c in clients]
        await wait_until(lambda: all(c.current for c in clients), within=60, what="every client connected")
        churn = [
            asyncio.create_task(hang_up_at_random(stop_churn, c, args.hangup_every, counters, rng))
            for c in clients
        ]
        churn.append(
            asyncio.create_task(kill_listener(stop_churn, database_url, args.kill_every, counters, rng))
        )
        churn.append(asyncio.create_task(report_progress(stop_churn, ledger, clients, counters)))
        interval = args.writers / args.rate
        writers = [
            asyncio.create_task(
                write_at_rate(
                    stop_writers, database_url, users, ledger, counters, writer=w, interval=interval, rng=rng
                )
            )
            for w in range(args.writers)
        ]
        counters.started = time.monotonic()
        try:
            await asyncio.sleep(args.duration)
        finally:
            stop_writers.set()
            await asyncio.gather(*writers)
            stop_churn.set()
            await asyncio.gather(*churn)
        writing = time.monotonic() - counters.started
        with contextlib.suppress(TimeoutError):
            await wait_until(ledger.caught_up, within=CATCH_UP_SECONDS, interval=0.2)
        await asyncio.sleep(1)  # a late duplicate would arrive now
        stop_clients.set()
        await asyncio.gather(*runners)

        truth = await committed(database_url)
        mine = {user: sorted(seqs) for user, seqs in ledger.sent.items()}
        if {u: s for u, s in truth.items() if u in set(users)} != mine:
            print(
                "soak: the writers' acknowledgements differ from the table; counting the table",
                file=sys.stderr,
            )
            ledger.sent = {u: s for u, s in truth.items() if u in set(users)}
        tally = ledger.tally()
        connections = sum(len(c.connections) for c in clients)
        refused = sum(c.refused for c in clients)
        not_ok = sum(1 for c in clients for status in c.statuses if status != 200)
        controls: dict[str, int] = {}
        for c in clients:
            for stream in c.connections:
                for event in stream.controls:
                    controls[event.type] = controls.get(event.type, 0) + 1
        print(
            f"soak: {writing:.0f}s of writing at {tally.sent / writing:.0f} rows/s, seed {args.seed}\n"
            f"soak: {args.clients} clients of {args.users} users, {connections} connections "
            f"({counters.hangups} hang-ups, {not_ok} refused with a status, {refused} unreachable), "
            f"{counters.kills} listener kills, {counters.write_retries} write retries, "
            f"control events {controls}\n"
            f"soak: {tally}"
        )
        for problem in tally.problems[:20]:
            print(f"soak:   {problem}")
        print(
            f"soak: sent={tally.sent} expected={tally.expected} received={tally.received} lost={tally.lost} "
            f"dup={tally.duplicated} out_of_order={tally.out_of_order} unexpected={tally.unexpected} "
            f"kills={counters.kills} hangups={counters.hangups} connections={connections}",
            flush=True,
        )
        return tally


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tally = asyncio.run(soak(args))
    return 0 if tally.exact else 1


if __name__ == "__main__":
    raise SystemExit(main())

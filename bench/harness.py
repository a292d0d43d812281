"""The scenarios: hold streams with the load generator, write rows, sample the server, summarise.

Each scenario runs against one started target and returns result rows (`Result`), one per size or rate.
"""

from __future__ import annotations

import array
import asyncio
import base64
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import database
from bench.database import BenchPostgres, WriteResult
from bench.system import CLIENT_CPU, cpu_percent, pinned, sample
from bench.targets import Target


@dataclass(frozen=True)
class Sizes:
    idle_streams: tuple[int, ...]
    idle_seconds: float
    users: int
    targeted_rates: tuple[float, ...]  # rows/s; 0 = as fast as it goes
    fan_out_rates: tuple[float, ...]  # statements/s
    step_seconds: float
    burst_rows: int
    # fan-out-multi: `users` users with this many streams each, one row per user per tick, at these ticks/s.
    streams_per_user: int = 10
    multi_rates: tuple[float, ...] = (5, 10, 15, 20, 30)
    # hold: open this many streams on a freshly started server (each step its own server), hold them.
    hold_streams: tuple[int, ...] = (10_000, 20_000, 100_000)
    hold_seconds: float = 60  # four 15 s heartbeat periods


STATS_FLUSH_SECONDS = 11.0
# hold: streams per load generator process, and source addresses per process (~28,000 ports each).
# A process may hold fewer than 20,000 files where the hard RLIMIT_NOFILE is 20,000 and cannot be raised
# (no CAP_SYS_RESOURCE), so each load generator holds at most 18,000 streams.
HOLD_STREAMS_PER_PROCESS = 18_000
HOLD_ADDRESSES_PER_PROCESS = 1
HOLD_OPEN_TIMEOUT_SECONDS = 20.0
HOLD_MAX_FAILURES = 200  # per load generator: past this the server is not taking streams any more

FULL = Sizes((1000, 5000, 10000, 20000), 10, 1000, (1000, 2000, 5000, 0), (10, 50, 100, 200), 10, 100_000)
QUICK = Sizes(
    (1000, 5000), 5, 1000, (1000, 5000, 0), (10, 50, 200), 4, 100_000, 10, (5, 15, 30), (10_000,), 20
)
SMOKE = Sizes((20,), 0.5, 20, (100,), (5,), 1, 200, 3, (5,), (30,), 1)


@dataclass
class Result:
    """One line of a scenario for one target: its step (size or rate) and measured values."""

    scenario: str
    step: str
    target: str
    values: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class LoadGenerators:
    """The load generator processes (pinned to the client core) and the commands sent to them."""

    def __init__(self) -> None:
        self.procs: list[asyncio.subprocess.Process] = []
        self._files: list[Path] = []

    async def add(self, target: Target, users: list[str], *, pin: bool, **options: Any) -> dict[str, Any]:
        """A new process holding one stream per entry of `users` (a name may repeat); its open report."""
        handle = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)  # noqa: SIM115
        with handle:
            requests = [target.request(u) for u in users]
            config = {"host": "127.0.0.1", "port": target.port, "requests": requests}
            json.dump({**config, **options}, handle)
        self._files.append(Path(handle.name))
        command = [sys.executable, "-m", "bench.loadgen", handle.name]
        proc = await asyncio.create_subprocess_exec(
            *(pinned(command, CLIENT_CPU) if pin else command),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=2**28,
        )
        self.procs.append(proc)
        (reply,) = await self._send([proc], {"cmd": "open"})
        return reply

    async def _send(
        self, procs: list[asyncio.subprocess.Process], command: dict[str, Any]
    ) -> list[dict[str, Any]]:
        line = (json.dumps(command) + "\n").encode()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(line)
            await proc.stdin.drain()
        replies = []
        for proc in procs:
            assert proc.stdout is not None
            text = await proc.stdout.readline()
            if not text:
                raise RuntimeError("a load generator died")
            replies.append(json.loads(text))
        return replies

    async def all(self, cmd: str, **kwargs: Any) -> list[dict[str, Any]]:
        return await self._send(self.procs, {"cmd": cmd, **kwargs})

    async def close(self) -> None:
        for proc in self.procs:
            if proc.returncode is None and proc.stdin is not None:
                proc.stdin.write(b'{"cmd": "quit"}\n')
                await proc.stdin.drain()
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        for path in self._files:
            path.unlink(missing_ok=True)


def users(n: int, prefix: str = "u") -> list[str]:
    return [f"{prefix}{i:05d}" for i in range(n)]


def percentile(values: array.array[float], q: float) -> float:
    if not values:
        return float("nan")
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


@dataclass
class Delivery:
    events: int
    first_receipt: float
    last_receipt: float
    latencies: array.array[float]
    client_cpu_seconds: float
    closed: int


def merge(replies: list[dict[str, Any]]) -> Delivery:
    latencies: array.array[float] = array.array("f")
    for reply in replies:
        latencies.frombytes(base64.b64decode(reply["latencies"]))
    firsts = [r["first_receipt"] for r in replies if r["first_receipt"]]
    return Delivery(
        events=sum(r["events"] for r in replies),
        first_receipt=min(firsts) if firsts else 0.0,
        last_receipt=max(r["last_receipt"] for r in replies),
        latencies=array.array("f", sorted(latencies)),
        client_cpu_seconds=sum(r["cpu_seconds"] for r in replies),
        closed=sum(r["closed"] for r in replies),
    )


def latency_values(d: Delivery) -> dict[str, float]:
    lat = d.latencies
    if not lat:
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan")}
    n = len(lat)
    return {"p50_ms": lat[n // 2], "p99_ms": lat[min(n - 1, int(0.99 * n))], "max_ms": lat[-1]}


async def _deliver(gens: LoadGenerators, expected: int, wait_s: float) -> Delivery:
    await gens.all("wait_events", n=expected, wait_s=wait_s, quiet=min(wait_s, 3.0))
    return merge(await gens.all("collect"))


# --- scenarios ---------------------------------------------------------------------------------------


async def idle(pg: BenchPostgres, target: Target, sizes: Sizes, *, pin: bool) -> list[Result]:
    """Open N streams (in steps), then measure RSS per stream, CPU and DB transactions while idle."""
    results = []
    gens = LoadGenerators()
    await asyncio.sleep(1)
    baseline = sample(target.pids())
    held = 0
    try:
        for n in sizes.idle_streams:
            report = await gens.add(target, users(n - held, prefix=f"i{held}_"), pin=pin)
            opened_in = report["seconds"]
            held = n
            opened_at = time.monotonic()
            await asyncio.sleep(1)  # let the server settle (replays, GC) before the idle window
            # The window ends before the first heartbeats (15 s after opening): "between heartbeats".
            before = sample(target.pids())
            await asyncio.sleep(sizes.idle_seconds)
            after = sample(target.pids())
            # Queries are counted later: an idle backend publishes its statistics up to 10 s late
            # (PGSTAT_IDLE_INTERVAL), which would bill the opening's queries to the idle window.
            await asyncio.sleep(max(0.0, opened_at + STATS_FLUSH_SECONDS - time.monotonic()))
            commits_at, commits_before = time.monotonic(), await pg.commits()
            await asyncio.sleep(sizes.idle_seconds)
            commits_after, commits_span = await pg.commits(), time.monotonic() - commits_at
            opened = sum(r["opened"] for r in await gens.all("collect"))
            # Our own two pg_stat_database reads commit once each; do not blame the server for them.
            db_rate = max(0, commits_after - commits_before - 1) / commits_span
            result = Result("idle", f"{n} streams", target.name)
            result.values = {
                "streams_open": opened,
                "open_s": opened_in,
                "rss_mb": after.rss_kb / 1024,
                "rss_per_stream_kb": (after.rss_kb - baseline.rss_kb) / max(1, opened),
                "cpu_pct": cpu_percent(before, after),
                "db_xact_per_s": db_rate,
            }
            if report["failed"]:
                result.notes.append(f"{report['failed']} streams failed to open ({report['statuses']})")
            results.append(result)
    finally:
        await gens.close()
    return results


async def _stream_users(
    target: Target, sizes: Sizes, pin: bool, per_user: int = 1
) -> tuple[LoadGenerators, list[str]]:
    names = users(sizes.users)
    gens = LoadGenerators()
    report = await gens.add(target, names * per_user, pin=pin)
    if report["failed"]:
        raise RuntimeError(
            f"{target.name}: {report['failed']} of {len(names) * per_user} streams failed to open"
        )
    await asyncio.sleep(1)
    return gens, names


async def _step(
    gens: LoadGenerators, target: Target, scenario: str, step: str, write: Any, expected_per_row: int = 1
) -> Result:
    await gens.all("mark")
    before = sample(target.pids())
    written: WriteResult = await write
    delivery = await _deliver(gens, written.rows * expected_per_row, wait_s=30)
    after = sample(target.pids())
    span = max(1e-6, delivery.last_receipt - delivery.first_receipt)
    result = Result(scenario, step, target.name)
    result.values = {
        "rows_per_s": written.rows / written.seconds,
        "delivered_per_s": delivery.events / span if delivery.events > 1 else 0.0,
        **latency_values(delivery),
        "lost": written.rows * expected_per_row - delivery.events,
        "server_cpu_pct": cpu_percent(before, after),
        "server_rss_mb": after.rss_kb / 1024,
        "client_cpu_pct": 100 * delivery.client_cpu_seconds / max(1e-6, after.at - before.at),
    }
    if delivery.closed:
        result.notes.append(f"{delivery.closed} streams closed by the server")
    return result


async def targeted(pg: BenchPostgres, target: Target, sizes: Sizes, *, pin: bool) -> list[Result]:
    """1,000 users; single-row transactions to random users at each offered rate."""
    gens, names = await _stream_users(target, sizes, pin)
    results = []
    try:
        for rate in sizes.targeted_rates:
            write = database.write_targeted(pg.url, names, rate, sizes.step_seconds)
            step = f"{int(rate)} rows/s" if rate else "max rows/s"
            results.append(await _step(gens, target, "targeted", step, write))
            await asyncio.sleep(1)
    finally:
        await gens.close()
    return results


async def fan_out(pg: BenchPostgres, target: Target, sizes: Sizes, *, pin: bool) -> list[Result]:
    """1,000 users; one INSERT … SELECT per tick writing one row for each user."""
    gens, names = await _stream_users(target, sizes, pin)
    results = []
    try:
        for rate in sizes.fan_out_rates:
            write = database.write_fan_out(pg.url, names, rate, sizes.step_seconds)
            results.append(await _step(gens, target, "fan-out", f"{int(rate)} stmts/s", write))
            await asyncio.sleep(1)
    finally:
        await gens.close()
    return results


async def fan_out_multi(pg: BenchPostgres, target: Target, sizes: Sizes, *, pin: bool) -> list[Result]:
    """1,000 users with 10 streams each; one INSERT … SELECT per tick writing one row per user.

    Every row is delivered to each of its user's streams: a tick of 1,000 rows is 10,000 events.
    """
    per_user = sizes.streams_per_user
    gens, names = await _stream_users(target, sizes, pin, per_user)
    results = []
    try:
        for rate in sizes.multi_rates:
            write = database.write_fan_out(pg.url, names, rate, sizes.step_seconds)
            step = f"{len(names)}x{per_user} streams, {int(rate)} ticks/s"
            results.append(await _step(gens, target, "fan-out-multi", step, write, expected_per_row=per_user))
            await asyncio.sleep(1)
    finally:
        await gens.close()
    return results


def source_addresses(process: int) -> list[str]:
    """The loopback addresses load generator `process` connects from (127.0.1.x: never 127.0.0.1)."""
    first = 1 + process * HOLD_ADDRESSES_PER_PROCESS
    return [f"127.0.1.{first + k}" for k in range(HOLD_ADDRESSES_PER_PROCESS)]


async def hold(pg: BenchPostgres, target: Target, sizes: Sizes, *, pin: bool) -> list[Result]:
    """Open N streams on a fresh server, hold them `hold_seconds` (heartbeats included): RSS, CPU, errors.

    The runner starts a new server for each size, so `open_s` is from zero streams and the RSS baseline is
    the freshly started server's. Streams are spread over several load generator processes and source
    addresses, so 100,000 fit the loopback's ephemeral ports.
    """
    (n,) = sizes.hold_streams
    gens = LoadGenerators()
    await asyncio.sleep(1)
    baseline = sample(target.pids())
    names = users(n, prefix="h")
    procs = max(1, math.ceil(n / HOLD_STREAMS_PER_PROCESS))
    chunks = [names[k::procs] for k in range(procs)]
    try:
        started = time.perf_counter()
        options = {"open_timeout": HOLD_OPEN_TIMEOUT_SECONDS, "max_failures": HOLD_MAX_FAILURES}
        reports = await asyncio.gather(
            *(
                gens.add(target, chunk, pin=pin, local_hosts=source_addresses(k), **options)
                for k, chunk in enumerate(chunks)
            )
        )
        open_s = time.perf_counter() - started
        opened = sum(r["opened"] for r in reports)
        failed = sum(r["failed"] for r in reports)
        skipped = sum(r["skipped"] for r in reports)
        statuses: dict[str, int] = {}
        for r in reports:
            for status, count in r["statuses"].items():
                statuses[status] = statuses.get(status, 0) + count
        await asyncio.sleep(1)
        await gens.all("mark")
        before = sample(target.pids())
        await asyncio.sleep(sizes.hold_seconds)
        after = sample(target.pids())
        collected = await gens.all("collect")
    finally:
        await gens.close()
    closed = sum(c["closed"] for c in collected)
    reads = sum(c["reads"] for c in collected)
    result = Result("hold", f"{n} streams", target.name)
    print(
        f"[bench] hold {n} streams, {target.name}: opened {opened}, failed {failed}, skipped {skipped}, "
        f"{open_s:.2f} s",
        file=sys.stderr,
        flush=True,
    )
    result.values = {
        "streams_open": opened - closed,
        "open_s": open_s,
        "rss_mb": after.rss_kb / 1024,
        "rss_per_stream_kb": (after.rss_kb - baseline.rss_kb) / max(1, opened),
        "cpu_pct": cpu_percent(before, after),
        "reads_per_stream": reads / max(1, opened),
        "client_cpu_pct": 100 * sum(c["cpu_seconds"] for c in collected) / max(1e-6, after.at - before.at),
        "errors": failed + skipped + closed,
    }
    if failed or skipped:
        result.notes.append(
            f"{failed} streams failed to open ({statuses}), {skipped} not tried after "
            f"{HOLD_MAX_FAILURES} failures in a load generator"
        )
    if closed:
        result.notes.append(f"{closed} streams closed by the server while held")
    return [result]


async def burst(pg: BenchPostgres, target: Target, sizes: Sizes, *, pin: bool) -> list[Result]:
    """All rows for 1,000 users in one statement: how long until the last is received."""
    gens, names = await _stream_users(target, sizes, pin)
    try:
        await gens.all("mark")
        before = sample(target.pids())
        started = time.time()
        written = await database.write_burst(pg.url, names, sizes.burst_rows)
        delivery = await _deliver(gens, written.rows, wait_s=60)
        after = sample(target.pids())
    finally:
        await gens.close()
    result = Result("burst", f"{sizes.burst_rows} rows", target.name)
    span = max(1e-6, delivery.last_receipt - delivery.first_receipt)
    last = delivery.last_receipt
    result.values = {
        "statement_s": written.seconds,
        "last_after_commit_s": last - written.last_commit if delivery.events else float("nan"),
        "last_after_start_s": last - started if delivery.events else float("nan"),
        "delivered_per_s": delivery.events / span,
        "lost": written.rows - delivery.events,
        "server_cpu_pct": cpu_percent(before, after),
        "server_rss_mb": after.rss_kb / 1024,
    }
    return [result]


SCENARIOS = {
    "idle": idle,
    "targeted": targeted,
    "fan-out": fan_out,
    "fan-out-multi": fan_out_multi,
    "burst": burst,
    "hold": hold,
}
# Scenarios run once per size, each against a freshly started server (the field of Sizes they step over).
PER_SIZE_RESTART = {"hold": "hold_streams"}

"""The results table (values with ratios against pgpush) and bench/RESULTS.md."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from bench.harness import Result
from bench.targets import DESCRIPTIONS

RESULTS_MD = Path(__file__).parent / "RESULTS.md"
# The values worth a row in the table, per scenario, with how to print them.
COLUMNS = {
    "idle": ["open_s", "rss_per_stream_kb", "cpu_pct", "db_xact_per_s", "streams_open"],
    "targeted": ["rows_per_s", "delivered_per_s", "p50_ms", "p99_ms", "max_ms", "lost", "server_cpu_pct"],
    "fan-out": ["rows_per_s", "delivered_per_s", "p50_ms", "p99_ms", "max_ms", "lost", "server_cpu_pct"],
    "fan-out-multi": [
        "rows_per_s",
        "delivered_per_s",
        "p50_ms",
        "p99_ms",
        "max_ms",
        "lost",
        "server_cpu_pct",
        "client_cpu_pct",
    ],
    "hold": [
        "open_s",
        "streams_open",
        "errors",
        "rss_per_stream_kb",
        "rss_mb",
        "cpu_pct",
        "reads_per_stream",
        "client_cpu_pct",
    ],
    "burst": ["last_after_commit_s", "statement_s", "delivered_per_s", "lost", "server_cpu_pct"],
}


def fmt(value: float) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table(results: Sequence[Result], targets: Sequence[str]) -> str:
    """A Markdown table: one row per (scenario, step, value), one column per target, ratios vs pgpush."""
    header = "| scenario | step | value | " + " | ".join(targets) + " |"
    lines = [header, "|" + " --- |" * (3 + len(targets))]
    keys: list[tuple[str, str]] = []
    for r in results:
        if (r.scenario, r.step) not in keys:
            keys.append((r.scenario, r.step))
    found = {(r.scenario, r.step, r.target): r for r in results}
    for scenario, step in keys:
        for name in COLUMNS[scenario]:
            cells = []
            base = found.get((scenario, step, "pgpush"))
            base_value = base.values.get(name) if base else None
            for target in targets:
                r = found.get((scenario, step, target))
                value = r.values.get(name) if r else None
                if value is None:
                    cells.append("n/a")
                    continue
                cell = fmt(value)
                if target != "pgpush" and base_value and not math.isnan(base_value) and not math.isnan(value):
                    cell += f" ({value / base_value:.2g}x)"
                cells.append(cell)
            lines.append(f"| {scenario} | {step} | {name} | " + " | ".join(cells) + " |")
    notes = [f"- {r.target}, {r.scenario} {r.step}: {note}" for r in results for note in r.notes]
    return "\n".join(lines) + ("\n\nNotes:\n" + "\n".join(notes) if notes else "")


METHOD = """## Method

- The server under test runs alone on core 0 (`taskset -c 0`); the load generator, the writers and the
  bench's own Postgres (a durable throwaway cluster, `pgpush.embedded.EmbeddedPostgres`) share core 1.
- The load generator (`bench/loadgen.py`) is a separate uvloop process speaking raw HTTP/1.1 over asyncio
  Protocols; its CPU over the step is reported as `client_cpu_pct` (near 100 % means the client, not the
  server, bounds the delivered rate).
- Every row carries `{"t": clock_timestamp() in epoch ms}` set inside its INSERT; latency is receipt time
  minus that stamp. Writers use `synchronous_commit = off` for their sessions so WAL flushes do not add disk
  noise to every target alike (a commit is visible and notified before its flush either way).
- targeted: single-row transactions from 8 sessions to pseudo-random users of 1,000 with one stream each.
  fan-out: one `INSERT … SELECT` per tick writing one row per user (4 sessions pace the ticks).
  burst: one statement writing all rows round-robin over 1,000 users; `last_after_commit_s` is the last
  receipt minus the moment the statement returned.
  fan-out-multi: 1,000 users with 10 streams each (10,000 streams), one `INSERT … SELECT` per tick writing
  one row per user, so each tick is 1,000 rows and 10,000 events; the tick rate rises step by step.
- hold: each size against a freshly started server: open N streams from zero (`open_s`, several load
  generator processes, each connecting from its own 127.0.1.x source addresses so 100,000 fit the
  loopback's ephemeral ports), then hold them `hold_seconds` (60 s: four 15 s heartbeat periods).
  `cpu_pct` is the server's over that window, heartbeats included; `rss_per_stream_kb` is (RSS at the end
  minus the fresh server's) / streams opened; `reads_per_stream` is socket reads per stream while held
  (the heartbeats seen); `errors` is streams that failed to open plus streams the server closed.
- Server CPU and RSS are read from /proc/<pid>/stat and statm (nchan: nginx master + worker + relay).
  Idle `db_xact_per_s` is the bench database's `pg_stat_database.xact_commit` delta while idle.
- nchan has no Postgres integration: `bench/peers/relay.py` LISTENs, reads new rows exactly like the
  Python peers and POSTs each to nchan's publisher, on nchan's core. Publishing straight from the writer
  would skip the table read every other target pays and would not be a design anyone can deploy on top of a
  messages table, so the relay is the fairer choice; its CPU is counted in nchan's.
- Peers' streams are `GET /events?user=NAME` without auth; pgpush's carry a Bearer JWT (verified per open).
- pgpush runs with PGPUSH_LOG_LEVEL=warning (no per-stream open/close log lines); peers with uvicorn
  `--log-level warning --no-access-log`.
"""


def write_results_md(sections: dict[str, str], machine: str, targets: Sequence[str]) -> None:
    """(Re)write RESULTS.md with one table per scenario run this time, keeping the others' sections."""
    existing = _read_sections()
    existing.update(sections)
    peers = "\n".join(f"- **{t}**: {DESCRIPTIONS[t]}" for t in targets)
    body = [
        "# pgpush benchmark results",
        "",
        "Regenerated by `python -m bench run …`: each scenario's section (its command and table) is replaced",
        "when that scenario is run again.",
        "Values are followed by their ratio to pgpush's in the same run.",
        "",
        f"Machine: {machine}.",
        "",
        "Targets:",
        peers,
        "",
        "Setup: `apt-get install -y nginx-light libnginx-mod-nchan` (for nchan), "
        "`pip install sse-starlette py-spy` (peers, profiling); uvloop and httptools come with pgpush.",
        "",
        METHOD,
    ]
    for scenario, text in existing.items():
        if scenario == "Method":
            continue
        body += [f"## {scenario}", "", text.strip(), ""]
    RESULTS_MD.write_text("\n".join(body))


def _read_sections() -> dict[str, str]:
    if not RESULTS_MD.exists():
        return {}
    sections: dict[str, str] = {}
    current: str | None = None
    for line in RESULTS_MD.read_text().splitlines():
        if line.startswith("## "):
            current = line[3:].strip()
            sections[current] = ""
        elif current is not None:
            sections[current] += line + "\n"
    return sections

"""`python -m bench.notify_ceiling` still runs end to end and prints the three tables docs/scaling.md shows.

A tiny run on the harness's own throwaway Postgres: only that the figures exist and say what they should
(rows went in, batching coalesced notifications, the listener consumed hints), never how fast.
"""

from __future__ import annotations

import itertools
import subprocess
import sys

TINY_RUN = [
    *("--seconds", "0.5", "--writers", "2", "--rows", "1,3", "--commit", "off", "--users", "100"),
    *("--replicas", "0,2", "--streams", "10", "--senders", "1", "--batch", "10"),
]


def markdown_tables(text: str) -> list[list[dict[str, str]]]:
    """Every markdown table in `text`, as rows of {header: cell}."""
    tables = []
    for is_table, group in itertools.groupby(text.splitlines(), key=lambda line: line.startswith("|")):
        if is_table:
            header, _rule, *rows = ([cell.strip() for cell in line.strip("|").split("|")] for line in group)
            tables.append([dict(zip(header, row, strict=True)) for row in rows])
    return tables


def number(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("%"))


def test_the_ceiling_harness_prints_inserts_replicas_and_listener_tables() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.notify_ceiling", *TINY_RUN],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    inserts, replicas, listener = markdown_tables(done.stdout)

    assert [row["rows/statement"] for row in inserts] == ["1", "3"]
    for row in inserts:
        for column in ("no trigger rows/s", "pgpush rows/s", "pgpush batched rows/s"):
            assert number(row[column]) > 0, row
    without_listener, with_two = replicas
    assert without_listener["heard by each"] == "-"
    assert number(with_two["heard by each"]) > 0
    # Batched, one notification names the recipients of many statements.
    assert number(with_two["batched: heard per statement"]) < 50
    assert len(listener) == 3
    assert all(number(row["consumed hints/s"]) > 0 for row in listener)

"""A short run of bench/soak.py: clients hanging up and resuming, the listener killed, nothing lost."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys

import pytest

from tests.serve_process import cli_environment

FIGURES = re.compile(
    r"^soak: sent=(\d+) expected=(\d+) received=(\d+) lost=(\d+) dup=(\d+) "
    r"out_of_order=(\d+) unexpected=(\d+) kills=(\d+) hangups=(\d+) connections=(\d+)$",
    re.M,
)


@pytest.mark.timeout(90)
async def test_a_short_soak_with_churn_and_listener_kills_loses_nothing(database_url: str) -> None:
    command = [
        sys.executable, "-m", "bench.soak",
        "--duration", "6", "--clients", "20", "--rate", "150",
        "--hangup-every", "2", "--kill-every", "1.5", "--seed", "4",
        "--database-url", database_url,
    ]  # fmt: skip
    env = cli_environment(None)
    run = await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=80, env=env
    )
    print(run.stdout)
    found = FIGURES.search(run.stdout)
    assert run.returncode == 0 and found, f"{run.returncode}\n{run.stdout}\n{run.stderr}"
    sent, expected, received, lost, dup, late, strays, kills, hangups, connections = map(int, found.groups())
    assert (lost, dup, late, strays) == (0, 0, 0, 0)
    assert sent > 600 and expected == received == 2 * sent
    # Kills and hang-ups are random (seeded, but timing decides when each lands): ask for some of each.
    assert kills >= 1 and hangups >= 15 and connections > 20 + hangups // 2

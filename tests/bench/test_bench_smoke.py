"""The benchmark harness still runs end to end: tiny targeted and burst runs against pgpush and a peer."""

from __future__ import annotations

import asyncio
import math

from bench.__main__ import run
from bench.harness import SMOKE
from bench.report import table


async def test_targeted_smoke_run_delivers_every_row_to_pgpush_streams(database_url: str) -> None:
    results = await asyncio.wait_for(
        run("targeted", ["pgpush"], SMOKE, database_url=database_url, pin=False), timeout=60
    )

    (result,) = results
    assert result.values["lost"] == 0
    assert result.values["rows_per_s"] > 0
    assert 0 < result.values["p50_ms"] <= result.values["p99_ms"] < 5000
    assert result.values["server_rss_mb"] > 10
    assert "| targeted | 100 rows/s | p99_ms |" in table(results, ["pgpush"])


async def test_the_raw_asgi_peer_still_understands_pgpush_notifications(database_url: str) -> None:
    # The peers read the same table and notifications as pgpush; a change to the notification format
    # (migration 0002 made small statements carry their rows) once left them delivering nothing.
    (result,) = await asyncio.wait_for(
        run("targeted", ["raw"], SMOKE, database_url=database_url, pin=False), timeout=60
    )

    assert result.values["lost"] == 0
    assert result.values["delivered_per_s"] > 0


async def test_burst_smoke_run_receives_the_whole_statement(database_url: str) -> None:
    (result,) = await asyncio.wait_for(
        run("burst", ["pgpush"], SMOKE, database_url=database_url, pin=False), timeout=60
    )

    assert result.values["lost"] == 0
    assert not math.isnan(result.values["last_after_commit_s"])
    assert result.values["delivered_per_s"] > 0


async def test_fan_out_with_several_streams_per_user_delivers_every_row_to_every_stream(
    database_url: str,
) -> None:
    (result,) = await asyncio.wait_for(
        run("fan-out-multi", ["pgpush"], SMOKE, database_url=database_url, pin=False), timeout=60
    )

    # 20 users x 3 streams: every row of a tick reaches all three of its user's streams, none lost.
    assert result.step == "20x3 streams, 5 ticks/s"
    assert result.values["rows_per_s"] > 0
    assert result.values["lost"] == 0
    assert result.values["delivered_per_s"] > 0
    assert "| fan-out-multi | 20x3 streams, 5 ticks/s | client_cpu_pct |" in table([result], ["pgpush"])


async def test_hold_opens_streams_on_a_fresh_server_and_keeps_them_all(database_url: str) -> None:
    (result,) = await asyncio.wait_for(
        run("hold", ["pgpush"], SMOKE, database_url=database_url, pin=False), timeout=60
    )

    assert result.step == "30 streams"
    assert result.values["streams_open"] == 30
    assert result.values["errors"] == 0
    assert result.values["rss_mb"] > 10

"""A client that stops reading while 50,000 rows arrive for it (protocol §2.4): the server's memory stays
bounded because the stream is cut, and on reconnect with its Last-Event-ID the client gets every row."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import asyncpg
import pytest

from tests.conftest import make_token
from tests.faults.ledger import Ledger
from tests.polling import wait_until
from tests.serve_process import HOST, ServerProcess
from tests.sse_client import SSEStream

ROWS = 50_000
BATCH = 1_000
# ~4 KiB per row: 50,000 rows are ~200 MB of frames, so a server that buffered them would blow the bound.
PAYLOAD = (
    "SELECT 'alice', jsonb_build_object('n', n, 'pad', repeat(md5(n::text), 128)) "
    "FROM generate_series($1::int, $2::int) n"
)
MiB = 1024 * 1024
RSS_GROWTH_BOUND = 150 * MiB


@pytest.fixture
async def serve(database_url: str) -> AsyncIterator[ServerProcess]:
    server = ServerProcess(database_url, log_level="warning")
    await server.ready()
    yield server
    await server.stop()


async def sample_rss(server: ServerProcess, peak: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set() and server.process.poll() is None:
        peak[0] = max(peak[0], server.rss_bytes())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.02)


@pytest.mark.timeout(300)
async def test_a_stalled_client_is_cut_memory_stays_bounded_and_it_resumes_with_all_rows(
    serve: ServerProcess, db: asyncpg.Connection
) -> None:
    token = make_token("alice")
    ledger = Ledger()
    log = ledger.client("alice", "alice")
    # Warm up every code path once, so the baseline is the server's steady size.
    warm = await SSEStream.open(HOST, serve.port, make_token("bob"))
    await db.execute("INSERT INTO messages (recipient, data) VALUES ('bob', '1')")
    await wait_until(lambda: warm.seqs != [])
    await warm.close()
    baseline = serve.rss_bytes()
    peak = [baseline]
    stop_sampling = asyncio.Event()
    sampler = asyncio.create_task(sample_rss(serve, peak, stop_sampling))

    stalled = await SSEStream.open(HOST, serve.port, token, seqs=log.seqs, read=False)
    assert stalled.status == 200  # registered with the hub before the response head is sent
    for first in range(1, ROWS + 1, BATCH):
        rows = await db.fetch(
            f"INSERT INTO messages (recipient, data) {PAYLOAD} RETURNING seq", first, first + BATCH - 1
        )
        for row in rows:
            ledger.record_sent("alice", row["seq"])

    async def cut() -> bool:
        return await serve.metric("pgpush_streams_closed_total", reason="overflow") == 1

    await wait_until(cut, within=120, what="the stalled stream was cut for overflowing")
    assert await serve.metric("pgpush_streams") == 0
    stalled.start_reading()  # what the kernel buffered before the cut, then the server's close
    await asyncio.wait_for(stalled.closed.wait(), 30)
    cut_after = len(log.seqs)
    assert cut_after < ROWS, "the stream was cut before everything was sent"

    resumed = await SSEStream.open(
        HOST, serve.port, token, last_event_id=stalled.last_event_id or 0, seqs=log.seqs
    )
    await wait_until(lambda: len(log.seqs) >= ROWS, within=60, what="the resumed stream received every row")
    await asyncio.sleep(0.2)
    await resumed.close()
    stop_sampling.set()
    await sampler

    growth = peak[0] - baseline
    tally = ledger.assert_exact()
    print(f"\nslow consumer: {tally}; cut after {cut_after} rows; RSS growth {growth / MiB:.1f} MiB")
    assert tally.received == ROWS
    assert growth < RSS_GROWTH_BOUND, f"the server grew by {growth / MiB:.0f} MiB"

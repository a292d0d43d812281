"""`pgpush_delivery_latency_seconds` measures live delivery only: replayed rows stay out of it.

An ordinary reconnect replays rows written seconds or hours ago; counted in the histogram an alert watches,
they looked like a delivery delay. A real `pgpush serve` replays old rows to a new stream, then delivers a
live one: only the live one is observed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from tests.conftest import make_token
from tests.polling import wait_until
from tests.serve_process import HOST, ServerProcess
from tests.sse_client import SSEStream

OBSERVED = "pgpush_delivery_latency_seconds_count"


@pytest.fixture
async def serve(database_url: str) -> AsyncIterator[ServerProcess]:
    server = ServerProcess(database_url)
    await server.ready()
    yield server
    await server.stop()


@pytest.mark.timeout(60)
async def test_replayed_rows_are_not_observed_live_rows_are(
    serve: ServerProcess, db: asyncpg.Connection
) -> None:
    # Written an hour "ago": a replay of these would put ~3600 s into the histogram.
    await db.execute(
        "INSERT INTO messages (recipient, event, data, created_at) "
        "SELECT 'alice', 'old', to_jsonb(n), now() - interval '1 hour' FROM generate_series(1, 3) AS n"
    )
    stream = await SSEStream.open(HOST, serve.port, make_token("alice"), last_event_id=0)
    try:
        await wait_until(lambda: len(stream.seqs) == 3, within=10, what="the replay")
        await wait_until(
            lambda: _at_least(serve, "pgpush_events_delivered_total", 3), within=10, what="delivered counted"
        )
        assert await serve.metric(OBSERVED) == 0
        assert await serve.metric("pgpush_delivery_latency_seconds_bucket", le="60.0") == 0

        await db.execute("INSERT INTO messages (recipient, event, data) VALUES ('alice', 'new', '1')")
        await wait_until(lambda: len(stream.seqs) == 4, within=10, what="the live row")
        await wait_until(lambda: _at_least(serve, OBSERVED, 1), within=10, what="the live row observed")
        assert await serve.metric(OBSERVED) == 1
        # The live row was just written: it is well inside the last bucket, unlike the replayed ones.
        assert await serve.metric("pgpush_delivery_latency_seconds_bucket", le="60.0") == 1
    finally:
        await stream.close()


async def _at_least(server: ServerProcess, name: str, value: float) -> bool:
    return await server.metric(name) >= value

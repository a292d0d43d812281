"""Deeply nested JSON written by SQL reaches the stream intact, whatever the depth Postgres accepts.

orjson reads at most 1024 levels and writes at most 254, so the deeper ones take the encoder's other path
(service/sse.py compact_json), which keeps jsonb's text and only drops the spaces between tokens. Before that
path caught orjson's TypeError, one row nested 255-1024 deep failed every fetch that included it: its
recipient's stream stalled for good, and so did every recipient read in the same batch.
"""

from __future__ import annotations

import asyncpg
import pytest

from tests.conftest import RunningServer, make_token
from tests.hostile.conftest import Bystander, port_of
from tests.polling import wait_until
from tests.sse_client import SSEStream


def nested(depth: int) -> dict[str, tuple[str, str]]:
    """(jsonb input with spaces and newlines, the compact text the stream must carry), by shape."""
    leaf = '"a string with \\n, \\r, \\u0001 and ✓"'
    return {
        "arrays": ("[ " * depth + leaf + " ]" * depth, "[" * depth + leaf + "]" * depth),
        "objects": ('{ "k" :\n' * depth + leaf + " }" * depth, '{"k":' * depth + leaf + "}" * depth),
        "mixed": (
            '[ { "k" : ' * (depth // 2) + "1e2" + " } ]" * (depth // 2),
            '[{"k":' * (depth // 2) + "100" + "}]" * (depth // 2),
        ),
    }


# Within orjson's limits, between its write and read limits, and far beyond (Postgres refuses ~20,000).
@pytest.mark.parametrize("depth", [200, 1_000, 5_000])
async def test_deeply_nested_json_is_delivered_intact(
    server: RunningServer, bystander: Bystander, db: asyncpg.Connection, depth: int
) -> None:
    stream = await SSEStream.open("127.0.0.1", port_of(server), make_token("alice"), keep_events=True)
    cases = nested(depth)
    for shape, (written, _) in cases.items():
        await db.execute(
            "INSERT INTO messages (recipient, event, data) VALUES ('alice', $1, $2::jsonb)", shape, written
        )
    await wait_until(lambda: len(stream.seqs) == len(cases), what="every nested row")
    await bystander.assert_served()
    await stream.close()
    assert stream.events is not None
    for event in stream.events:
        assert event.data == cases[event.type][1], event.type

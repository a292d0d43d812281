"""Reconnecting clients get exactly the unread rows they missed (docs/protocol.md §3, the cursor table)."""

from __future__ import annotations

import asyncpg
import pytest
from pgpush.hub import NEWCOMER_UNREAD

from tests.conftest import RunningServer, ServerFactory, insert_rows, make_token
from tests.sse_client import open_stream


async def test_last_event_id_header_replays_only_the_unread_rows_after_it(
    server: RunningServer, db: asyncpg.Connection
) -> None:
    seqs = await insert_rows(db, "alice", 6)
    await db.execute("UPDATE messages SET read_at = now() WHERE recipient = 'alice' AND seq = $1", seqs[3])
    async with await open_stream(server.url, make_token("alice"), last_event_id=seqs[1]) as stream:
        events = await stream.messages(3)
        assert await stream.quiet(0.3) == []
    assert [e.seq for e in events] == [seqs[2], seqs[4], seqs[5]]


async def test_last_event_id_query_parameter_works_and_the_header_wins(
    server: RunningServer, db: asyncpg.Connection
) -> None:
    seqs = await insert_rows(db, "alice", 4)
    token = make_token("alice")
    async with await open_stream(server.url, token, params={"lastEventId": str(seqs[2])}) as by_query:
        assert [e.seq for e in await by_query.messages(1)] == [seqs[3]]
    async with await open_stream(
        server.url, token, last_event_id=seqs[0], params={"lastEventId": str(seqs[2])}
    ) as both:
        assert [e.seq for e in await both.messages(3)] == seqs[1:]


async def test_replay_then_live_rows_without_gap_or_duplicate(
    server: RunningServer, db: asyncpg.Connection
) -> None:
    seqs = await insert_rows(db, "alice", 1200)  # more than one replay page
    async with await open_stream(server.url, make_token("alice"), last_event_id=0) as stream:
        await db.execute("INSERT INTO messages (recipient, data) VALUES ('alice', '\"live\"')")
        events = await stream.messages(1201, timeout=20)
        assert await stream.quiet(0.3) == []
    assert [e.seq for e in events][:-1] == seqs
    assert events[-1].data == '"live"' and events[-1].seq > seqs[-1]


async def test_a_fresh_connect_replays_unread_rows_oldest_first(
    server: RunningServer, db: asyncpg.Connection
) -> None:
    seqs = await insert_rows(db, "alice", 5)
    await db.execute("UPDATE messages SET read_at = now() WHERE recipient = 'alice' AND seq <= $1", seqs[1])
    async with await open_stream(server.url, make_token("alice")) as stream:
        events = await stream.messages(3)
        assert await stream.quiet(0.3) == []
    assert [e.seq for e in events] == seqs[2:]
    assert all(e.type == "lead" for e in events)


# The hub reads up to NEWCOMER_UNREAD unread rows with a newcomer's cursor; past that the stream pages the
# table itself. Both sides of the boundary must replay the same rows.
@pytest.mark.parametrize("unread", [NEWCOMER_UNREAD - 1, NEWCOMER_UNREAD, NEWCOMER_UNREAD + 1])
async def test_replay_is_the_same_whether_the_hub_or_the_stream_read_the_unread_rows(
    server: RunningServer, db: asyncpg.Connection, unread: int
) -> None:
    seqs = await insert_rows(db, "alice", unread + 2)
    await db.execute("UPDATE messages SET read_at = now() WHERE recipient = 'alice' AND seq <= $1", seqs[1])
    async with await open_stream(server.url, make_token("alice")) as fresh:
        assert [e.seq for e in await fresh.messages(unread)] == seqs[2:]
        assert await fresh.quiet(0.3) == []
    async with await open_stream(server.url, make_token("alice"), last_event_id=seqs[5]) as resumed:
        assert [e.seq for e in await resumed.messages(unread - 4)] == seqs[6:]
        assert await resumed.quiet(0.3) == []


async def test_more_unread_rows_than_the_replay_limit_sends_reset_then_the_newest(
    start_server: ServerFactory, db: asyncpg.Connection
) -> None:
    server = await start_server(replay_limit=10)
    seqs = await insert_rows(db, "alice", 25)
    async with await open_stream(server.url, make_token("alice")) as stream:
        first = await stream.next()
        events = await stream.messages(10)
        assert await stream.quiet(0.3) == []
    assert first.type == "reset" and first.last_event_id == ""
    assert first.data == '{"reason":"too_many_unread"}'
    assert [e.seq for e in events] == seqs[-10:]


async def test_a_cursor_beyond_the_last_seq_sends_reset_then_the_unread_rows(
    server: RunningServer, db: asyncpg.Connection
) -> None:
    seqs = await insert_rows(db, "alice", 3)
    async with await open_stream(server.url, make_token("alice"), last_event_id=seqs[-1] + 1000) as stream:
        first = await stream.next()
        events = await stream.messages(3)
    assert first.type == "reset" and first.data == '{"reason":"cursor_ahead"}'
    assert [e.seq for e in events] == seqs


async def test_a_cursor_at_the_last_seq_replays_nothing_and_stays_live(
    server: RunningServer, db: asyncpg.Connection
) -> None:
    seqs = await insert_rows(db, "alice", 3)
    async with await open_stream(server.url, make_token("alice"), last_event_id=seqs[-1]) as stream:
        assert await stream.quiet(0.3) == []
        new = await insert_rows(db, "alice", 1)
        assert [e.seq for e in await stream.messages(1)] == new


async def test_live_rows_are_sent_even_when_already_marked_read(
    server: RunningServer, db: asyncpg.Connection
) -> None:
    async with await open_stream(server.url, make_token("alice")) as stream:
        # A row committed before the stream's snapshot is replayed, and replay skips read rows;
        # receiving a first row proves the stream is live.
        await db.execute("INSERT INTO messages (recipient, data) VALUES ('alice', '0')")
        assert [e.data for e in await stream.messages(1)] == ["0"]
        await db.execute("INSERT INTO messages (recipient, data, read_at) VALUES ('alice', '1', now())")
        assert [e.data for e in await stream.messages(1)] == ["1"]


@pytest.mark.parametrize(
    "value", ["-1", "abc", "1.5", "9223372036854775808", "99999999999999999999", "١٢", " 1x"]
)
async def test_an_invalid_cursor_is_a_400_with_a_json_body(server: RunningServer, value: str) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=server.url) as client:
        by_header = await client.get(
            "/events",
            headers={
                "Authorization": f"Bearer {make_token('alice')}",
                "Last-Event-ID": value.strip().encode(),
            },
        )
        by_query = await client.get(
            "/events",
            params={"lastEventId": value},
            headers={"Authorization": f"Bearer {make_token('alice')}"},
        )
    for response in (by_header, by_query):
        assert response.status_code == 400
        assert response.json()["error"] == "invalid_last_event_id"
        assert "detail" in response.json()


async def test_the_largest_cursor_is_accepted(server: RunningServer) -> None:
    async with await open_stream(server.url, make_token("alice"), last_event_id=2**63 - 1) as stream:
        assert (await stream.next()).type == "reset"

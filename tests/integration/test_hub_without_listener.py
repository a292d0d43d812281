"""The hub on a real database with no listener, so each test decides which notifications it hears.

Rows carried inside their notification are used only when nothing before them can be missing, and a
resync (listener reconnect, safety net) finds rows whose notifications never came.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest
from pgpush.db import Database
from pgpush.hints import CarriedRow, Hint, parse_hint
from pgpush.hub import Hub, Stream

INSERT = "INSERT INTO messages (recipient, data) VALUES ($1, $2) RETURNING seq"


class Counts:
    def __init__(self) -> None:
        self.fetched = 0
        self.carried = 0


@pytest.fixture
async def counts() -> Counts:
    return Counts()


@pytest.fixture
async def hub(database_url: str, counts: Counts) -> AsyncIterator[Hub]:
    database = await Database.connect(database_url)

    def fetched(n: int) -> None:
        counts.fetched += n

    def carried(n: int) -> None:
        counts.carried += n

    hub = Hub(
        database,
        max_streams=10,
        max_streams_per_user=2,
        buffer_bytes=1 << 20,
        on_rows=fetched,
        on_carried=carried,
    )
    hub.start()
    yield hub
    await hub.stop()
    await database.close()


async def live_stream(hub: Hub, recipient: str) -> Stream:
    stream = hub.open(recipient)
    await hub.start_point(stream)
    stream.go_live()
    return stream


async def received_seqs(stream: Stream, count: int) -> list[int]:
    text = ""
    while text.count("id: ") < count:
        await asyncio.wait_for(stream.wait(), 30)
        text += stream.take().data.decode()
    return [int(line[4:]) for line in text.splitlines() if line.startswith("id: ")]


def carried(recipient: str, previous: int, seq: int, data: str = "1") -> CarriedRow:
    return CarriedRow(recipient, previous, seq, "message", data, 0.0)


async def test_a_carried_row_right_after_the_cursor_is_delivered_without_reading_the_table(
    hub: Hub, db: asyncpg.Connection, counts: Counts
) -> None:
    stream = await live_stream(hub, "bob")
    seq = await db.fetchval(INSERT, "bob", '{"a": 1}')
    hub.take_hint(Hint([], [carried("bob", 0, seq, '{"a": 1}')]))
    assert stream.take().data == f'id: {seq}\nevent: message\ndata: {{"a":1}}\n\n'.encode()
    assert (counts.carried, counts.fetched) == (1, 0)


async def test_a_carried_row_after_a_missed_notification_makes_the_hub_read_the_gap(
    hub: Hub, db: asyncpg.Connection, counts: Counts
) -> None:
    stream = await live_stream(hub, "bob")
    missed = [await db.fetchval(INSERT, "bob", "1") for _ in range(3)]  # nobody told the hub
    latest = await db.fetchval(INSERT, "bob", "2")
    hub.take_hint(Hint([], [carried("bob", missed[-1], latest)]))
    assert await received_seqs(stream, 4) == [*missed, latest]  # in order, the gap read from the table
    assert counts.carried == 0 and counts.fetched == 4


async def test_a_carried_row_the_hub_already_read_is_not_sent_twice(
    hub: Hub, db: asyncpg.Connection, counts: Counts
) -> None:
    stream = await live_stream(hub, "bob")
    seq = await db.fetchval(INSERT, "bob", "1")
    hub.take_hint(Hint(["bob"], []))  # an older hint makes the hub read the row first
    assert await received_seqs(stream, 1) == [seq]
    hub.take_hint(Hint([], [carried("bob", 0, seq)]))
    assert not stream.has_pending and counts.carried == 0


async def test_a_newcomer_whose_cursor_is_not_read_yet_leaves_the_row_to_its_replay(
    hub: Hub, db: asyncpg.Connection, counts: Counts
) -> None:
    seq = await db.fetchval(INSERT, "carol", "1")
    stream = hub.open("carol")  # the hub has not read carol's cursor yet
    hub.take_hint(Hint([], [carried("carol", 0, seq)]))
    assert (await hub.start_point(stream)).seq == seq  # the replay, which reads up to here, sends it
    assert not stream.has_pending and counts.carried == 0


async def test_a_resync_reads_only_the_recipients_whose_counters_passed_their_cursor(
    hub: Hub, db: asyncpg.Connection, counts: Counts
) -> None:
    bob, carol = await live_stream(hub, "bob"), await live_stream(hub, "carol")
    missed = [await db.fetchval(INSERT, "bob", "1") for _ in range(2)]  # no notification at all
    hub.resync()
    assert await received_seqs(bob, 2) == missed
    assert not carol.has_pending and counts.fetched == 2
    later = await db.fetchval(INSERT, "carol", "2")
    hub.resync()
    assert await received_seqs(carol, 1) == [later]
    assert not bob.has_pending and counts.fetched == 3  # bob was current: none of his rows were read again


def test_notification_lines_parse_as_names_rows_or_everyone() -> None:
    assert parse_hint("*") == Hint(None, [])
    assert parse_hint("alice\nbob") == Hint(["alice", "bob"], [])
    row = 'bob\t3\t7\tlead\t1795323295.398415\t{"a": "x\\ty"}'
    assert parse_hint(row) == Hint([], [CarriedRow("bob", 3, 7, "lead", '{"a": "x\\ty"}', 1795323295.398415)])
    assert parse_hint("bob\tnot-a-number\t7\tlead\t1\t1") == Hint(None, [])  # unreadable: re-read everyone
    # Names listed for older releases are not hints when their rows came along.
    assert parse_hint(f"bob\ncarol\n{row}") == Hint(["carol"], [parse_hint(row).rows[0]])

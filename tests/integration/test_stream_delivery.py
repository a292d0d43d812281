"""A row written with plain SQL reaches its recipient's open stream: once, in order, to nobody else."""

from __future__ import annotations

import asyncio
import json

import asyncpg

from tests.conftest import RunningServer, make_token
from tests.polling import wait_until
from tests.sse_client import open_stream


def compact(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


INSERT = "INSERT INTO messages (recipient, event, data) VALUES ($1, $2, $3) RETURNING id, seq"


async def test_the_stream_starts_with_retry_and_sse_headers(server: RunningServer) -> None:
    async with await open_stream(server.url, make_token("alice")) as stream:
        assert stream.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert stream.headers["cache-control"] == "no-cache"
        assert stream.headers["x-accel-buffering"] == "no"
        assert "content-length" not in stream.headers
        await wait_until(lambda: stream.retries == [server.settings.retry_ms])


async def test_an_sql_insert_is_delivered_with_its_seq_as_event_id(
    server: RunningServer, db: asyncpg.Connection
) -> None:
    async with await open_stream(server.url, make_token("alice")) as stream:
        await wait_until(lambda: stream.retries != [])
        row = await db.fetchrow(INSERT, "alice", "lead", '{"company": "ACME", "phone": "+1 555 0100"}')
        [event] = await stream.messages(1)
    assert event.type == "lead"
    assert event.seq == row["seq"]
    assert json.loads(event.data) == {"company": "ACME", "phone": "+1 555 0100"}
    assert event.data == compact(json.loads(event.data))  # jsonb may reorder keys; no spaces added


async def test_data_is_compact_json_with_utf8_unescaped(
    server: RunningServer, db: asyncpg.Connection
) -> None:
    values = ['"héllo ✓"', "[1, 2.5, null, true]", '{"nested": {"a": [1, {"b": "x y"}]}}', "42", "null"]
    async with await open_stream(server.url, make_token("alice")) as stream:
        for value in values:
            await db.execute(INSERT, "alice", "message", value)
        events = await stream.messages(len(values))
    assert [e.data for e in events] == [
        '"héllo ✓"',
        "[1,2.5,null,true]",
        '{"nested":{"a":[1,{"b":"x y"}]}}',
        "42",
        "null",
    ]
    assert [json.loads(e.data) for e in events] == [json.loads(v) for v in values]


async def test_multi_row_insert_select_and_copy_are_all_delivered(
    server: RunningServer, db: asyncpg.Connection
) -> None:
    async with await open_stream(server.url, make_token("alice")) as stream:
        await db.execute(
            "INSERT INTO messages (recipient, data) VALUES ('alice', '1'), ('alice', '2'), ('bob', '0')"
        )
        await db.execute(
            "INSERT INTO messages (recipient, event, data) "
            "SELECT 'alice', 'batch', to_jsonb(n) FROM generate_series(3, 5) AS n ORDER BY 1"
        )
        await db.copy_records_to_table(
            "messages",
            records=[("alice", "copied", "6"), ("alice", "copied", "7")],
            columns=["recipient", "event", "data"],
        )
        events = await stream.messages(7)
    assert [e.data for e in events] == [str(n) for n in range(1, 8)]
    assert [e.seq for e in events] == sorted(e.seq for e in events)
    assert [e.type for e in events] == ["message"] * 2 + ["batch"] * 3 + ["copied"] * 2


async def test_one_user_never_sees_another_users_rows(server: RunningServer, db: asyncpg.Connection) -> None:
    async with (
        await open_stream(server.url, make_token("alice")) as alice,
        await open_stream(server.url, make_token("bob")) as bob,
    ):
        await db.execute(INSERT, "bob", "secret", '"for bob"')
        await db.execute(INSERT, "alice", "hello", '"for alice"')
        [for_alice] = await alice.messages(1)
        [for_bob] = await bob.messages(1)
        assert await alice.quiet(0.3) == []
    assert (for_alice.data, for_bob.data) == ('"for alice"', '"for bob"')


async def test_every_stream_of_a_user_gets_each_row(server: RunningServer, db: asyncpg.Connection) -> None:
    streams = [await open_stream(server.url, make_token("alice")) for _ in range(3)]
    try:
        await wait_until(lambda: server.stream_count == 3)
        await db.execute(INSERT, "alice", "lead", '{"n": 1}')
        received = [await s.messages(1) for s in streams]
    finally:
        for s in streams:
            await s.close()
    assert {r[0].data for r in received} == {'{"n":1}'}


async def test_a_rolled_back_insert_is_never_delivered(server: RunningServer, db: asyncpg.Connection) -> None:
    async with await open_stream(server.url, make_token("alice")) as stream:
        async with db.transaction():
            await db.execute(INSERT, "alice", "kept", '"first"')
        tx = db.transaction()
        await tx.start()
        await db.execute(INSERT, "alice", "lost", '"rolled back"')
        await tx.rollback()
        await db.execute(INSERT, "alice", "kept", '"second"')
        events = await stream.messages(2)
        assert await stream.quiet(0.5) == []
    assert [e.data for e in events] == ['"first"', '"second"']


async def test_concurrent_writers_arrive_once_in_order_while_the_listener_is_killed(
    server: RunningServer, db: asyncpg.Connection, database_url: str
) -> None:
    writers, per_writer = 8, 200
    async with await open_stream(server.url, make_token("alice")) as stream:
        await wait_until(lambda: server.stream_count == 1)

        async def write(writer: int) -> None:
            conn = await asyncpg.connect(database_url)
            try:
                for n in range(per_writer):
                    await conn.execute(INSERT, "alice", "w", json.dumps({"w": writer, "n": n}))
            finally:
                await conn.close()

        async def kill_listener_twice() -> None:
            killed: list[int] = []
            listener = server.app.state.listener
            for _ in range(2):
                # Its session once it listens again (LISTEN done: a kill during its setup is no reconnect).
                await wait_until(
                    lambda: listener.connected and listener.backend_pid not in killed,
                    what="the listener is connected",
                )
                killed.append(listener.backend_pid)
                assert await db.fetchval("SELECT pg_terminate_backend($1)", killed[-1])

        await asyncio.gather(*(write(w) for w in range(writers)), kill_listener_twice())
        events = await stream.messages(writers * per_writer, timeout=30)
        assert await stream.quiet(0.5) == []
    seqs = [e.seq for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    payloads = [json.loads(e.data) for e in events]
    assert sorted((p["w"], p["n"]) for p in payloads) == [
        (w, n) for w in range(writers) for n in range(per_writer)
    ]
    for w in range(writers):  # each writer's rows keep that writer's commit order
        assert [p["n"] for p in payloads if p["w"] == w] == list(range(per_writer))
    await wait_until(lambda: server.metric("pgpush_listener_reconnects_total") >= 2, what="two reconnects")


async def test_an_open_transaction_for_alice_does_not_delay_bob(
    server: RunningServer, db: asyncpg.Connection, database_url: str
) -> None:
    other = await asyncpg.connect(database_url)
    try:
        async with await open_stream(server.url, make_token("bob")) as bob:
            tx = other.transaction()
            await tx.start()
            await other.execute(INSERT, "alice", "slow", '"pending"')
            await db.execute(INSERT, "bob", "fast", '"now"')
            [event] = await bob.messages(1, timeout=30)
            await tx.rollback()
    finally:
        await other.close()
    assert event.data == '"now"'


async def test_a_second_write_for_alice_waits_for_her_open_transaction_and_both_arrive_in_seq_order(
    server: RunningServer, db: asyncpg.Connection, database_url: str
) -> None:
    first, second = await asyncpg.connect(database_url), await asyncpg.connect(database_url)
    try:
        async with await open_stream(server.url, make_token("alice")) as stream:
            await wait_until(lambda: server.stream_count == 1)
            tx = first.transaction()
            await tx.start()
            held = await first.fetchrow(INSERT, "alice", "first", '"held"')  # her counter row stays locked
            waiting = asyncio.create_task(second.fetchrow(INSERT, "alice", "second", '"waited"'))

            async def second_write_waits() -> bool:
                state = await db.fetchval(
                    "SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1", second.get_server_pid()
                )
                return bool(state == "Lock")

            await wait_until(second_write_waits, what="the second write waits for the first's lock")
            assert not waiting.done()
            await tx.commit()
            later = await asyncio.wait_for(waiting, 30)
            events = await stream.messages(2, timeout=30)
    finally:
        await first.close()
        await second.close()
    assert held["seq"] < later["seq"]
    assert [(e.type, e.seq, e.data) for e in events] == [
        ("first", held["seq"], '"held"'),
        ("second", later["seq"], '"waited"'),
    ]

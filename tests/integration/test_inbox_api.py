"""The inbox over REST: GET /me/messages pages through one user's rows; POST /me/messages/read marks them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

from tests.conftest import RunningServer, insert_rows, make_token
from tests.sse_client import open_stream

ALICE = {"Authorization": f"Bearer {make_token('alice')}"}


@pytest.fixture
async def client(server: RunningServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=10, headers=ALICE) as http:
        yield http


async def inbox(http: httpx.AsyncClient, **params: Any) -> dict[str, Any]:
    response = await http.get("/me/messages", params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def all_pages(http: httpx.AsyncClient, **params: Any) -> list[int]:
    """Follow `next` to the end; the seqs in the order they came."""
    seqs: list[int] = []
    page = await inbox(http, **params)
    while True:
        seqs += [m["seq"] for m in page["messages"]]
        if page["next"] is None:
            return seqs
        page = await inbox(http, cursor=page["next"], limit=params.get("limit", 50))


async def test_the_inbox_lists_the_users_own_messages_newest_first(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    seqs = await insert_rows(db, "alice", 3)
    await insert_rows(db, "bob", 2)
    page = await inbox(client)
    assert [m["seq"] for m in page["messages"]] == seqs[::-1]
    assert page["next"] is None
    newest = page["messages"][0]
    assert set(newest) == {"id", "seq", "event", "data", "created_at", "read_at"}
    assert (newest["event"], newest["data"], newest["read_at"]) == ("lead", {"n": 3}, None)


async def test_filters_order_and_limit(client: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    seqs = await insert_rows(db, "alice", 10)
    await db.execute("UPDATE messages SET read_at = now() WHERE seq = ANY($1::bigint[])", seqs[:4])
    assert [m["seq"] for m in (await inbox(client, order="asc"))["messages"]] == seqs
    assert [m["seq"] for m in (await inbox(client, unread="true"))["messages"]] == seqs[4:][::-1]
    between = await inbox(client, after=seqs[2], before=seqs[6], order="asc")
    assert [m["seq"] for m in between["messages"]] == seqs[3:6]
    limited = await inbox(client, limit=3)
    assert [m["seq"] for m in limited["messages"]] == seqs[-3:][::-1] and limited["next"] is not None
    read = (await inbox(client, order="asc", limit=1))["messages"][0]
    assert read["read_at"] is not None


@pytest.mark.parametrize("order", ["desc", "asc"])
async def test_paging_while_rows_are_inserted_never_skips_or_repeats_a_row(
    client: httpx.AsyncClient, db: asyncpg.Connection, database_url: str, order: str
) -> None:
    before = await insert_rows(db, "alice", 250)
    writer = await asyncpg.connect(database_url)
    stop = asyncio.Event()

    async def keep_inserting() -> None:
        for _ in range(100):  # bounded, so paging towards the newest rows does end
            if stop.is_set():
                return
            await insert_rows(writer, "alice", 3)
            await asyncio.sleep(0.002)

    task = asyncio.create_task(keep_inserting())
    try:
        seen = await all_pages(client, order=order, limit=7)
    finally:
        stop.set()
        await task
        await writer.close()
    assert len(seen) == len(set(seen)), "a row was repeated"
    assert seen == sorted(seen, reverse=order == "desc")
    assert set(before) <= set(seen), "a row that existed before paging started was skipped"
    if order == "asc":  # paging towards the newest rows also meets rows inserted meanwhile
        assert len(seen) > len(before)


async def test_unread_paging_while_rows_are_marked_read_never_repeats(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    seqs = await insert_rows(db, "alice", 40)
    first = await inbox(client, unread="true", limit=10)
    await client.post("/me/messages/read", json={"seqs": seqs[::2]})
    rest = await all_pages(client, unread="true", limit=10, cursor=first["next"])
    shown = [m["seq"] for m in first["messages"]] + rest
    assert len(shown) == len(set(shown))
    assert rest == [s for s in seqs[::-1] if s < shown[9] and s not in seqs[::2]]


async def test_a_cursor_keeps_its_query_and_refuses_a_changed_one(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    seqs = await insert_rows(db, "alice", 6)
    first = await inbox(client, order="asc", after=seqs[0], limit=2)
    assert [m["seq"] for m in first["messages"]] == seqs[1:3]
    # The cursor alone carries the query; repeating the same parameters is fine too.
    by_cursor = await inbox(client, cursor=first["next"], limit=2)
    repeated = await inbox(client, cursor=first["next"], limit=2, order="asc", after=seqs[0])
    assert [m["seq"] for m in by_cursor["messages"]] == [m["seq"] for m in repeated["messages"]] == seqs[3:5]
    changed = await client.get("/me/messages", params={"cursor": first["next"], "order": "desc"})
    garbage = await client.get("/me/messages", params={"cursor": "bm90LWEtY3Vyc29y"})
    for response in (changed, garbage):
        assert response.status_code == 422
        assert [f["field"] for f in response.json()["fields"]] == ["query.cursor"]


async def test_invalid_parameters_are_422_and_no_token_is_401(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        anonymous = await http.get("/me/messages")
        assert anonymous.status_code == 401 and anonymous.json()["error"] == "unauthorized"
        for params, field in [
            ({"limit": 0}, "query.limit"),
            ({"limit": 501}, "query.limit"),
            ({"order": "sideways"}, "query.order"),
            ({"after": -1}, "query.after"),
            ({"before": 2**63}, "query.before"),
            ({"unread": "maybe"}, "query.unread"),
        ]:
            response = await http.get("/me/messages", params=params, headers=ALICE)
            assert response.status_code == 422, params
            assert [f["field"] for f in response.json()["fields"]] == [field]


async def test_marking_seqs_read_touches_only_the_callers_unread_rows(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    alice = await insert_rows(db, "alice", 4)
    bob = await insert_rows(db, "bob", 4)
    # bob's seq is named too: only the caller's own rows may change
    response = await client.post(
        "/me/messages/read", json={"seqs": [alice[0], alice[2], bob[1], 999_999_999]}
    )
    assert response.status_code == 200 and response.json() == {"updated": 2}
    again = await client.post("/me/messages/read", json={"seqs": [alice[0]]})
    assert again.json() == {"updated": 0}  # already read: nothing changed
    rows = await db.fetch("SELECT recipient, seq FROM messages WHERE read_at IS NOT NULL ORDER BY seq")
    assert [(r["recipient"], r["seq"]) for r in rows] == [("alice", alice[0]), ("alice", alice[2])]


async def test_marking_through_a_seq_reads_everything_up_to_it(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    seqs = await insert_rows(db, "alice", 5)
    await insert_rows(db, "bob", 5)
    await client.post("/me/messages/read", json={"seqs": [seqs[1]]})
    response = await client.post("/me/messages/read", json={"through": seqs[3]})
    assert response.json() == {"updated": 3}
    unread = await inbox(client, unread="true")
    assert [m["seq"] for m in unread["messages"]] == [seqs[4]]
    assert await db.fetchval("SELECT count(*) FROM messages WHERE recipient = 'bob' AND read_at IS NULL") == 5


async def test_mark_read_needs_exactly_one_of_seqs_and_through(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    await insert_rows(db, "alice", 2)
    for body in ({}, {"seqs": [1], "through": 2}, {"seqs": ["1"]}, {"through": -1}, {"seqs": [1], "x": 1}):
        response = await client.post("/me/messages/read", json=body)
        assert response.status_code == 422, body
        assert response.json()["error"] == "invalid_request" and "fields" in response.json()
    assert await db.fetchval("SELECT count(*) FROM messages WHERE read_at IS NOT NULL") == 0


async def test_after_marking_read_a_fresh_stream_replays_only_what_is_still_unread(
    server: RunningServer, client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    seqs = await insert_rows(db, "alice", 6)
    async with await open_stream(server.url, make_token("alice")) as stream:
        assert [e.seq for e in await stream.messages(6)] == seqs
    await client.post("/me/messages/read", json={"seqs": [seqs[0], seqs[4]]})
    await client.post("/me/messages/read", json={"through": seqs[2]})
    async with await open_stream(server.url, make_token("alice")) as stream:
        replayed = await stream.messages(2)
        assert await stream.quiet(0.3) == []
    assert [e.seq for e in replayed] == [seqs[3], seqs[5]]

"""POST /messages: what a publisher sends reaches its recipients' streams; bad requests change nothing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

from tests.conftest import RunningServer, ServerFactory, make_token
from tests.polling import wait_until
from tests.sse_client import open_stream

PUBLISHER = make_token("backend", scope="messages:publish")


@pytest.fixture
async def client(server: RunningServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        yield http


async def publish(http: httpx.AsyncClient, body: Any, token: str | None = PUBLISHER) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return await http.post("/messages", json=body, headers=headers)


async def row_count(db: asyncpg.Connection) -> int:
    return int(await db.fetchval("SELECT count(*) FROM messages"))


async def test_a_published_message_reaches_the_recipients_stream(
    server: RunningServer, client: httpx.AsyncClient
) -> None:
    async with await open_stream(server.url, make_token("alice")) as stream:
        await wait_until(lambda: server.stream_count == 1)
        response = await publish(
            client, {"recipients": ["alice"], "event": "lead", "data": {"company": "ACME"}}
        )
        [event] = await stream.messages(1)
    assert response.status_code == 201
    [created] = response.json()["messages"]
    assert created["recipient"] == "alice"
    assert (event.type, event.seq, event.data) == ("lead", created["seq"], '{"company":"ACME"}')


async def test_the_event_defaults_to_message_and_data_may_be_any_json_value(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    for data in (None, 42, "text", [1, "two"], {"nested": {"ok": True}}):
        assert (await publish(client, {"recipients": ["alice"], "data": data})).status_code == 201
    rows = await db.fetch("SELECT event, data::text FROM messages ORDER BY seq")
    assert {r["event"] for r in rows} == {"message"}
    assert [json.loads(r["data"]) for r in rows] == [None, 42, "text", [1, "two"], {"nested": {"ok": True}}]


async def test_fan_out_to_three_recipients_in_one_request(
    server: RunningServer, client: httpx.AsyncClient
) -> None:
    users = ["carol", "alice", "bob"]
    streams = [await open_stream(server.url, make_token(user)) for user in users]
    try:
        await wait_until(lambda: server.stream_count == 3)
        response = await publish(client, {"recipients": users, "event": "deploy", "data": {"v": 2}})
        received = [await stream.messages(1) for stream in streams]
        assert [await stream.quiet(0.2) for stream in streams] == [[], [], []]
    finally:
        for stream in streams:
            await stream.close()
    assert response.status_code == 201
    messages = response.json()["messages"]
    assert [m["recipient"] for m in messages] == users  # the order they were given
    assert len({m["id"] for m in messages}) == 3
    for [event], message in zip(received, messages, strict=True):
        assert (event.type, event.seq, event.data) == ("deploy", message["seq"], '{"v":2}')


async def test_a_repeated_key_creates_nothing_and_returns_the_same_rows(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    body = {"recipients": ["alice", "bob"], "event": "lead", "data": {"a": 1, "b": [1, 2]}, "key": "lead-17"}
    first = await publish(client, body)
    # jsonb equality: the same value with its keys in another order is the same data.
    again = await publish(client, body | {"data": {"b": [1, 2], "a": 1}})
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json() == first.json()
    assert await row_count(db) == 2


async def test_a_key_known_for_some_recipients_only_writes_the_new_ones(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    body = {"recipients": ["alice"], "data": "hi", "key": "k1"}
    [alice] = (await publish(client, body)).json()["messages"]
    response = await publish(client, body | {"recipients": ["bob", "alice"]})
    assert response.status_code == 201
    bob, alice_again = response.json()["messages"]
    assert alice_again == alice
    assert bob["recipient"] == "bob"
    assert await row_count(db) == 2


async def test_identical_requests_at_once_write_each_row_once(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    body = {"recipients": [f"user{n}" for n in range(20)], "event": "e", "data": {"x": 1}, "key": "same"}
    responses = await asyncio.gather(*(publish(client, body) for _ in range(12)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 11 + [201], "exactly one request created the rows; the others found them"
    assert len({json.dumps(r.json(), sort_keys=True) for r in responses}) == 1
    assert await row_count(db) == 20


async def test_the_same_key_with_another_event_or_data_is_a_conflict_and_writes_nothing(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    await publish(client, {"recipients": ["alice"], "event": "lead", "data": {"n": 1}, "key": "k"})
    for change in ({"data": {"n": 2}}, {"event": "other"}):
        body = {"recipients": ["bob", "alice"], "event": "lead", "data": {"n": 1}, "key": "k"} | change
        response = await publish(client, body)
        assert response.status_code == 409
        assert response.json()["error"] == "idempotency_conflict"
        assert "alice" in response.json()["detail"]
    assert await db.fetchval("SELECT array_agg(recipient) FROM messages") == ["alice"]  # bob's row undone


async def test_a_token_without_the_publish_scope_is_forbidden(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    body = {"recipients": ["alice"], "data": 1}
    response = await publish(client, body, token=make_token("alice", scope="profile email"))
    assert response.status_code == 403
    assert response.json()["error"] == "forbidden"
    assert "messages:publish" in response.json()["detail"]
    assert 'error="insufficient_scope"' in response.headers["www-authenticate"]
    assert await row_count(db) == 0
    # The scope may also come as an `scp` list (as some identity providers issue it).
    listed = make_token("backend", scp=["messages:read", "messages:publish"])
    assert (await publish(client, body, token=listed)).status_code == 201


async def test_without_a_valid_token_publishing_is_unauthorized(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    body = {"recipients": ["alice"], "data": 1}
    missing = await publish(client, body, token=None)
    expired = await publish(client, body, token=make_token("backend", ttl=-120, scope="messages:publish"))
    assert (missing.status_code, expired.status_code) == (401, 401)
    assert missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["error"] == "unauthorized" and expired.json()["error"] == "invalid_token"
    assert await row_count(db) == 0


async def test_malformed_json_is_a_bad_request(client: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    response = await client.post(
        "/messages",
        content=b'{"recipients": ["alice"], "data": ',
        headers={"Authorization": f"Bearer {PUBLISHER}", "Content-Type": "application/json"},
    )
    assert response.status_code == 400
    assert set(response.json()) == {"error", "detail"}
    assert await row_count(db) == 0


INVALID_BODIES: list[tuple[dict[str, Any], str]] = [
    ({"recipients": [], "data": 1}, "recipients"),
    ({"recipients": [f"u{n}" for n in range(1001)], "data": 1}, "recipients"),
    ({"recipients": ["alice", "bob", "alice"], "data": 1}, "recipients"),
    ({"recipients": ["alice", ""], "data": 1}, "recipients.1"),
    ({"recipients": ["x" * 257], "data": 1}, "recipients.0"),
    ({"recipients": ["ali\nce"], "data": 1}, "recipients.0"),
    ({"recipients": ["al\x85ice"], "data": 1}, "recipients.0"),
    ({"recipients": "alice", "data": 1}, "recipients"),
    ({"recipients": [7], "data": 1}, "recipients.0"),
    ({"recipients": ["alice"], "event": "two words", "data": 1}, "event"),
    ({"recipients": ["alice"], "event": "x" * 65, "data": 1}, "event"),
    ({"recipients": ["alice"], "event": "lead\r\n", "data": 1}, "event"),
    ({"recipients": ["alice"]}, "data"),
    ({"recipients": ["alice"], "data": "\u0000 nul"}, "data"),
    ({"recipients": ["alice"], "data": 1, "key": "k" * 257}, "key"),
    ({"recipients": ["alice"], "data": 1, "key": 5}, "key"),
    ({"recipients": ["alice"], "data": 1, "recipient": "bob"}, "recipient"),
]


async def test_each_field_breaking_its_rule_is_named_in_a_422_and_nothing_is_written(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    for body, field in [*INVALID_BODIES, ([], "")]:
        response = await publish(client, body)
        assert response.status_code == 422, (body, response.text)
        error = response.json()
        assert error["error"] == "invalid_request"
        assert field in [f["field"] for f in error["fields"]], (body, error)
        assert error["detail"]
    assert await row_count(db) == 0


async def test_nan_in_data_is_refused(client: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    response = await client.post(
        "/messages",
        content=b'{"recipients": ["alice"], "data": {"x": NaN}}',
        headers={"Authorization": f"Bearer {PUBLISHER}", "Content-Type": "application/json"},
    )
    assert response.status_code == 422
    assert [f["field"] for f in response.json()["fields"]] == ["data"]
    assert await row_count(db) == 0


async def test_data_over_the_data_limit_is_too_large(
    start_server: ServerFactory, db: asyncpg.Connection
) -> None:
    server = await start_server(max_data_bytes=100)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        fits = await publish(http, {"recipients": ["alice"], "data": "é" * 49})  # 98 bytes + 2 quotes
        over = await publish(http, {"recipients": ["alice"], "data": "é" * 50})
    assert fits.status_code == 201
    assert over.status_code == 413
    assert over.json()["error"] == "payload_too_large" and "data" in over.json()["detail"]
    assert await row_count(db) == 1


async def test_a_body_over_the_body_limit_is_too_large_however_it_is_sent(
    start_server: ServerFactory, db: asyncpg.Connection
) -> None:
    server = await start_server(max_body_bytes=2048)
    body = json.dumps({"recipients": ["alice"], "data": "x" * 4000}).encode()
    headers = {"Authorization": f"Bearer {PUBLISHER}", "Content-Type": "application/json"}

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: the size is only known by reading
        for start in range(0, len(body), 500):
            yield body[start : start + 500]

    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        declared = await http.post("/messages", content=body, headers=headers)
        streamed = await http.post("/messages", content=chunked(), headers=headers)
        big = await http.post("/messages", content=b"x" * (3 * 1024 * 1024), headers=headers)
        fits = await http.post(
            "/messages", json={"recipients": ["alice"], "data": "x" * 1000}, headers=headers
        )
        # The limit stands in front of every endpoint, not only this one.
        mark_read = await http.post("/me/messages/read", json={"seqs": list(range(1000))}, headers=headers)
    for response in (declared, streamed, big, mark_read):
        assert response.status_code == 413
        assert response.json()["error"] == "payload_too_large"
        assert "2048" in response.json()["detail"]
    assert "content-length" not in streamed.request.headers
    assert fits.status_code == 201
    assert await row_count(db) == 1


async def test_publish_requests_are_counted_by_status(
    server: RunningServer, client: httpx.AsyncClient
) -> None:
    await publish(client, {"recipients": ["alice"], "data": 1})
    await publish(client, {"recipients": ["alice"], "data": 1})
    await publish(client, {"recipients": [], "data": 1})
    await publish(client, {"recipients": ["alice"], "data": 1}, token=None)
    metrics = (await client.get("/metrics")).text
    assert 'pgpush_publish_requests_total{status="201"} 2.0' in metrics
    assert 'pgpush_publish_requests_total{status="422"} 1.0' in metrics
    assert 'pgpush_publish_requests_total{status="401"} 1.0' in metrics

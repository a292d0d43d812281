"""Whatever the API or SQL accepts as `data`, GET /me/messages serves it, byte for byte as the stream does.

0.3.0 answered 500 (PydanticSerializationError: maximum serialization depth) to every inbox page holding a
message nested 255 levels deep, although POST /messages had accepted it with 201: the inbox went through
pydantic's serializer, the stream through jsonb's own text.
"""

from __future__ import annotations

import asyncpg
import httpx
import pytest

from tests.conftest import RunningServer, make_token
from tests.hostile.conftest import Bystander, port_of
from tests.polling import wait_until
from tests.sse_client import SSEStream

PUBLISHER = {"Authorization": f"Bearer {make_token('backend', scope='messages:publish')}"}
ALICE = {"Authorization": f"Bearer {make_token('alice')}"}


def nested(depth: int) -> str:
    """Compact JSON nested `depth` levels deep, arrays and objects in turn, with a number beyond a double."""
    opening = "".join('{"k":' if level % 2 else "[" for level in range(depth))
    closing = "".join("}" if level % 2 else "]" for level in reversed(range(depth)))
    return opening + "123456789012345678901234567890" + closing


async def inbox_holds(client: httpx.AsyncClient, expected: list[str]) -> None:
    """Every inbox page (desc and asc, unread or not) answers 200 and carries each value intact."""
    for params in ({}, {"order": "asc"}, {"unread": "true"}, {"limit": "1"}):
        response = await client.get("/me/messages", params=params)
        assert response.status_code == 200, (params, response.text[:300])
        assert response.headers["content-type"] == "application/json"
        for text in expected[: int(params.get("limit", len(expected)))]:
            # The page is too deep for Python's json module to parse; the value must be in it verbatim.
            assert f'"data":{text},'.encode() in response.content, params
    page = (await client.get("/me/messages", params={"limit": "1", "order": "asc"})).content
    assert page.startswith(b'{"messages":[{"id":') and b'"next":"' in page


@pytest.mark.timeout(60)
async def test_data_the_api_accepts_at_any_depth_is_served_by_the_inbox_and_the_stream(
    server: RunningServer, bystander: Bystander
) -> None:
    stream = await SSEStream.open("127.0.0.1", port_of(server), make_token("alice"), keep_events=True)
    accepted: list[str] = []
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        for depth in (200, 254, 255, 400, 900):
            text = nested(depth)
            body = b'{"recipients":["alice"],"event":"deep","data":' + text.encode() + b"}"
            response = await client.post(
                "/messages", content=body, headers=PUBLISHER | {"Content-Type": "application/json"}
            )
            assert response.status_code in (201, 400, 422), (depth, response.text[:300])
            if response.status_code == 201:
                accepted.append(text)
        # pydantic's validator refuses deeper values with a 422 (fine: refused before anything is written).
        assert len(accepted) >= 2, "the API accepts 254 levels of arrays and objects (255 with the leaf)"
        await wait_until(lambda: len(stream.seqs) == len(accepted), within=10, what="every deep row")
    async with httpx.AsyncClient(base_url=server.url, timeout=30, headers=ALICE) as client:
        await inbox_holds(client, accepted[::-1])
    assert stream.events is not None
    assert [event.data for event in stream.events] == accepted
    await stream.close()
    await bystander.assert_served()


@pytest.mark.timeout(60)
async def test_data_written_by_sql_at_any_depth_postgres_accepts_is_served_by_the_inbox(
    server: RunningServer, bystander: Bystander, db: asyncpg.Connection
) -> None:
    written = [nested(depth) for depth in (255, 1_000, 5_000)]
    for text in written:
        await db.execute("INSERT INTO messages (recipient, data) VALUES ('alice', $1::jsonb)", text)
    async with httpx.AsyncClient(base_url=server.url, timeout=30, headers=ALICE) as client:
        await inbox_holds(client, written[::-1])
    await bystander.assert_served()

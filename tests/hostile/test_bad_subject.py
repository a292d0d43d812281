"""A validly signed token whose `sub` the messages table would refuse is refused with 401 everywhere.

0.3.0 accepted `{"sub": "\\ud800"}` (a lone surrogate): GET /me/messages answered a plain-text 500, and
while its stream was open the hub's batched newcomer query failed and was retried forever, so a new stream
for carol got neither her unread rows nor live ones, and alice missed a 22-recipient publish.
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
# Names the recipient column cannot hold: not UTF-8, NUL, other control characters, too long, empty.
REFUSED = ["\ud800", "bad\ud800name", "a\x00b", "a\x1fb", "del\x7f", "x" * 257, ""]
ACCEPTED = ["y" * 256, "ünïcödé ✓ with spaces", "user@example.com"]


async def table_refuses(db: asyncpg.Connection, recipient: str) -> bool:
    try:
        async with db.transaction():
            await db.execute("INSERT INTO messages (recipient, data) VALUES ($1, '1')", recipient)
    except (asyncpg.PostgresError, UnicodeEncodeError):
        return True
    await db.execute("DELETE FROM messages WHERE recipient = $1", recipient)
    return False


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sub", REFUSED, ids=repr)
async def test_a_sub_the_table_refuses_gets_401_and_others_keep_being_served(
    server: RunningServer, bystander: Bystander, db: asyncpg.Connection, sub: str
) -> None:
    assert await table_refuses(db, sub)
    token = make_token(sub)
    port = port_of(server)
    stream = await SSEStream.open("127.0.0.1", port, token)
    assert stream.status == 401, stream.body[:200]
    assert stream.body.startswith(b'{"error":"invalid_token"')
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        auth = {"Authorization": f"Bearer {token}"}
        for response in (
            await client.get("/me/messages", headers=auth),
            await client.post("/me/messages/read", headers=auth, json={"through": 1}),
            await client.post("/events/ticket", headers=auth),
        ):
            assert response.status_code == 401, response.text[:200]
            assert response.json()["error"] == "invalid_token"
    assert server.stream_count == 1  # bob's
    # Everyone else is served: a newcomer's unread rows and a 22-recipient publish.
    await db.execute(
        "INSERT INTO messages (recipient, data) SELECT 'carol', to_jsonb(n) FROM generate_series(1, 3) n"
    )
    carol = await SSEStream.open("127.0.0.1", port, make_token("carol"))
    alice = await SSEStream.open("127.0.0.1", port, make_token("alice"))
    await wait_until(lambda: len(carol.seqs) == 3, within=10, what="carol's unread rows")
    recipients = ["alice", "carol", *(f"user{n:02}" for n in range(20))]
    async with httpx.AsyncClient(base_url=server.url, timeout=10, headers=PUBLISHER) as client:
        response = await client.post("/messages", json={"recipients": recipients, "data": {"n": 1}})
        assert response.status_code == 201, response.text
    await wait_until(lambda: len(alice.seqs) == 1 and len(carol.seqs) == 4, within=10, what="the publish")
    await bystander.assert_served()
    for opened in (carol, alice):
        await opened.close()


@pytest.mark.parametrize("sub", ACCEPTED, ids=repr)
async def test_a_sub_the_table_accepts_is_a_user(
    server: RunningServer, db: asyncpg.Connection, sub: str
) -> None:
    assert not await table_refuses(db, sub)
    stream = await SSEStream.open("127.0.0.1", port_of(server), make_token(sub))
    assert stream.status == 200
    await db.execute("INSERT INTO messages (recipient, data) VALUES ($1, '1')", sub)
    await wait_until(lambda: len(stream.seqs) == 1, within=10, what="the user's row")
    await stream.close()

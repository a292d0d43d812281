"""Stream tickets (protocol §3): POST /events/ticket, then GET /events?ticket=… on any replica, for the stream
only, for a short time that cannot be stretched."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import asyncpg
import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.conftest import RunningServer, ServerFactory, make_token
from tests.polling import wait_until
from tests.sse_client import open_stream

INVALID_TOKEN = 'Bearer error="invalid_token"'
CLIENT_OPTIONS: dict[str, Any] = {"timeout": 10, "verify": False}
TICKET_SECRET = "a-ticket-secret-that-is-long-enough-too!"


async def request_ticket(server: RunningServer, token: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=server.url, **CLIENT_OPTIONS) as client:
        return await client.post("/events/ticket", headers={"Authorization": f"Bearer {token}"})


async def ticket_for(server: RunningServer, token: str) -> tuple[str, int]:
    response = await request_ticket(server, token)
    assert response.status_code == 200, response.text
    body = response.json()
    return body["ticket"], body["expires_at"]


async def stream_status(server: RunningServer, **request: Any) -> httpx.Response:
    """GET /events with these credentials; a 200 stream is closed at once, an error read whole."""
    cookies = request.pop("cookies", None)
    async with (
        httpx.AsyncClient(base_url=server.url, cookies=cookies, **CLIENT_OPTIONS) as client,
        client.stream("GET", "/events", **request) as response,
    ):
        if response.status_code != 200:
            await response.aread()
    if response.status_code == 200:
        await wait_until(lambda: server.stream_count == 0)
    return response


def assert_invalid(response: httpx.Response, case: str) -> None:
    assert response.status_code == 401, f"{case}: {response.status_code} {response.text}"
    assert response.headers["www-authenticate"] == INVALID_TOKEN, case
    assert response.json()["error"] == "invalid_token", case


async def test_a_ticket_opens_the_users_stream(server: RunningServer, db: asyncpg.Connection) -> None:
    token = make_token("alice", ttl=3600)
    response = await request_ticket(server, token)
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert set(body) == {"ticket", "expires_at"}
    assert time.time() + 55 <= body["expires_at"] <= time.time() + 60
    async with await open_stream(server.url, params={"ticket": body["ticket"]}) as stream:
        await wait_until(lambda: stream.retries != [])
        # Interleaved with other users' rows; the last one marks the end (no quiet window needed).
        await db.execute(
            "INSERT INTO messages (recipient, data) VALUES "
            "('bob', '0'), ('alice', '1'), ('carol', '0'), ('alice', '2'), ('bob', '0'), ('alice', '\"end\"')"
        )
        events = await stream.messages(3)
    assert [json.loads(e.data) for e in events] == [1, 2, "end"]  # alice's rows, and only hers


async def test_a_ticket_never_outlives_the_token_it_was_issued_for(server: RunningServer) -> None:
    token = make_token("alice", ttl=20)
    _, expires_at = await ticket_for(server, token)
    assert expires_at <= jwt.decode(token, options={"verify_signature": False})["exp"]


async def test_a_ticket_expires_but_the_stream_it_opened_lives_on(
    start_server: ServerFactory, db: asyncpg.Connection
) -> None:
    server = await start_server(ticket_ttl_seconds=2)
    ticket, expires_at = await ticket_for(server, make_token("alice"))
    async with await open_stream(server.url, params={"ticket": ticket}) as stream:
        await asyncio.sleep(max(0.0, expires_at + 0.2 - time.time()))
        assert_invalid(await stream_status(server, params={"ticket": ticket}), "an expired ticket")
        await db.execute("INSERT INTO messages (recipient, data) VALUES ('alice', '1')")
        [event] = await stream.messages(1)
    assert event.data == "1"


async def test_a_tampered_ticket_is_refused(server: RunningServer) -> None:
    ticket, _ = await ticket_for(server, make_token("alice"))
    header, _, signature = ticket.split(".")
    claims = jwt.decode(ticket, options={"verify_signature": False})
    for case, changes in {"stretched": {"exp": claims["exp"] + 3600}, "someone else": {"sub": "bob"}}.items():
        forged_payload = jwt.utils.base64url_encode(json.dumps({**claims, **changes}).encode()).decode()
        forged = f"{header}.{forged_payload}.{signature}"
        assert_invalid(await stream_status(server, params={"ticket": forged}), case)
    assert_invalid(await stream_status(server, params={"ticket": ticket[:-4]}), "truncated")
    assert_invalid(await stream_status(server, params={"ticket": "garbage"}), "garbage")


async def test_a_ticket_is_good_for_nothing_but_the_stream_query(server: RunningServer) -> None:
    ticket, _ = await ticket_for(server, make_token("alice"))
    assert_invalid(await request_ticket(server, ticket), "a ticket as Bearer on POST /events/ticket")
    bearer = {"Authorization": f"Bearer {ticket}"}
    async with httpx.AsyncClient(base_url=server.url, **CLIENT_OPTIONS) as client:
        assert_invalid(await client.get("/me/messages", headers=bearer), "on GET /me/messages")
        read = await client.post("/me/messages/read", headers=bearer, json={"through": 1})
        assert_invalid(read, "on POST /me/messages/read")
        body = {"recipients": ["alice"], "event": "lead", "data": {}}
        assert_invalid(await client.post("/messages", headers=bearer, json=body), "on POST /messages")
    assert_invalid(await stream_status(server, headers={"Authorization": f"Bearer {ticket}"}), "as Bearer")
    assert_invalid(await stream_status(server, cookies={"pgpush_token": ticket}), "as the cookie")
    assert_invalid(await stream_status(server, params={"access_token": ticket}), "as access_token")
    # Nor does an API token pass for a ticket.
    assert_invalid(await stream_status(server, params={"ticket": make_token("alice")}), "token as ticket")
    assert (await stream_status(server, params={"ticket": ticket})).status_code == 200


async def test_a_ticket_from_one_replica_opens_a_stream_on_another(start_server: ServerFactory) -> None:
    first, second = await start_server(), await start_server()
    ticket, _ = await ticket_for(first, make_token("alice"))
    assert (await stream_status(second, params={"ticket": ticket})).status_code == 200


async def test_tickets_need_a_secret_when_tokens_are_verified_with_a_public_key(
    start_server: ServerFactory,
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    token = jwt.encode({"sub": "alice", "exp": int(time.time()) + 600}, key, algorithm="ES256")
    without = await start_server(jwt_secret=None, jwt_public_key=pem)
    response = await request_ticket(without, token)
    assert response.status_code == 501
    assert response.json()["error"] == "tickets_unavailable"
    assert "PGPUSH_TICKET_SECRET" in response.json()["detail"]
    with_secret = await start_server(jwt_secret=None, jwt_public_key=pem, ticket_secret=TICKET_SECRET)
    ticket, _ = await ticket_for(with_secret, token)
    assert (await stream_status(with_secret, params={"ticket": ticket})).status_code == 200


async def test_no_credentials_for_a_ticket_is_a_bare_bearer_challenge(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url, **CLIENT_OPTIONS) as client:
        response = await client.post("/events/ticket")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"] == "unauthorized"

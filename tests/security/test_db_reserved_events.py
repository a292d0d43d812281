"""Finding 4: a row named like a control event (pause, reset, token_expired, pgpush…) could make a client
reconnect in a loop or sleep for days. The table's CHECK and the API refuse such names."""

from __future__ import annotations

import asyncpg
import httpx
import pytest

from tests.conftest import make_token
from tests.serve_process import ServerProcess
from tests.sse_client import open_stream

RESERVED = ["pause", "reset", "token_expired", "pgpush", "pgpush.sync", "pgpush_anything"]


async def test_the_api_refuses_every_reserved_event_name(service: ServerProcess) -> None:
    publisher = make_token("backend", scope="messages:publish")
    async with httpx.AsyncClient(base_url=service.url, timeout=30) as client:
        for event in RESERVED:
            response = await client.post(
                "/messages",
                json={"recipients": ["alice"], "event": event, "data": {"reconnect_at": 2**53}},
                headers={"Authorization": f"Bearer {publisher}"},
            )
            assert response.status_code == 422, (event, response.text)
            body = response.json()
            assert body["error"] == "invalid_request"
            assert "reserved" in body["detail"]
            assert [f["field"] for f in body["fields"]] == ["event"]


@pytest.mark.parametrize("event", RESERVED)
async def test_the_table_refuses_a_reserved_event_name_from_any_writer(
    writer: asyncpg.Connection, event: str
) -> None:
    with pytest.raises(asyncpg.CheckViolationError, match="messages_event_not_reserved"):
        await writer.execute(
            "INSERT INTO messages (recipient, event, data) VALUES ('alice', $1, '{\"reconnect_at\": 1}')",
            event,
        )


async def test_names_that_only_resemble_control_events_are_ordinary(
    service: ServerProcess, writer: asyncpg.Connection
) -> None:
    async with await open_stream(service.url, make_token("alice")) as alice:
        for event in ("Pause", "paused", "reset_password", "my.pgpush"):
            await writer.execute(
                "INSERT INTO messages (recipient, event, data) VALUES ('alice', $1, '1')", event
            )
        rows = await alice.messages(4, timeout=30)
    assert [row.type for row in rows] == ["Pause", "paused", "reset_password", "my.pgpush"]

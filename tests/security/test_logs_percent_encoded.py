"""Credentials hidden by percent-encoding never reach the log (issue: the scrubber read the raw query).

`GET /events?access%5Ftoken=%65%79%4A…` is a working credential: the server decodes the query before it reads
it. The access log line, written from the raw query, used to keep the whole token. A real `pgpush serve`,
its stderr captured whole, is asked with every credential form encoded and must log none of them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from tests.conftest import make_token
from tests.hostile.raw import get_events, raw_request
from tests.serve_process import ServerProcess


def encoded(text: str) -> str:
    """Every character percent-encoded, as a client may legitimately send it."""
    return "".join(f"%{byte:02X}" for byte in text.encode())


def fragments(secret: str) -> list[str]:
    """The credential, each long dot-separated part of it, and their encoded forms."""
    parts = [secret, *(part for part in secret.split(".") if len(part) >= 16)]
    return parts + [encoded(part) for part in parts]


@pytest.fixture
async def serve(database_url: str) -> AsyncIterator[ServerProcess]:
    server = ServerProcess(database_url, log_level="info")
    await server.ready()
    yield server
    await server.stop()


@pytest.mark.timeout(60)
async def test_percent_encoded_tokens_and_tickets_are_scrubbed_from_the_access_log(
    serve: ServerProcess,
) -> None:
    by_name = make_token("encoded-name")
    by_value = make_token("encoded-value")
    for_ticket = make_token("ticket-holder")
    async with httpx.AsyncClient(base_url=serve.url, timeout=10) as client:
        issued = await client.post("/events/ticket", headers={"Authorization": f"Bearer {for_ticket}"})
    assert issued.status_code == 200
    ticket = issued.json()["ticket"]
    secrets = {"by-name": by_name, "by-value": by_value, "ticket": ticket}

    targets = [
        f"/events?access%5Ftoken={encoded(by_name)}",  # the example: name and value encoded
        f"/events?access_token={encoded(by_value)}&lastEventId=%30",
        f"/events?tick%65t={encoded(ticket)}",
    ]
    for target in targets:
        answer = await raw_request(serve.port, get_events(target=target.encode()))
        # Each was a working credential: the server decoded it and opened the stream.
        assert answer.status == 200, (target, answer.body)

    assert await serve.stop() == 0
    output = serve.output
    assert output.count('"GET /events') >= 3, f"the access log was captured: {output}"
    leaks = [name for name, secret in secrets.items() if any(part in output for part in fragments(secret))]
    assert leaks == [], f"credentials in the logs: {leaks}\n{output}"
    assert output.count("[redacted]") >= 3

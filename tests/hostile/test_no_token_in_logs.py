"""No log line ever contains a token or a ticket (protocol §3), wherever the credential was sent and whatever
the answer was: a real `pgpush serve` logging at debug level, its stderr captured whole."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from tests.conftest import JWT_SECRET, make_token
from tests.polling import wait_until
from tests.serve_process import HOST, ServerProcess
from tests.sse_client import SSEStream

OTHER_SECRET = "not-the-servers-secret-but-long-enough-for-hs256"


@pytest.fixture
async def serve(database_url: str) -> AsyncIterator[ServerProcess]:
    server = ServerProcess(database_url, log_level="debug", max_streams_per_user=1)
    await server.ready()
    yield server
    await server.stop()


def fragments(secret: str) -> list[str]:
    """The credential and each of its dot-separated parts long enough to be recognisable."""
    return [secret, *(part for part in secret.split(".") if len(part) >= 16)]


@pytest.mark.timeout(60)
async def test_tokens_and_tickets_never_reach_the_logs(serve: ServerProcess) -> None:
    secrets: dict[str, str] = {}

    def token(name: str, **kwargs: object) -> str:
        secrets[name] = make_token(name, **kwargs)  # type: ignore[arg-type]
        return secrets[name]

    async def stream(**kwargs: object) -> None:
        """Open a stream, see its first frame, hang up."""
        opened = await SSEStream.open(HOST, serve.port, **kwargs)  # type: ignore[arg-type]
        assert opened.status == 200, opened.body
        await wait_until(lambda: opened.retries != [])
        await opened.close()

    async with httpx.AsyncClient(base_url=serve.url, timeout=10) as client:
        await stream(token=token("by-header"))
        await stream(token=None, params={"access_token": token("by-query")})
        await stream(token=None, headers=[("Cookie", f"pgpush_token={token('by-cookie')}")])
        issued = await client.post(
            "/events/ticket", headers={"Authorization": f"Bearer {token('for-ticket')}"}
        )
        assert issued.status_code == 200
        secrets["ticket"] = issued.json()["ticket"]
        await stream(token=None, params={"ticket": secrets["ticket"]})

        forged = {
            n: token(f"forged-{n}", secret=OTHER_SECRET) for n in ("header", "query", "ticket", "cookie")
        }
        refused: list[tuple[str, str, dict[str, str], dict[str, str], int]] = [
            ("forged in the header", "/events", {"Authorization": f"Bearer {forged['header']}"}, {}, 401),
            ("forged in the query", "/events", {}, {"access_token": forged["query"]}, 401),
            ("forged ticket", "/events", {}, {"ticket": forged["ticket"]}, 401),
            ("forged in the cookie", "/events", {"Cookie": f"pgpush_token={forged['cookie']}"}, {}, 401),
            ("expired in the query", "/events", {}, {"access_token": token("expired", ttl=-3600)}, 401),
            ("a bad cursor", "/events", {}, {"access_token": token("bad-cursor"), "lastEventId": "x"}, 400),
            ("not a Bearer header", "/events", {"Authorization": f"Basic {token('basic')}"}, {}, 401),
            ("a 404 with a token", "/nowhere", {}, {"access_token": token("lost")}, 404),
        ]
        for case, path, headers, params, status in refused:
            response = await client.get(path, headers=headers, params=params)
            assert response.status_code == status, f"{case}: {response.status_code} {response.text}"
        # Over the per-user cap of 1: the refusal is logged with the request's query string.
        held = await SSEStream.open(HOST, serve.port, token("capped"))
        over = await client.get("/events", params={"access_token": secrets["capped"]})
        assert over.status_code == 429
        await held.close()
    assert await serve.stop() == 0

    output = serve.output
    assert output.count('"GET /events') >= 10, "the access log was captured"
    assert "[redacted]" in output, "credentials were sent where a log line would have shown them"
    leaks = [name for name, secret in secrets.items() if any(part in output for part in fragments(secret))]
    assert leaks == [], f"credentials in the logs: {leaks}"
    assert JWT_SECRET not in output

"""No log line ever contains a token or a ticket (DESIGN §3), wherever the credential was sent and whatever
the answer was: a real `pgpush serve` logging at debug level, its stderr captured whole."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from tests.conftest import JWT_SECRET, make_token
from tests.faults.client import LightStream, wait_until
from tests.serve_process import HOST, ServerProcess

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
        opened = await LightStream.open(HOST, serve.port, **kwargs)  # type: ignore[arg-type]
        assert opened.status == 200, opened.body
        await wait_until(lambda: opened.retries != [], within=5)
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
        refused: list[tuple[str, str, dict[str, str], dict[str, str]]] = [
            ("forged in the header", "/events", {"Authorization": f"Bearer {forged['header']}"}, {}),
            ("forged in the query", "/events", {}, {"access_token": forged["query"]}),
            ("forged ticket", "/events", {}, {"ticket": forged["ticket"]}),
            ("forged in the cookie", "/events", {"Cookie": f"pgpush_token={forged['cookie']}"}, {}),
            ("expired in the query", "/events", {}, {"access_token": token("expired", ttl=-3600)}),
            ("a bad cursor", "/events", {}, {"access_token": token("bad-cursor"), "lastEventId": "x"}),
            ("not a Bearer header", "/events", {"Authorization": f"Basic {token('basic')}"}, {}),
            ("a 404 with a token", "/nowhere", {}, {"access_token": token("lost")}),
        ]
        for case, path, headers, params in refused:
            response = await client.get(path, headers=headers, params=params)
            assert 400 <= response.status_code < 500, case
        # Over the per-user cap of 1: the refusal is logged with the request's query string.
        held = await LightStream.open(HOST, serve.port, token("capped"))
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

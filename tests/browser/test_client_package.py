"""The browser client package (@pgpush/client, clients/js) in real Chromium against the real server, for
what the inbox page tests (test_inbox_page.py: tab sharing, hand-overs, restarts, tickets, the page's
cookie) do not already cover: the `token` option, every row exactly once whatever its type, a pause and
its delay, and `reset` making the application reload its inbox over REST.

A blank page of the server's origin imports /static/pgpush-client.js (the package's module, as the demo
page does) and calls connect(); what the client reports is recorded in `window` and polled from here.
"""

from __future__ import annotations

import json
import time
from typing import Any

import asyncpg
from playwright.async_api import BrowserContext, Page, Request, Route

from tests.browser.chromium import WAIT_S, insert
from tests.conftest import RunningServer, ServerFactory, insert_rows, make_token
from tests.polling import wait_until

BLANK = "<!doctype html><meta charset=utf-8><title>blank</title>"

# An application's use of the package: a token (sent as a Bearer header), every callback recorded, and on
# `reset` the inbox reloaded over REST, as the README tells applications to do.
CLIENT = """async ([token]) => {
  const { connect } = await import("/static/pgpush-client.js");
  Object.assign(window, { messages: [], statuses: [], resets: [], inboxes: [] });
  window.stream = connect({
    token,
    shared: false,
    onMessage: (message) => window.messages.push(message),
    onStatus: (status) => window.statuses.push({ ...status, at: Date.now() }),
    onReset: async (info) => {
      window.resets.push(info);
      const headers = { Authorization: `Bearer ${token}` };
      const response = await fetch("/me/messages?unread=true&limit=500", { headers });
      window.inboxes.push((await response.json()).messages.map((m) => String(m.seq)));
    },
  });
}"""


async def open_client(
    context: BrowserContext, server: RunningServer, token: str
) -> tuple[Page, list[Request]]:
    """A blank page on the server's origin (no script, no cookie) running CLIENT; its /events requests."""
    page = await context.new_page()

    async def blank(route: Route) -> None:
        await route.fulfill(content_type="text/html", body=BLANK)

    await page.route(f"{server.url}/blank", blank)
    requests: list[Request] = []
    page.on("request", lambda r: requests.append(r) if "/events" in r.url else None)
    await page.goto(f"{server.url}/blank")
    await page.evaluate(CLIENT, [token])
    return page, requests


async def wait_for(page: Page, expression: str, what: str) -> None:
    async def holds() -> bool:
        return bool(await page.evaluate(expression))

    await wait_until(holds, within=WAIT_S, what=what)


def lives(statuses: list[dict[str, Any]]) -> int:
    return sum(status["state"] == "live" for status in statuses)


async def test_token_option_streams_every_row_of_any_type_exactly_once(
    server: RunningServer, db: asyncpg.Connection, context: BrowserContext
) -> None:
    token = make_token("alice")
    before = await insert(db, "invoice.paid", '{"n": 1}')  # replayed on connect
    page, requests = await open_client(context, server, token)
    await wait_for(page, "window.statuses.some((s) => s.state === 'live')", "live")
    assert await context.cookies() == [], "the token alone authenticates"

    # Types nothing registers for (EventSource would drop all but `message`).
    written = [(before, "invoice.paid", {"n": 1})]
    for event, data in (("chat", {"text": "hi"}), ("message", "plain"), ("log", [1, 2]), ("lead", {"n": 5})):
        written.append((await insert(db, event, json.dumps(data)), event, data))
    await wait_for(page, f"window.messages.length >= {len(written)}", "every row")

    # A new connection resumes after the last row, with the token again: nothing comes twice.
    await page.evaluate("window.stream.reconnect()")
    await wait_for(page, "window.statuses.filter((s) => s.state === 'live').length >= 2", "live again")
    written.append((await insert(db, "lead", '{"n": 6}'), "lead", {"n": 6}))
    await wait_for(page, f"window.messages.length >= {len(written)}", "the row after the reconnect")

    expected = [{"type": event, "id": str(seq), "data": data} for seq, event, data in written]
    assert await page.evaluate("window.messages") == expected
    assert len(requests) == 2
    for request in requests:
        assert (await request.all_headers())["authorization"] == f"Bearer {token}"
        assert "token" not in request.url and "ticket" not in request.url
    assert requests[1].url == f"{server.url}/events?lastEventId={written[4][0]}"


async def test_a_pause_is_honoured_with_its_delay_and_resumes_from_the_last_row(
    start_server: ServerFactory, db: asyncpg.Connection, context: BrowserContext
) -> None:
    server = await start_server(idle_timeout_seconds=1, pause_retry_ms=2500)
    page, requests = await open_client(context, server, make_token("alice"))
    await wait_for(page, "window.statuses.some((s) => s.state === 'live')", "live")
    written_after = time.time() * 1000
    first = await insert(db, "lead", '{"n": 1}')
    await wait_for(page, "window.messages.length === 1", "the first row")

    # A second of no rows: the server pauses the stream, reconnect_at = then + 2.5 s.
    await wait_for(page, "window.statuses.some((s) => s.state === 'paused')", "paused")
    meanwhile = await insert(db, "lead", '{"n": 2}')
    await wait_for(page, "window.messages.length === 2", "the row written during the pause")

    statuses = await page.evaluate("window.statuses")
    paused_at = next(i for i, s in enumerate(statuses) if s["state"] == "paused")
    paused, resumed = statuses[paused_at], statuses[paused_at + 1]
    assert paused["reconnectAt"] >= written_after + 1000 + 2500, "the pause's reconnect_at, not sooner"
    assert resumed["state"] == "connecting" and resumed["at"] >= paused["reconnectAt"], (
        "no reconnect before it"
    )
    assert paused["lastEventId"] == str(first)
    # (The stream may pause again later: only the first two requests are this test's.)
    first_two = [r.url for r in requests[:2]]
    assert first_two == [f"{server.url}/events", f"{server.url}/events?lastEventId={first}"]
    assert [m["id"] for m in await page.evaluate("window.messages")] == [str(first), str(meanwhile)]


async def test_reset_calls_on_reset_and_the_application_reloads_the_inbox_over_rest(
    start_server: ServerFactory, db: asyncpg.Connection, context: BrowserContext
) -> None:
    # More unread rows than the stream replays: `reset` (too_many_unread) first, then the newest three.
    server = await start_server(replay_limit=3)
    unread = await insert_rows(db, "alice", 5)
    page, _ = await open_client(context, server, make_token("alice"))
    await wait_for(page, "window.inboxes.length === 1", "onReset reloaded the inbox")
    assert await page.evaluate("window.resets") == [{"reason": "too_many_unread"}]
    assert await page.evaluate("window.inboxes[0]") == [str(seq) for seq in reversed(unread)]

    after = await insert(db, "lead", '{"n": 6}')
    await wait_for(page, "window.messages.length >= 4", "the live row after the replay")
    assert [m["id"] for m in await page.evaluate("window.messages")] == [
        str(s) for s in [*unread[-3:], after]
    ]
    assert lives(await page.evaluate("window.statuses")) == 1, "a reset needs no new connection"

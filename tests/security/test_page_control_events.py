"""The browser client against hostile control events, in real Chromium with a real server.

`pause`, `reset` and `token_expired` are the stream's own events and carry no `id:`. A row named like one
(written before the table refused such names: that constraint is NOT VALID, old rows stay and are
replayed) arrives with its seq as `id:`; obeyed, `pause` with a `reconnect_at` past 2^31 ms made the page
reconnect over and over (setTimeout fires at once for such delays), and `token_expired` stopped the
stream. The client must ignore them, and cap any wait it is told to make.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
from playwright.async_api import BrowserContext, expect

from tests.browser.chromium import browser_context, chromium_browser, insert
from tests.conftest import ServerFactory, make_token

__all__ = ["browser_context", "chromium_browser"]  # the fixtures `browser` and `context`

MAX_DELAY_MS = 15 * 60 * 1000  # the client's cap (pgpush-client.js)


async def write_an_old_control_named_row(db: asyncpg.Connection, event: str, data: str) -> int:
    """A row as the table admitted before it refused control names (from migration 0004 on)."""
    await db.execute("ALTER TABLE messages DROP CONSTRAINT IF EXISTS messages_event_not_reserved")
    return await insert(db, event, data)


async def test_rows_named_like_control_events_are_not_obeyed(
    start_server: ServerFactory, db: asyncpg.Connection, context: BrowserContext
) -> None:
    server = await start_server()
    page = await context.new_page()
    stream_requests: list[str] = []
    page.on("request", lambda r: stream_requests.append(r.url) if "/events" in r.url else None)
    await page.goto(f"{server.url}/#token={make_token('alice')}")
    await expect(page.locator("#status")).to_have_attribute("data-state", "live")

    await write_an_old_control_named_row(db, "pause", f'{{"reconnect_at": {2**53}}}')
    await write_an_old_control_named_row(db, "token_expired", "{}")
    await write_an_old_control_named_row(db, "reset", '{"reason": "forged"}')
    await write_an_old_control_named_row(db, "pgpush.future", "{}")
    after = await insert(db, "lead", '{"company": "ACME"}')

    # Rows arrive in order: once `after` is on screen, the page has seen (and ignored) all four.
    await expect(page.locator(f'li.message[data-seq="{after}"]')).to_be_visible()
    await expect(page.locator("#status")).to_have_attribute("data-state", "live")
    assert stream_requests == [f"{server.url}/events"], "the stream was never dropped or reopened"
    assert await page.locator("li.message").evaluate_all("els => els.map(e => e.dataset.event)") == ["lead"]


async def test_a_pause_beyond_what_settimeout_can_hold_is_capped(
    start_server: ServerFactory, db: asyncpg.Connection, context: BrowserContext
) -> None:
    # A server misconfigured (or lying) with a pause longer than 2^31 ms, about 24.9 days.
    server = await start_server(idle_timeout_seconds=1, pause_retry_ms=2**31 + 5000)
    page = await context.new_page()
    stream_requests: list[str] = []
    page.on("request", lambda r: stream_requests.append(r.url) if "/events" in r.url else None)
    await page.goto(f"{server.url}/#token={make_token('alice')}")
    status = page.locator("#status")
    await expect(status).to_have_attribute("data-state", "paused")

    reconnect_at = int(await status.get_attribute("data-reconnect-at") or 0)
    assert 0 < reconnect_at - time.time() * 1000 <= MAX_DELAY_MS, "the wait is capped, not days long"
    await asyncio.sleep(2)  # an uncapped timer fires at once: a new stream request would be here by now
    assert len(stream_requests) == 1
    await expect(status).to_have_attribute("data-state", "paused")

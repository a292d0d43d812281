"""The live inbox page at / in a real headless Chromium: live rows, mark-read, pause, restarts, shared tabs.

Playwright drives Debian's `chromium` (/usr/bin/chromium); it never downloads a browser. Without either the
module is skipped, unless PGPUSH_REQUIRE_BROWSER=1 (CI) turns the absence into a failure.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
import uvicorn
from pgpush.cli import DrainingServer
from pgpush.config import Settings

from tests.conftest import RunningServer, ServerFactory, make_token, settings_for

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "inbox.png"

try:
    from playwright.async_api import Browser, BrowserContext, Page, expect
except ImportError:  # pragma: no cover - depends on the machine
    missing: str | None = "playwright is not installed (pip install playwright)"
else:
    missing = None if Path(CHROMIUM).exists() else f"{CHROMIUM} is missing (apt-get install chromium)"
if missing:
    if os.environ.get("PGPUSH_REQUIRE_BROWSER") == "1":
        raise RuntimeError(f"browser tests are required here but {missing}")
    pytest.skip(f"browser tests need a browser: {missing}", allow_module_level=True)

INSERT = "INSERT INTO messages (recipient, event, data) VALUES ($1, $2, $3) RETURNING seq"


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=30_000
        )
        yield chromium
        await chromium.close()


@pytest.fixture
async def context(browser: Browser) -> AsyncIterator[BrowserContext]:
    """One browser profile: its tabs share cookies, Web Locks and BroadcastChannels."""
    ctx = await browser.new_context(viewport={"width": 980, "height": 760}, device_scale_factor=1)
    ctx.set_default_timeout(10_000)
    errors: list[str] = []
    ctx.on("page", lambda page: page.on("pageerror", lambda exc: errors.append(str(exc))))
    yield ctx
    await ctx.close()
    assert errors == [], "the page threw"


async def open_inbox(context: BrowserContext, server: RunningServer, token: str | None = None) -> Page:
    """A new tab on the inbox, with the token in the fragment as a sign-in link would carry it."""
    page = await context.new_page()
    await page.goto(f"{server.url}/#token={token}" if token else f"{server.url}/")
    await expect(page.locator("#status")).to_have_attribute("data-state", "live")
    return page


async def insert(db: asyncpg.Connection, event: str, data: str, recipient: str = "alice") -> int:
    seq: int = await db.fetchval(INSERT, recipient, event, data)
    return seq


async def read_at_is_set(db: asyncpg.Connection) -> dict[int, bool]:
    records = await db.fetch("SELECT seq, read_at IS NOT NULL AS read FROM messages ORDER BY seq")
    return {r["seq"]: r["read"] for r in records}


async def test_the_page_takes_the_token_from_the_fragment_and_shows_a_new_row_within_2_s(
    server: RunningServer, db: asyncpg.Connection, context: BrowserContext
) -> None:
    page = await context.new_page()
    await page.goto(f"{server.url}/")
    await expect(page.locator("#status-text")).to_have_text("no token")
    assert server.stream_count == 0
    await page.goto(f"{server.url}/#token={make_token('alice')}")  # only the fragment changes: no page load
    await expect(page.locator("#status")).to_have_attribute("data-state", "live")
    assert page.url == f"{server.url}/"  # the fragment is gone from the address bar and the history
    [cookie] = [c for c in await context.cookies() if c["name"] == "pgpush_token"]
    assert cookie["path"] == "/" and cookie["sameSite"] == "Strict"
    await expect(page.locator("#user")).to_have_text("alice")
    await expect(page.locator("#badge")).to_have_text("0")

    seq = await insert(db, "lead", '{"company": "ACME", "phone": "+1 555 0100"}')
    await insert(db, "lead", '{"company": "not for alice"}', recipient="bob")
    message = page.locator(f'li.message[data-seq="{seq}"]')
    await expect(message).to_be_visible(timeout=2000)
    await expect(message.locator(".event")).to_have_text("lead")
    await expect(message.locator(".data")).to_have_text(
        '{\n  "phone": "+1 555 0100",\n  "company": "ACME"\n}'
    )
    await expect(page.locator("li.message")).to_have_count(1)
    await expect(page.locator("#badge")).to_have_text("1")


async def test_events_of_a_type_the_page_learns_from_the_inbox_arrive_live(
    server: RunningServer, db: asyncpg.Connection, context: BrowserContext
) -> None:
    await insert(db, "invoice.paid", '{"n": 1}')  # a type the page does not know before it loads
    page = await open_inbox(context, server, make_token("alice"))
    await expect(page.locator("li.message")).to_have_count(1)
    seq = await insert(db, "invoice.paid", '{"n": 2}')
    await expect(page.locator(f'li.message[data-seq="{seq}"] .event')).to_have_text(
        "invoice.paid", timeout=2000
    )
    message_seq = await insert(db, "message", '"plain"')  # the table's default type needs no listing
    await expect(page.locator(f'li.message[data-seq="{message_seq}"]')).to_be_visible(timeout=2000)


async def test_mark_read_updates_badge_list_and_postgres_and_a_reload_shows_only_unread_rows(
    server: RunningServer, db: asyncpg.Connection, context: BrowserContext, tmp_path: Path
) -> None:
    first = await insert(db, "lead", '{"company": "ACME"}')
    second = await insert(db, "notice", '{"text": "Quarterly report is ready"}')
    third = await insert(db, "lead", '{"company": "Globex"}')
    page = await open_inbox(context, server, make_token("alice"))
    messages = page.locator("li.message")
    await expect(messages).to_have_count(3)
    assert await messages.evaluate_all("els => els.map(e => Number(e.dataset.seq))") == [third, second, first]
    await expect(page.locator("#badge")).to_have_text("3")

    await page.locator(f'li.message[data-seq="{second}"] button.mark').click()
    await expect(page.locator("#badge")).to_have_text("2")
    await expect(page.locator(f'li.message[data-seq="{second}"]')).to_have_class(re.compile(r"\bread\b"))
    assert await read_at_is_set(db) == {first: False, second: True, third: False}

    await page.reload()
    await expect(page.locator("#status")).to_have_attribute("data-state", "live")
    await expect(messages).to_have_count(2)
    await asyncio.sleep(0.3)  # the stream's replay of unread rows must not bring the read one back
    assert await messages.evaluate_all("els => els.map(e => Number(e.dataset.seq))") == [third, first]
    await expect(page.locator("#badge")).to_have_text("2")

    await page.locator("#mark-all").click()
    await expect(page.locator("#badge")).to_have_text("0")
    await expect(page.locator("li.message.unread")).to_have_count(0)
    assert await read_at_is_set(db) == {first: True, second: True, third: True}

    await page.reload()
    await expect(page.locator("#status")).to_have_attribute("data-state", "live")
    await expect(page.locator("#empty")).to_be_visible()
    await expect(messages).to_have_count(0)


async def test_a_pause_reconnects_with_the_last_event_id_and_loses_nothing(
    start_server: ServerFactory, db: asyncpg.Connection, context: BrowserContext
) -> None:
    server = await start_server(idle_timeout_seconds=1, pause_retry_ms=500)
    page = await context.new_page()
    stream_urls: list[str] = []
    page.on("request", lambda r: stream_urls.append(r.url) if "/events" in r.url else None)
    await page.goto(f"{server.url}/#token={make_token('alice')}")
    first = await insert(db, "lead", '{"n": 1}')
    await expect(page.locator(f'li.message[data-seq="{first}"]')).to_be_visible(timeout=2000)

    await expect(page.locator("#status")).to_have_attribute("data-state", "paused", timeout=5000)
    await expect(page.locator("#status-text")).to_contain_text("paused, reconnecting at ")
    await server.wait_for(lambda: server.stream_count == 0, timeout=2)
    during = [
        r["seq"]
        for r in await db.fetch(
            "INSERT INTO messages (recipient, event, data) "
            "SELECT 'alice', 'lead', jsonb_build_object('n', n) FROM generate_series(2, 4) AS n RETURNING seq"
        )
    ]
    assert server.stream_count == 0, "the rows were meant to be written while no stream was open"

    for seq in during:
        await expect(page.locator(f'li.message[data-seq="{seq}"]')).to_be_visible(timeout=5000)
    await expect(page.locator("li.message")).to_have_count(4)
    assert stream_urls[0] == f"{server.url}/events"
    assert stream_urls[1] == f"{server.url}/events?lastEventId={first}"  # a new EventSource, the old cursor


async def test_a_reset_after_the_data_was_wiped_reloads_the_inbox(
    start_server: ServerFactory, db: asyncpg.Connection, context: BrowserContext
) -> None:
    server = await start_server(idle_timeout_seconds=1, pause_retry_ms=1000)
    old = [await insert(db, "lead", f'{{"old": {n}}}') for n in (1, 2, 3)]
    page = await open_inbox(context, server, make_token("alice"))
    await expect(page.locator("li.message")).to_have_count(3)

    # While the stream is paused the data is reset: ids start over, so the page's cursor is now ahead.
    await expect(page.locator("#status")).to_have_attribute("data-state", "paused", timeout=5000)
    await server.wait_for(lambda: server.stream_count == 0, timeout=2)
    async with db.transaction():
        await db.execute("DELETE FROM messages; DELETE FROM message_counters")
        await db.execute("SELECT setval(pg_get_serial_sequence('messages', 'seq'), 1, false)")
        new = await insert(db, "lead", '{"new": 1}')
    assert server.stream_count == 0, "the data was meant to be reset while no stream was open"
    assert new <= old[-1]

    await expect(page.locator("li.message")).to_have_count(1, timeout=5000)
    await expect(page.locator(f'li.message[data-seq="{new}"] .data')).to_have_text('{\n  "new": 1\n}')


async def test_token_expiry_stops_the_stream_and_says_so(
    start_server: ServerFactory, context: BrowserContext
) -> None:
    server = await start_server(retry_ms=200)  # a browser left to itself would be back within 200 ms
    page = await context.new_page()
    stream_urls: list[str] = []
    page.on("request", lambda r: stream_urls.append(r.url) if "/events" in r.url else None)
    await page.goto(f"{server.url}/#token={make_token('alice', ttl=2)}")
    await expect(page.locator("#status")).to_have_attribute("data-state", "live")
    await expect(page.locator("#status")).to_have_attribute("data-state", "expired", timeout=6000)
    await expect(page.locator("#notice")).to_contain_text("token expired")
    await asyncio.sleep(1)
    assert len(stream_urls) == 1, "an expired token must not reconnect"
    assert server.stream_count == 0


class DrainingTestServer(RunningServer):
    """A test server stopped like `pgpush serve` on SIGTERM: streams get `retry:` and close, then it exits."""

    def __init__(self, settings: Settings, port: int = 0) -> None:
        super().__init__(settings)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
        self.server = DrainingServer(config, self.app)
        self._thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def stop(self) -> None:
        self.server.handle_exit(signal.SIGTERM, None)
        self._thread.join(timeout=15)


async def test_after_a_server_restart_the_page_reconnects_and_gets_what_was_written_meanwhile(
    database_url: str, db: asyncpg.Connection, context: BrowserContext
) -> None:
    settings = settings_for(database_url, shutdown_jitter_ms=0, retry_ms=1000)
    first_run = await asyncio.to_thread(DrainingTestServer(settings).start)
    page = await open_inbox(context, first_run, make_token("alice"))
    first = await insert(db, "lead", '{"n": 1}')
    await expect(page.locator(f'li.message[data-seq="{first}"]')).to_be_visible(timeout=2000)

    await asyncio.to_thread(first_run.stop)
    await expect(page.locator("#status")).not_to_have_attribute("data-state", "live")
    meanwhile = await insert(db, "lead", '{"n": 2}')

    port = int(first_run.url.rsplit(":", 1)[1])  # the same address, as behind a Service after a deploy
    second_run = await asyncio.to_thread(DrainingTestServer(settings, port).start)
    try:
        await expect(page.locator(f'li.message[data-seq="{meanwhile}"]')).to_be_visible(timeout=8000)
        await expect(page.locator("#status")).to_have_attribute("data-state", "live")
        assert second_run.stream_count == 1
    finally:
        await asyncio.to_thread(second_run.stop)


async def test_three_tabs_share_one_stream_and_a_closing_holder_hands_it_over(
    server: RunningServer, db: asyncpg.Connection, context: BrowserContext
) -> None:
    tabs = [await open_inbox(context, server, make_token("alice"))]
    tabs += [await open_inbox(context, server) for _ in range(2)]  # the cookie is set now
    roles = [await tab.evaluate("document.body.dataset.role") for tab in tabs]
    assert sorted(roles) == ["follower", "follower", "leader"]
    for _ in range(10):
        assert server.stream_count == 1
        await asyncio.sleep(0.05)

    seqs = [await insert(db, "lead", f'{{"n": {n}}}') for n in (1, 2)]
    for tab in tabs:
        for seq in seqs:
            await expect(tab.locator(f'li.message[data-seq="{seq}"]')).to_be_visible(timeout=2000)

    holder = tabs.pop(roles.index("leader"))
    await holder.close()
    during_handover = await insert(db, "lead", '{"n": 3}')
    for tab in tabs:
        await expect(tab.locator(f'li.message[data-seq="{during_handover}"]')).to_be_visible(timeout=5000)
    assert sorted([await tab.evaluate("document.body.dataset.role") for tab in tabs]) == [
        "follower",
        "leader",
    ]
    await server.wait_for(lambda: server.stream_count == 1, timeout=5)

    after = await insert(db, "lead", '{"n": 4}')
    for tab in tabs:
        await expect(tab.locator(f'li.message[data-seq="{after}"]')).to_be_visible(timeout=2000)
        await expect(tab.locator("li.message")).to_have_count(4)
    assert server.stream_count == 1


TICKET_CLIENT = """async ([token]) => {
  const { openStream } = await import("/static/pgpush-client.js");
  window.received = [];
  const ticket = async () => {
    const headers = { Authorization: `Bearer ${token}` };
    const response = await fetch("/events/ticket", { method: "POST", headers });
    return (await response.json()).ticket;
  };
  openStream({
    ticket,
    shared: false,
    types: ["lead"],
    onEvent: (e) => {
      window.received.push([e.id, e.type, e.data]);
      document.body.dataset.received = String(window.received.length);
    },
    onStatus: (s) => { document.body.dataset.stream = s.state; },
  });
}"""


async def test_the_client_module_streams_with_a_ticket_and_no_cookie(
    server: RunningServer, db: asyncpg.Connection, context: BrowserContext
) -> None:
    page = await context.new_page()
    stream_urls: list[str] = []
    page.on("request", lambda r: stream_urls.append(r.url) if "/events?" in r.url else None)
    await page.goto(f"{server.url}/")  # no token: the page itself opens no stream
    await expect(page.locator("#status-text")).to_have_text("no token")
    await page.evaluate(TICKET_CLIENT, [make_token("alice")])
    await expect(page.locator("body")).to_have_attribute("data-stream", "live")
    assert await context.cookies() == []
    seq = await insert(db, "lead", '{"company": "ACME"}')
    await expect(page.locator("body")).to_have_attribute("data-received", "1", timeout=2000)
    assert await page.evaluate("window.received") == [[str(seq), "lead", {"company": "ACME"}]]
    assert [url.split("?")[1].split("=")[0] for url in stream_urls] == ["ticket"]


async def test_screenshot_of_the_inbox(
    server: RunningServer, db: asyncpg.Connection, context: BrowserContext, tmp_path: Path
) -> None:
    """A picture for the README: saved under the test's tmp dir, and to docs/ when missing or asked for."""
    await insert(db, "notice", '{"text": "Welcome to pgpush: rows written to Postgres show up here live."}')
    read = await insert(db, "task", '{"title": "Call back Initech", "due": "2025-07-01", "done": false}')
    page = await open_inbox(context, server, make_token("alice"))
    await insert(db, "lead", '{"company": "Globex", "contact": "Hank Scorpio", "budget": 250000}')
    last = await insert(db, "lead", '{"company": "ACME", "phone": "+1 555 0100", "hot": true}')
    await expect(page.locator(f'li.message[data-seq="{last}"]')).to_be_visible(timeout=2000)
    await page.locator(f'li.message[data-seq="{read}"] button.mark').click()
    await expect(page.locator("#badge")).to_have_text("3")

    artifact = tmp_path / "inbox.png"
    await page.screenshot(
        path=str(artifact), full_page=True, animations="disabled"
    )  # no half-faded arrival highlight
    assert artifact.stat().st_size > 10_000
    if not DOCS_SCREENSHOT.exists() or os.environ.get("PGPUSH_UPDATE_SCREENSHOT") == "1":
        DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(artifact, DOCS_SCREENSHOT)

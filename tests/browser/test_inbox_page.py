"""The live inbox page at / in a real headless Chromium: live rows, mark-read, pause, restarts, shared tabs.

The browser and its fixtures come from tests/browser/chromium.py (skipped without Chromium, except in CI).
Every wait polls its condition with the generous bound set there; none relies on a timing window.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import signal
import struct
import threading
from pathlib import Path

import asyncpg
import uvicorn
from pgpush.cli import DrainingServer
from pgpush.config import Settings
from playwright.async_api import BrowserContext, Page, Route, expect

from tests.browser.chromium import WAIT_S, insert, open_inbox, wait_for_one_holder, wait_for_streams
from tests.conftest import RunningServer, ServerFactory, make_token, settings_for
from tests.polling import wait_until


async def read_at_is_set(db: asyncpg.Connection) -> dict[int, bool]:
    records = await db.fetch("SELECT seq, read_at IS NOT NULL AS read FROM messages ORDER BY seq")
    return {r["seq"]: r["read"] for r in records}


async def test_the_page_takes_the_token_from_the_fragment_and_shows_new_rows_live(
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
    await expect(message).to_be_visible()
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
    await expect(page.locator(f'li.message[data-seq="{seq}"] .event')).to_have_text("invoice.paid")
    message_seq = await insert(db, "message", '"plain"')  # the table's default type needs no listing
    await expect(page.locator(f'li.message[data-seq="{message_seq}"]')).to_be_visible()


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
    # The stream replays unread rows first, in order: once a newer row is on screen the replay is done,
    # and it must not have brought the read one back.
    fourth = await insert(db, "lead", '{"company": "Initech"}')
    await expect(page.locator(f'li.message[data-seq="{fourth}"]')).to_be_visible()
    assert await messages.evaluate_all("els => els.map(e => Number(e.dataset.seq))") == [fourth, third, first]
    await expect(page.locator("#badge")).to_have_text("3")

    await page.locator("#mark-all").click()
    await expect(page.locator("#badge")).to_have_text("0")
    await expect(page.locator("li.message.unread")).to_have_count(0)
    assert await read_at_is_set(db) == {first: True, second: True, third: True, fourth: True}

    await page.reload()
    await expect(page.locator("#status")).to_have_attribute("data-state", "live")
    await expect(page.locator("#empty")).to_be_visible()
    await expect(messages).to_have_count(0)


class HeldRequests:
    """Holds a page's matching requests until released: an explicit synchronisation point, so the test can
    act while the browser is known to have no stream open instead of racing its reconnect timer."""

    def __init__(self) -> None:
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()

    async def handle(self, route: Route) -> None:
        self.arrived.set()
        await self.release.wait()
        await route.continue_()

    async def wait_arrived(self) -> None:
        await asyncio.wait_for(self.arrived.wait(), timeout=WAIT_S)


# Every text the status line showed, however briefly (the paused one lasts only until the timer fires).
RECORD_STATUS_TEXTS = """
window.statusTexts = [];
document.addEventListener("DOMContentLoaded", () => {
  const text = document.getElementById("status-text");
  const record = () => window.statusTexts.push(text.textContent);
  new MutationObserver(record).observe(text, { childList: true, characterData: true, subtree: true });
});
"""
RECONNECT = re.compile(r"/events\?lastEventId=")


async def test_a_pause_reconnects_with_the_last_event_id_and_loses_nothing(
    start_server: ServerFactory, db: asyncpg.Connection, context: BrowserContext
) -> None:
    server = await start_server(idle_timeout_seconds=1, pause_retry_ms=500)
    page = await context.new_page()
    stream_urls: list[str] = []
    page.on("request", lambda r: stream_urls.append(r.url) if "/events" in r.url else None)
    held = HeldRequests()
    await page.route(RECONNECT, held.handle)
    await page.add_init_script(RECORD_STATUS_TEXTS)
    await page.goto(f"{server.url}/#token={make_token('alice')}")
    first = await insert(db, "lead", '{"n": 1}')
    await expect(page.locator(f'li.message[data-seq="{first}"]')).to_be_visible()

    await held.wait_arrived()  # the page's timer fired; its new stream waits here until released
    texts: list[str] = await page.evaluate("window.statusTexts")
    assert any(text.startswith("paused, reconnecting at ") for text in texts), texts
    await server.wait_for(lambda: server.stream_count == 0)
    during = [
        r["seq"]
        for r in await db.fetch(
            "INSERT INTO messages (recipient, event, data) "
            "SELECT 'alice', 'lead', jsonb_build_object('n', n) FROM generate_series(2, 4) AS n RETURNING seq"
        )
    ]
    assert server.stream_count == 0, "the rows were meant to be written while no stream was open"
    held.release.set()

    for seq in during:
        await expect(page.locator(f'li.message[data-seq="{seq}"]')).to_be_visible()
    await expect(page.locator("li.message")).to_have_count(4)
    assert stream_urls[0] == f"{server.url}/events"
    assert stream_urls[1] == f"{server.url}/events?lastEventId={first}"  # a new EventSource, the old cursor


async def test_a_reset_after_the_data_was_wiped_reloads_the_inbox(
    start_server: ServerFactory, db: asyncpg.Connection, context: BrowserContext
) -> None:
    server = await start_server(idle_timeout_seconds=1, pause_retry_ms=1000)
    old = [await insert(db, "lead", f'{{"old": {n}}}') for n in (1, 2, 3)]
    page = await context.new_page()
    held = HeldRequests()
    await page.route(RECONNECT, held.handle)
    await page.goto(f"{server.url}/#token={make_token('alice')}")
    await expect(page.locator("li.message")).to_have_count(3)

    # While the stream is paused the data is reset: ids start over, so the page's cursor is now ahead.
    await held.wait_arrived()  # paused, and its reconnect is held until the reset is done
    await server.wait_for(lambda: server.stream_count == 0)
    async with db.transaction():
        await db.execute("DELETE FROM messages; DELETE FROM message_counters")
        await db.execute("SELECT setval(pg_get_serial_sequence('messages', 'seq'), 1, false)")
        new = await insert(db, "lead", '{"new": 1}')
    assert server.stream_count == 0, "the data was meant to be reset while no stream was open"
    assert new <= old[-1]
    held.release.set()

    await expect(page.locator("li.message")).to_have_count(1)
    await expect(page.locator(f'li.message[data-seq="{new}"] .data')).to_have_text('{\n  "new": 1\n}')


async def test_token_expiry_stops_the_stream_and_says_so(
    start_server: ServerFactory, context: BrowserContext
) -> None:
    server = await start_server(retry_ms=200)  # a browser left to itself would be back within 200 ms
    page = await context.new_page()
    stream_urls: list[str] = []
    page.on("request", lambda r: stream_urls.append(r.url) if "/events" in r.url else None)
    # Long enough to go live first on a loaded machine; the server ends the stream at `exp`.
    await page.goto(f"{server.url}/#token={make_token('alice', ttl=6)}")
    await expect(page.locator("#status")).to_have_attribute("data-state", "live")
    await expect(page.locator("#status")).to_have_attribute("data-state", "expired")
    await expect(page.locator("#notice")).to_contain_text("token expired")
    await asyncio.sleep(2)  # ten times the retry interval: a reconnect would have been tried by now
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
    await expect(page.locator(f'li.message[data-seq="{first}"]')).to_be_visible()

    await asyncio.to_thread(first_run.stop)
    await expect(page.locator("#status")).not_to_have_attribute("data-state", "live")
    meanwhile = await insert(db, "lead", '{"n": 2}')

    port = int(first_run.url.rsplit(":", 1)[1])  # the same address, as behind a Service after a deploy
    second_run = await asyncio.to_thread(DrainingTestServer(settings, port).start)
    try:
        await expect(page.locator(f'li.message[data-seq="{meanwhile}"]')).to_be_visible()
        await expect(page.locator("#status")).to_have_attribute("data-state", "live")
        assert second_run.stream_count == 1
    finally:
        await asyncio.to_thread(second_run.stop)


IS_HOLDER = "document.body.dataset.role === 'leader'"


async def test_three_tabs_share_one_stream_and_a_closing_holder_hands_it_over(
    server: RunningServer, db: asyncpg.Connection, context: BrowserContext
) -> None:
    tabs = [await open_inbox(context, server, make_token("alice"))]
    tabs += [await open_inbox(context, server) for _ in range(2)]  # the cookie is set now
    holder = await wait_for_one_holder(tabs, IS_HOLDER)
    await wait_for_streams(server, 1)

    seqs = [await insert(db, "lead", f'{{"n": {n}}}') for n in (1, 2)]
    for tab in tabs:
        for seq in seqs:
            await expect(tab.locator(f'li.message[data-seq="{seq}"]')).to_be_visible()

    # A closed tab's document outlives page.close() for a moment (its Web Lock is still held, the server
    # still counts its stream): the hand-over is over when the lock and the pages say so, not before.
    tabs.remove(holder)
    await holder.close()
    during_handover = await insert(db, "lead", '{"n": 3}')
    await wait_for_one_holder(tabs, IS_HOLDER)
    for tab in tabs:
        await expect(tab.locator(f'li.message[data-seq="{during_handover}"]')).to_be_visible()
    await wait_for_streams(server, 1)

    after = await insert(db, "lead", '{"n": 4}')
    for tab in tabs:
        await expect(tab.locator(f'li.message[data-seq="{after}"]')).to_be_visible()
        await expect(tab.locator("li.message")).to_have_count(4)
    await wait_for_streams(server, 1)


# A tab using the client module as an application would, recording every delivery (not only what the DOM
# shows, which would hide a row delivered twice) and whether it holds the stream.
RECORDING_CLIENT = """async ([token]) => {
  const { connect } = await import("/static/pgpush-client.js");
  window.received = [];
  window.holds = false;
  const ticket = async () => {
    const headers = { Authorization: `Bearer ${token}` };
    const response = await fetch("/events/ticket", { method: "POST", headers });
    return (await response.json()).ticket;
  };
  connect({
    getTicket: ticket,
    onMessage: (e) => window.received.push(Number(e.id)),
    onStatus: (s) => { window.holds = s.leader; },
  });
}"""


class RowFlow:
    """Rows written for alice one after another, in the background, until stopped.

    Stopping lets the write under way finish: a cancelled INSERT may have committed without being counted.
    """

    def __init__(self, db: asyncpg.Connection) -> None:
        self.db = db
        self.seqs: list[int] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _write(self) -> None:
        while not self._stop.is_set():
            self.seqs.append(await insert(self.db, "lead", f'{{"n": {len(self.seqs)}}}'))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=0.02)

    def start(self) -> None:
        self._stop.clear()
        self._task = asyncio.create_task(self._write())

    async def stop(self) -> None:
        assert self._task is not None
        self._stop.set()
        await self._task


async def test_closing_the_holder_ten_times_with_rows_flowing_loses_and_repeats_nothing(
    server: RunningServer, db: asyncpg.Connection, context: BrowserContext
) -> None:
    token = make_token("alice")
    tabs: list[Page] = []
    for _ in range(11):  # ten hand-overs leave one tab
        tab = await context.new_page()
        await tab.goto(f"{server.url}/")  # no token: the page opens no stream of its own
        await tab.evaluate(RECORDING_CLIENT, [token])
        tabs.append(tab)
    holder = await wait_for_one_holder(tabs, "window.holds")
    await wait_for_streams(server, 1)
    flow = RowFlow(db)

    for handover in range(10):
        flow.start()
        await server.wait_for(lambda: len(flow.seqs) > 2)  # rows are flowing
        tabs.remove(holder)
        await holder.close()
        holder = await wait_for_one_holder(tabs, "window.holds")
        await wait_for_streams(server, 1)
        await flow.stop()

        async def everyone_has_everything() -> bool:
            counts = [await tab.evaluate("window.received.length") for tab in tabs]
            return all(count >= len(flow.seqs) for count in counts)

        await wait_until(
            everyone_has_everything, within=WAIT_S, what=f"hand-over {handover}: all rows in all tabs"
        )
        for tab in tabs:
            assert await tab.evaluate("window.received") == flow.seqs, f"hand-over {handover}"
    await wait_for_streams(server, 1)


TICKET_CLIENT = """async ([token]) => {
  const { connect } = await import("/static/pgpush-client.js");
  window.received = [];
  const ticket = async () => {
    const headers = { Authorization: `Bearer ${token}` };
    const response = await fetch("/events/ticket", { method: "POST", headers });
    return (await response.json()).ticket;
  };
  connect({
    getTicket: ticket,
    shared: false,
    onMessage: (e) => {
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
    await expect(page.locator("body")).to_have_attribute("data-received", "1")
    assert await page.evaluate("window.received") == [[str(seq), "lead", {"company": "ACME"}]]
    assert [url.split("?")[1].split("=")[0] for url in stream_urls] == ["ticket"]


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk."""
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and header[12:16] == b"IHDR", "not a PNG"
    width, height = struct.unpack(">II", header[16:24])
    return width, height


async def test_screenshot_of_the_inbox_shows_the_whole_page_as_laid_out(
    server: RunningServer, db: asyncpg.Connection, context: BrowserContext, tmp_path: Path
) -> None:
    """A picture like the README's (docs/inbox.png), taken into the test's tmp dir, and what it shows."""
    await insert(db, "notice", '{"text": "Welcome to pgpush: rows written to Postgres show up here live."}')
    read = await insert(db, "task", '{"title": "Call back Initech", "due": "2025-07-01", "done": false}')
    page = await open_inbox(context, server, make_token("alice"))
    await insert(db, "lead", '{"company": "Globex", "contact": "Hank Scorpio", "budget": 250000}')
    last = await insert(db, "lead", '{"company": "ACME", "phone": "+1 555 0100", "hot": true}')
    await expect(page.locator(f'li.message[data-seq="{last}"]')).to_be_visible()
    await page.locator(f'li.message[data-seq="{read}"] button.mark').click()
    await expect(page.locator("#badge")).to_have_text("3")

    picture = tmp_path / "inbox.png"
    await page.screenshot(path=str(picture), full_page=True, animations="disabled")  # no half-faded arrival
    layout = await page.evaluate(
        "() => ({ width: document.documentElement.scrollWidth,"
        " height: document.documentElement.scrollHeight })"
    )
    assert png_size(picture) == (980, layout["height"]), "the whole page, at the viewport's width"
    assert layout["width"] <= 980, "nothing sticks out sideways"

    def style(selector: str, prop: str) -> str:
        return f"getComputedStyle(document.querySelector('{selector}')).{prop}"

    assert await page.evaluate(style(f'li.message[data-seq="{read}"]', "opacity")) == "0.62"
    assert await page.evaluate(style(f'li.message[data-seq="{last}"]', "opacity")) == "1"
    assert await page.evaluate(style("#status .dot", "backgroundColor")) == "rgb(34, 160, 107)"  # live: green
    await expect(page.locator(f'li.message[data-seq="{read}"] button.mark')).to_be_hidden()
    await expect(page.locator(f'li.message[data-seq="{last}"] button.mark')).to_be_visible()
    boxes = await page.locator("li.message").evaluate_all(
        "els => els.map(e => { const r = e.getBoundingClientRect(); return [r.top, r.bottom]; })"
    )
    assert len(boxes) == 4 and all(a[1] <= b[0] for a, b in itertools.pairwise(boxes)), (
        "rows stacked, no overlap"
    )


async def test_every_row_shows_whatever_its_type_and_mark_all_read_marks_only_what_is_on_screen(
    start_server: ServerFactory, db: asyncpg.Connection, context: BrowserContext
) -> None:
    # More unread rows than the stream replays (it sends `reset` instead) and than the page loads at once
    # (100): the oldest five are never on screen.
    server = await start_server(replay_limit=50)
    await db.execute(
        "INSERT INTO messages (recipient, event, data) "
        "SELECT 'alice', 'backlog', jsonb_build_object('n', n) FROM generate_series(1, 105) AS n"
    )
    unseen = [r["seq"] for r in await db.fetch("SELECT seq FROM messages ORDER BY seq LIMIT 5")]
    inbox_reads: list[str] = []
    context.on("requestfinished", lambda r: inbox_reads.append(r.url) if "/me/messages?" in r.url else None)
    page = await open_inbox(context, server, make_token("alice"))
    await expect(page.locator("li.message")).to_have_count(100)
    await expect(page.locator("#more")).to_be_visible()
    # The page reads the inbox twice: on load, and again on the stream's `reset`. Both must be answered
    # before the live rows go in: a reread answered after them would hold the newest 100 unread rows,
    # live ones included, and rightly push one more backlog row off screen.
    await wait_until(lambda: len(inbox_reads) >= 2, within=WAIT_S, what="the page reread its inbox on reset")

    # Types no list names: the README's own `publish --follow … --event log`, a chat, then a lead.
    live = [await insert(db, event, '{"text": "hi"}') for event in ("chat", "log", "lead")]
    for seq, event in zip(live, ("chat", "log", "lead"), strict=True):
        await expect(page.locator(f'li.message[data-seq="{seq}"] .event')).to_have_text(event)
    await expect(page.locator("#badge")).to_have_text("103+")

    await page.locator("#mark-all").click()
    await expect(page.locator("li.message.unread")).to_have_count(0)
    unread = [r["seq"] for r in await db.fetch("SELECT seq FROM messages WHERE read_at IS NULL ORDER BY seq")]
    assert unread == unseen, "only what the page showed is marked read"

    # With every unread row on screen, one `through` marks them, and nothing newer than the screen.
    await page.locator("#more").click()
    for seq in unseen:
        await expect(page.locator(f'li.message[data-seq="{seq}"]')).to_be_visible()
    await expect(page.locator("#more")).to_be_hidden()
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.post_data or "") if r.url.endswith("/read") else None)
    await page.locator("#mark-all").click()
    await expect(page.locator("#badge")).to_have_text("0")
    assert requests == [f'{{"through":{live[-1]}}}']
    assert await db.fetchval("SELECT count(*) FROM messages WHERE read_at IS NULL") == 0

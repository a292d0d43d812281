"""Real headless Chromium for the page tests: fixtures and helpers shared by tests/browser and tests/security.

Playwright drives Debian's `chromium` (/usr/bin/chromium); it never downloads a browser. Without either, a
module importing this one is skipped, unless PGPUSH_REQUIRE_BROWSER=1 (CI) turns the absence into a failure.
A test module outside tests/browser uses the fixtures (`browser`, `context`) by importing them:
`from tests.browser.chromium import browser_context, chromium_browser`.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.conftest import RunningServer
from tests.polling import wait_until

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
# Generous bounds for a loaded 2-core machine: waits end as soon as their condition holds.
WAIT_MS = 15_000
WAIT_S = WAIT_MS / 1000

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

# Which tab holds the shared stream, seen from inside one tab: the Web Lock the client queues on.
LOCKS = """async () => {
  const { held, pending } = await navigator.locks.query();
  return { held: held.filter((l) => l.name === "pgpush-stream").length,
           pending: pending.filter((l) => l.name === "pgpush-stream").length };
}"""


@pytest.fixture(name="browser")
async def chromium_browser() -> AsyncIterator[Browser]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000
        )
        yield chromium
        await chromium.close()


@pytest.fixture(name="context")
async def browser_context(browser: Browser) -> AsyncIterator[BrowserContext]:
    """One browser profile: its tabs share cookies, Web Locks and BroadcastChannels."""
    ctx = await browser.new_context(viewport={"width": 980, "height": 760}, device_scale_factor=1)
    ctx.set_default_timeout(WAIT_MS)
    expect.set_options(timeout=WAIT_MS)
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


async def metric(server: RunningServer, name: str) -> float:
    """One unlabelled sample from the server's /metrics, as a scraper reads it."""
    async with httpx.AsyncClient(base_url=server.url) as client:
        text = (await client.get("/metrics")).text
    [value] = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(f"{name} ")]
    return value


async def wait_for_one_holder(tabs: list[Page], role: str) -> Page:
    """Poll until exactly one of `tabs` says it holds the stream and the lock shows one holder and the rest
    queued; return that tab. `role` is a JS expression evaluated in each tab, true in the holder."""

    async def settled() -> bool:
        roles = [await tab.evaluate(role) for tab in tabs]
        locks = await tabs[0].evaluate(LOCKS)
        return roles.count(True) == 1 and locks == {"held": 1, "pending": len(tabs) - 1}

    await wait_until(settled, within=WAIT_S, what="exactly one tab holds the stream, the others queue")
    roles = [await tab.evaluate(role) for tab in tabs]
    return tabs[roles.index(True)]


async def wait_for_streams(server: RunningServer, count: int) -> None:
    """Poll /metrics until the server counts `count` open streams (a closed tab's may linger a moment)."""

    async def counted() -> bool:
        return await metric(server, "pgpush_streams") == count

    await wait_until(counted, within=WAIT_S, what=f"pgpush_streams == {count}")


async def insert(db: asyncpg.Connection, event: str, data: str, recipient: str = "alice") -> int:
    """One row as a product backend writes it; its seq."""
    seq: int = await db.fetchval(
        "INSERT INTO messages (recipient, event, data) VALUES ($1, $2, $3) RETURNING seq",
        recipient,
        event,
        data,
    )
    return seq

"""The demo page's session in real Chromium: the token is not readable by scripts, no other origin's
script runs on the service's origin, and a link cannot switch the signed-in user without asking.

Each test performs the attack: a script on the page reads `document.cookie`, a request for the API docs
pulls a CDN script onto the origin, a link carries someone else's token.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import httpx
from playwright.async_api import BrowserContext, Dialog, Request, expect

from tests.browser.chromium import browser_context, chromium_browser, open_inbox
from tests.conftest import RunningServer, ServerFactory, make_token
from tests.polling import wait_until

__all__ = ["browser_context", "chromium_browser"]  # the fixtures `browser` and `context`


async def test_a_script_on_the_page_cannot_read_the_token(
    server: RunningServer, context: BrowserContext
) -> None:
    token = make_token("alice")
    page = await open_inbox(context, server, token)
    await expect(page.locator("#user")).to_have_text("alice")
    assert page.url == f"{server.url}/"  # the fragment is gone from the address bar and the history

    # What an injected script or an extension's content script would try first.
    assert await page.evaluate("document.cookie") == ""
    [cookie] = [c for c in await context.cookies() if c["name"] == "pgpush_token"]
    assert cookie["value"] == token
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"
    assert cookie["path"] == "/"
    assert cookie["secure"] is False  # plain http here; see the https test below


async def test_the_cookie_is_secure_behind_https_and_bad_tokens_get_json_401s(server: RunningServer) -> None:
    token = make_token("alice", ttl=600)
    async with httpx.AsyncClient(base_url=server.url) as client:
        # As behind a TLS-terminating proxy (uvicorn trusts X-Forwarded-Proto from the loopback proxy).
        response = await client.post(
            "/session", headers={"Authorization": f"Bearer {token}", "X-Forwarded-Proto": "https"}
        )
        assert response.status_code == 200
        assert response.json()["sub"] == "alice"
        set_cookie = response.headers["set-cookie"]
        assert set_cookie.startswith(f"pgpush_token={token};")
        attributes = {part.strip().split("=")[0].lower() for part in set_cookie.split(";")[1:]}
        assert {"httponly", "secure", "samesite", "path", "max-age"} <= attributes
        assert "samesite=strict" in set_cookie.lower()
        max_age = int(set_cookie.lower().split("max-age=")[1].split(";")[0])
        assert 0 < max_age <= 600, "the cookie outlives its token"

        forged = make_token("alice", secret="another-secret-that-is-long-enough-for-hs256")
        response = await client.post("/session", headers={"Authorization": f"Bearer {forged}"})
        assert response.status_code == 401
        assert response.json()["error"] == "invalid_token"
        assert "set-cookie" not in response.headers

        # A cookie alone cannot renew itself: the exchange wants the token in the header.
        response = await client.post("/session", headers={"Cookie": f"pgpush_token={token}"})
        assert response.status_code == 401
        assert response.json()["error"] == "unauthorized"
        assert "set-cookie" not in response.headers

        response = await client.get("/session")
        assert (response.status_code, response.json()["error"]) == (401, "unauthorized")


async def test_a_link_with_someone_elses_token_asks_before_switching_user(
    server: RunningServer, context: BrowserContext
) -> None:
    page = await open_inbox(context, server, make_token("alice"))
    await expect(page.locator("#user")).to_have_text("alice")
    questions: list[str] = []
    answer = {"accept": False}

    async def on_dialog(dialog: Dialog) -> None:
        questions.append(dialog.message)
        await (dialog.accept() if answer["accept"] else dialog.dismiss())

    page.on("dialog", on_dialog)

    # The attacker's link: this browser would show, and mark read, mallory's inbox as if it were alice's.
    mallory = make_token("mallory")
    await page.goto(f"{server.url}/#token={mallory}")
    # Only the fragment changes, so the page stays live throughout: wait for the question itself.
    await wait_until(lambda: len(questions) == 1, what="the page asks before switching user")
    assert '"alice"' in questions[0] and '"mallory"' in questions[0]
    await expect(page.locator("#status")).to_have_attribute("data-state", "live")
    await expect(page.locator("#user")).to_have_text("alice")
    assert (await page.evaluate("fetch('/session').then((r) => r.json())"))["sub"] == "alice"
    assert page.url == f"{server.url}/", "the refused token stays out of the address bar"

    answer["accept"] = True
    await page.goto(f"{server.url}/#token={mallory}")
    await expect(page.locator("#user")).to_have_text("mallory")
    await expect(page.locator("#status")).to_have_attribute("data-state", "live")
    assert len(questions) == 2
    assert (await page.evaluate("fetch('/session').then((r) => r.json())"))["sub"] == "mallory"

    # The same user's fresh token (a renewed sign-in link) switches nobody: no question.
    await page.goto(f"{server.url}/#token={make_token('mallory', ttl=7200)}")
    await expect(page.locator("#status")).to_have_attribute("data-state", "live")
    assert len(questions) == 2


async def test_no_other_origins_script_is_loaded_on_the_services_origin(
    start_server: ServerFactory, context: BrowserContext
) -> None:
    server = await start_server()
    page = await context.new_page()
    origins: set[str] = set()

    def record(request: Request) -> None:
        origins.add(f"{urlsplit(request.url).scheme}://{urlsplit(request.url).netloc}")

    page.on("request", record)
    response = await page.goto(f"{server.url}/docs")
    assert response is not None and response.status == 404
    assert await response.json() == {"error": "not_found", "detail": "Not Found"}

    response = await page.goto(f"{server.url}/#token={make_token('alice')}")
    assert response is not None
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'self'" in csp
    await expect(page.locator("#status")).to_have_attribute("data-state", "live")
    assert origins == {server.url}

    # Asked for, the docs come back (and with them their CDN script: the README says so).
    with_docs = await start_server(api_docs=True)
    async with httpx.AsyncClient(base_url=with_docs.url) as client:
        assert (await client.get("/docs")).status_code == 200

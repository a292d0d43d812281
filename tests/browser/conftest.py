"""The Chromium fixtures `browser` and `context` for every page test in this folder."""

from tests.browser.chromium import browser_context, chromium_browser

__all__ = ["browser_context", "chromium_browser"]

"""GET /: the demo inbox page (DESIGN §4); turned off with PGPUSH_SERVE_PAGE=false.

The page itself is static (service/static: index.html, inbox.js, inbox.css and the copyable client module
pgpush-client.js, served under /static). It loads nothing from another origin, so a strict Content
Security Policy holds: a payload rendered in the page can never run as script.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

router = APIRouter()
INDEX = Path(__file__).resolve().parent.parent / "static" / "index.html"

PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    # The token arrives in the fragment; no Referer is ever needed, so none is sent.
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


@router.get("/", operation_id="demo_page", summary="The live inbox demo page", include_in_schema=False)
async def demo_page() -> FileResponse:
    """The inbox page; its script reads the token from the fragment or the `pgpush_token` cookie."""
    return FileResponse(INDEX, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

"""GET /: the demo inbox page, and /session, its sign-in; all turned off with PGPUSH_SERVE_PAGE=false.

The page itself is static (service/static: index.html, inbox.js, inbox.css and the client module
pgpush-client.js, a link to the package @pgpush/client in clients/js; served under /static). It loads
nothing from another origin, so a strict Content Security Policy holds: a payload rendered in the page
can never run as script.

The token arrives in the page's URL fragment (`/#token=…`, never sent to a server). The page hands it once
to POST /session, which answers with an `HttpOnly; SameSite=Strict` cookie: no script on the origin (an
injected one, a browser extension's content script) can read the token afterwards, and no other site can
send it. The token must come in the Authorization header, which a cross-site form cannot set, so another
site cannot sign the browser in as someone else either.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import FileResponse
from pydantic import BaseModel

from ..auth import Principal
from .deps import TOKEN_COOKIE, CurrentUser, bearer_token
from .errors import ApiError

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


class Session(BaseModel):
    """Who the page's cookie signs in, for display: the page cannot read the cookie itself."""

    sub: str
    expires_at: float


async def header_user(request: Request, user: CurrentUser) -> Principal:
    """The user of a token sent in the Authorization header; a cookie alone does not count here."""
    if bearer_token(request) is None:
        raise ApiError(
            401,
            "unauthorized",
            "send the token as 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return user


@router.get("/", operation_id="demo_page", summary="The live inbox demo page", include_in_schema=False)
async def demo_page() -> FileResponse:
    """The inbox page; its script signs in with the token from the fragment, or keeps the session cookie."""
    return FileResponse(INDEX, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


@router.post("/session", operation_id="open_session", include_in_schema=False)
async def open_session(
    request: Request, response: Response, user: Annotated[Principal, Depends(header_user)]
) -> Session:
    """Exchange a valid token for the page's cookie; it lasts as long as the token does."""
    token = bearer_token(request)
    assert token is not None  # header_user checked it
    response.set_cookie(
        TOKEN_COOKIE,
        token,
        max_age=max(1, int(user.exp - time.time())),
        path="/",
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="strict",
    )
    response.headers["Cache-Control"] = "no-store"
    return Session(sub=user.sub, expires_at=user.exp)


@router.get("/session", operation_id="read_session", include_in_schema=False)
async def read_session(user: CurrentUser, response: Response) -> Session:
    """Who the cookie (or a Bearer token) signs in; 401 when nobody or when the token has expired."""
    response.headers["Cache-Control"] = "no-store"
    return Session(sub=user.sub, expires_at=user.exp)

"""FastAPI dependencies: the caller's identity, as a subscriber, a stream client, or a publisher."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyCookie, APIKeyQuery, HTTPBearer

from ..auth import PUBLISH_SCOPE, AuthError, AuthUnavailableError, Principal, TokenVerifier
from .errors import ApiError

TOKEN_COOKIE = "pgpush_token"

CredentialSource = Literal["header", "cookie", "ticket", "access_token"]

# Declared for the OpenAPI security schemes only (auto_error=False): the functions below read and check
# the credentials themselves, in docs/protocol.md §3's order and with its exact 401 answers.
BEARER_SCHEME = HTTPBearer(
    scheme_name="bearer", auto_error=False, bearerFormat="JWT", description="A JWT whose `sub` is the user"
)
COOKIE_SCHEME = APIKeyCookie(
    scheme_name="cookie", name=TOKEN_COOKIE, auto_error=False, description="The same JWT, as a cookie"
)
TICKET_SCHEME = APIKeyQuery(
    scheme_name="ticket",
    name="ticket",
    auto_error=False,
    description="A 60-second stream ticket from POST /events/ticket",
)
ACCESS_TOKEN_SCHEME = APIKeyQuery(
    scheme_name="accessToken",
    name="access_token",
    auto_error=False,
    description="The JWT in the URL (EventSource cannot set headers)",
)
_Documented = Annotated[object, Security(BEARER_SCHEME)]


def _unauthorized(exc: AuthError) -> ApiError:
    if exc.missing:
        return ApiError(401, "unauthorized", exc.detail, headers={"WWW-Authenticate": "Bearer"})
    return ApiError(
        401, "invalid_token", exc.detail, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}
    )


def _refused(exc: AuthError, verifier: TokenVerifier) -> ApiError:
    if isinstance(exc, AuthUnavailableError):
        # Not the client's fault: the identity provider's keys are out of reach for now.
        return ApiError(
            503, "auth_unavailable", exc.detail, headers={"Retry-After": str(verifier.retry_after_seconds)}
        )
    return _unauthorized(exc)


def _no_credentials() -> AuthError:
    return AuthError("no credentials: send 'Authorization: Bearer <token>'", missing=True)


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized(AuthError("the Authorization header must be 'Bearer <token>'"))
    return token.strip()


def stream_credential(request: Request) -> tuple[CredentialSource, str] | None:
    """docs/protocol.md §3's order, first found wins: header, cookie, `ticket`, `access_token`.

    A browser EventSource cannot set headers, hence the query forms; a ticket is checked as a ticket
    only, and every other form as an API token only.
    """
    token = bearer_token(request)
    if token:
        return "header", token
    found: list[tuple[CredentialSource, str | None]] = [
        ("cookie", request.cookies.get(TOKEN_COOKIE)),
        ("ticket", request.query_params.get("ticket")),
        ("access_token", request.query_params.get("access_token")),
    ]
    for source, value in found:
        if value:
            return source, value
    return None


def _verifier(request: Request) -> TokenVerifier:
    verifier: TokenVerifier = request.app.state.verifier
    return verifier


async def stream_user(
    request: Request,
    _bearer: _Documented,
    _cookie: Annotated[object, Security(COOKIE_SCHEME)],
    _ticket: Annotated[object, Security(TICKET_SCHEME)],
    _access_token: Annotated[object, Security(ACCESS_TOKEN_SCHEME)],
) -> Principal:
    """The user of GET /events: an API token in any of the four places, or a stream ticket."""
    verifier = _verifier(request)
    credential = stream_credential(request)
    try:
        if credential is None:
            raise _no_credentials()
        source, token = credential
        if source != "ticket":
            return await verifier.verify_async(token)
        if verifier.tickets is None:
            raise AuthError("stream tickets are not enabled on this server")
        return verifier.tickets.verify(token)
    except AuthError as exc:
        raise _refused(exc, verifier) from None


async def bearer_user(
    request: Request, _bearer: _Documented, _cookie: Annotated[object, Security(COOKIE_SCHEME)]
) -> Principal:
    """The user of the REST endpoints: a Bearer token (or the demo page's cookie); never a ticket."""
    verifier = _verifier(request)
    token = bearer_token(request) or request.cookies.get(TOKEN_COOKIE)
    try:
        if not token:
            raise _no_credentials()
        return await verifier.verify_async(token)
    except AuthError as exc:
        raise _refused(exc, verifier) from None


async def publisher_user(request: Request, _bearer: _Documented) -> Principal:
    """A publisher: a Bearer token from the publishers' key configuration with `messages:publish`.

    Header only: a cookie would let any page the browser visits publish with the user's token.
    """
    verifier = _verifier(request).publishers
    token = bearer_token(request)
    try:
        if not token:
            raise _no_credentials()
        user = await verifier.verify_async(token)
    except AuthError as exc:
        raise _refused(exc, verifier) from None
    if not user.can_publish:
        raise ApiError(
            403,
            "forbidden",
            f"the token lacks the {PUBLISH_SCOPE!r} scope",
            headers={"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{PUBLISH_SCOPE}"'},
        )
    return user


StreamUser = Annotated[Principal, Depends(stream_user)]
CurrentUser = Annotated[Principal, Depends(bearer_user)]
PublisherUser = Annotated[Principal, Depends(publisher_user)]

"""FastAPI dependencies: the app's components and the caller's identity."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.api.errors import ApiError
from service.auth import AuthError, Principal, TokenVerifier

TOKEN_COOKIE = "pgpush_token"


def _unauthorized(exc: AuthError) -> ApiError:
    if exc.missing:
        return ApiError(401, "unauthorized", exc.detail, headers={"WWW-Authenticate": "Bearer"})
    return ApiError(
        401, "invalid_token", exc.detail, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}
    )


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized(AuthError("the Authorization header must be 'Bearer <token>'"))
    return token.strip()


def stream_token(request: Request) -> str | None:
    """DESIGN §3's order: header, cookie, `ticket`, `access_token` (EventSource cannot set headers)."""
    return (
        bearer_token(request)
        or request.cookies.get(TOKEN_COOKIE)
        or request.query_params.get("ticket")
        or request.query_params.get("access_token")
    )


def _verify(request: Request, token: str | None) -> Principal:
    verifier: TokenVerifier = request.app.state.verifier
    try:
        if not token:
            raise AuthError("no credentials: send 'Authorization: Bearer <token>'", missing=True)
        return verifier.verify(token)
    except AuthError as exc:
        raise _unauthorized(exc) from None


def stream_user(request: Request) -> Principal:
    return _verify(request, stream_token(request))


def bearer_user(request: Request) -> Principal:
    return _verify(request, bearer_token(request) or request.cookies.get(TOKEN_COOKIE))


StreamUser = Annotated[Principal, Depends(stream_user)]
CurrentUser = Annotated[Principal, Depends(bearer_user)]

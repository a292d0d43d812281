"""The request body limits: one ASGI middleware in front of every endpoint.

The body is read here, counting the bytes that actually arrive, so a missing or lying Content-Length
cannot sneak a larger body past it; the handler then gets the body already read. Bodies are at most
PGPUSH_MAX_BODY_BYTES (1 MiB), so holding one in memory is what the handler would do anyway. Every
endpoint that takes a body needs a token, so at most PGPUSH_MAX_UNAUTHENTICATED_BODIES bodies of requests
without a verifying one are read at a time: 200 anonymous clients each sending 1 MiB slowly used to hold
200 MiB; the others are answered 503 before their body is read.

FastAPI's own `max_body_size` answers in plain text when a route does not read its body, so it cannot give
every client docs/protocol.md §4's JSON error; this middleware always does.
"""

from __future__ import annotations

import logging

from starlette.datastructures import Headers
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..auth import AuthError, TokenVerifier
from .deps import TOKEN_COOKIE
from .errors import error_response

log = logging.getLogger("pgpush.api")

# After refusing a body we keep reading (and dropping) up to this much of it before answering, so a client
# that is still sending sees the 413 instead of a connection reset. Past it, the connection is closed.
DRAIN_LIMIT_BYTES = 8 * 1024 * 1024


def _has_body(headers: Headers) -> bool:
    declared = headers.get("content-length")
    return "transfer-encoding" in headers or (declared is not None and declared.strip() not in ("", "0"))


def carries_valid_token(scope: Scope) -> bool:
    """Whether the request has a Bearer header or cookie token that verifies (subscriber or publisher).

    No I/O: a token whose JWKS key is not cached yet counts as unverified, which only means it waits for
    (or is refused) an unauthenticated body slot.
    """
    verifier: TokenVerifier = scope["app"].state.verifier
    connection = HTTPConnection(scope)
    scheme, _, header_token = connection.headers.get("authorization", "").partition(" ")
    token = header_token.strip() if scheme.lower() == "bearer" else ""
    token = token or connection.cookies.get(TOKEN_COOKIE, "")
    if not token:
        return False
    for candidate in (verifier, verifier.publishers):
        try:
            candidate.verify(token)
        except AuthError:
            continue
        return True
    return False


class BodySizeLimit:
    """Answers 413 JSON to any request whose body is over `max_body_bytes`; nothing behind it runs.

    Bodies of requests without a verifying token are read at most `max_unauthenticated_bodies` at a time;
    past that they are answered 503 (with Retry-After and Connection: close) before any is read.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, max_unauthenticated_bodies: int = 8) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_unauthenticated_bodies = max_unauthenticated_bodies
        self.unauthenticated_bodies = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            # A client waiting for "100 Continue" has sent nothing yet: answer at once, read nothing.
            waiting = headers.get("expect", "").lower() == "100-continue"
            await self._refuse(scope, receive, send, int(declared), drained=-1 if waiting else 0)
            return
        if not _has_body(headers) or carries_valid_token(scope):
            await self._read_then_call(scope, receive, send)
            return
        if self.unauthenticated_bodies >= self.max_unauthenticated_bodies:
            # Answered at once, nothing more read: a client still sending a large body may see a reset
            # instead (reading it to the end cost ~400 KiB of socket buffers per connection meanwhile).
            log.info("%s %s -> 503 too many unauthenticated bodies", scope["method"], scope["path"])
            busy = error_response(
                503,
                "server_busy",
                "too many requests without valid credentials are sending bodies; retry later",
                headers={"Retry-After": "1", "Connection": "close"},
            )
            await busy(scope, receive, send)
            return
        self.unauthenticated_bodies += 1
        try:
            await self._read_then_call(scope, receive, send)
        finally:
            self.unauthenticated_bodies -= 1

    async def _read_then_call(self, scope: Scope, receive: Receive, send: Send) -> None:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its whole body: nobody to answer
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                more = bool(message.get("more_body", False))
                await self._refuse(scope, receive, send, size, drained=size if more else -1)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, size: int, *, drained: int) -> None:
        """Drop the rest of the body (bounded), then answer 413. `drained` < 0: read no more of it."""
        if drained >= 0 and not await _discard_body(receive, DRAIN_LIMIT_BYTES - drained):
            return
        log.info(
            "%s %s -> 413 body of %d+ bytes over the %d-byte limit",
            scope["method"],
            scope["path"],
            size,
            self.max_body_bytes,
        )
        response = error_response(
            413,
            "payload_too_large",
            f"the request body is over the {self.max_body_bytes}-byte limit (PGPUSH_MAX_BODY_BYTES)",
        )
        await response(scope, receive, send)


async def _discard_body(receive: Receive, limit: int) -> bool:
    """Read and drop the rest of the body, up to `limit` bytes; False when the client left meanwhile."""
    dropped = 0
    while dropped < limit:
        message = await receive()
        if message["type"] != "http.request":
            return False
        dropped += len(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return True


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands out the body read so far once, then the connection's own messages."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay

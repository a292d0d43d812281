"""The request body limit (PGPUSH_MAX_BODY_BYTES): one ASGI middleware in front of every endpoint.

The body is read here, counting the bytes that actually arrive, so a missing or lying Content-Length
cannot sneak a larger body past it; the handler then gets the body already read. Bodies are at most
PGPUSH_MAX_BODY_BYTES (1 MiB), so holding one in memory is what the handler would do anyway.

FastAPI's own `max_body_size` answers in plain text when a route does not read its body, so it cannot give
every client DESIGN §4's JSON error; this middleware always does.
"""

from __future__ import annotations

import logging

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_response

log = logging.getLogger("pgpush.api")

# After refusing a body we keep reading (and dropping) up to this much of it before answering, so a client
# that is still sending sees the 413 instead of a connection reset. Past it, the connection is closed.
DRAIN_LIMIT_BYTES = 8 * 1024 * 1024


class BodySizeLimit:
    """Answers 413 JSON to any request whose body is over `max_body_bytes`; nothing behind it runs."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

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
        while 0 <= drained < DRAIN_LIMIT_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                return
            drained += len(message.get("body", b""))
            if not message.get("more_body", False):
                break
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

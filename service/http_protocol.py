"""uvicorn's httptools protocol with the limits it lacks: deadlines for request heads and bodies, size caps.

uvicorn reads a request's headers with no timer (its keep-alive timeout only runs between requests) and
no size limit, so one client trickling a header a byte a second (slowloris) or sending a megabyte of
headers holds a connection and memory for as long as it likes; the same goes for a body that stops one
byte short of its Content-Length. Behind ingress-nginx its client_header_timeout, client_body_timeout and
buffer sizes already refuse that; this covers pgpush exposed directly.
"""

from __future__ import annotations

import asyncio
import logging

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("pgpush.http")

HEADER_TIMEOUT_SECONDS = 10.0
BODY_TIMEOUT_SECONDS = 30.0
# Well above a 16 KiB token in a header or the query (both are answered 401 by the API, not refused here).
MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 1024 * 1024
# After refusing a declared-too-large body, the rest the client sends is read and dropped for this long so
# that it sees the 413 (closing with unread data would reset the connection and could lose the answer).
REFUSAL_LINGER_SECONDS = 2.0


def guarded_protocol(
    header_timeout: float, body_timeout: float = BODY_TIMEOUT_SECONDS, max_body_bytes: int = MAX_BODY_BYTES
) -> type[GuardedHttpToolsProtocol]:
    """The protocol class for uvicorn's `http=` setting, with these deadlines and this body limit."""
    limits = {
        "header_timeout": header_timeout,
        "body_timeout": body_timeout,
        "max_body_bytes": max_body_bytes,
    }
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), limits)


def _refusal(status: int, reason: bytes, error: str, detail: str) -> bytes:
    body = orjson.dumps({"error": error, "detail": detail})
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"connection: close\r\n\r\n%s" % (status, reason, len(body), body)
    )


def _declared_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length" and value.isdigit():
            return int(value)
    return None


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """Answers 408 when a request's head or body is not complete in time, 431 when the head is too large,
    413 at once when the declared body is over PGPUSH_MAX_BODY_BYTES; then closes the connection."""

    header_timeout = HEADER_TIMEOUT_SECONDS
    body_timeout = BODY_TIMEOUT_SECONDS
    max_head_bytes = MAX_HEAD_BYTES
    max_body_bytes = MAX_BODY_BYTES
    _head_timer: asyncio.TimerHandle | None = None
    _body_timer: asyncio.TimerHandle | None = None
    _head_bytes = 0
    _refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._disarm_body()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        self._head_bytes = 0
        if self._head_timer is None:
            self._arm()  # the next request on a kept-alive connection
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        if self._count(len(url)):
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._count(len(name) + len(value)):
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm()
        if self._refused:
            return
        declared = _declared_length(self.headers)
        if declared is not None and declared > self.max_body_bytes:
            detail = f"the request body is over the {self.max_body_bytes}-byte limit (PGPUSH_MAX_BODY_BYTES)"
            self._refuse(_refusal(413, b"Content Too Large", "payload_too_large", detail), linger=True)
            return
        # The whole body must arrive within the deadline: the head deadline stops here, and a body one
        # byte short of its Content-Length would otherwise hold the connection (and what came) forever.
        self._body_timer = self.loop.call_later(self.body_timeout, self._body_too_slow)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm_body()
        if not self._refused:
            super().on_message_complete()

    def _count(self, size: int) -> bool:
        if self._refused:
            return False
        self._head_bytes += size
        if self._head_bytes <= self.max_head_bytes:
            return True
        self._refuse(
            _refusal(
                431,
                b"Request Header Fields Too Large",
                "headers_too_large",
                f"the request line and headers exceed {self.max_head_bytes} bytes",
            )
        )
        return False

    def _arm(self) -> None:
        self._head_timer = self.loop.call_later(self.header_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _disarm_body(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_too_slow(self) -> None:
        self._body_timer = None
        if self.cycle is not None and self.cycle.response_started:
            # The app has answered (or is answering) already; the unread rest of the body is not worth a
            # connection. Closing ends the request for the app too (it sees a disconnect).
            log.info("closed a connection whose request body did not arrive within %g s", self.body_timeout)
            self._refused = True
            self.transport.close()
            return
        detail = f"the request body did not arrive within {self.body_timeout:g} s"
        self._refuse(_refusal(408, b"Request Timeout", "request_timeout", detail))

    def _too_slow(self) -> None:
        self._head_timer = None
        if self.cycle is None or self.cycle.response_complete:  # no request in progress past its head
            detail = f"the request headers did not arrive within {self.header_timeout:g} s"
            self._refuse(_refusal(408, b"Request Timeout", "request_timeout", detail))

    def _refuse(self, response: bytes, *, linger: bool = False) -> None:
        """Answer and close. With `linger`, stop writing at once but read (and drop) what the client is
        still sending for a moment, so it reads the answer instead of a connection reset."""
        self._refused = True
        self._disarm()
        self._disarm_body()
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "unknown"
        log.info("refused a request from %s: %s", client, response.split(b"\r\n", 1)[0].decode())
        if self.transport.is_closing():
            return
        self.transport.write(response)
        if linger and self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(REFUSAL_LINGER_SECONDS, self.transport.close)
        else:
            self.transport.close()

"""uvicorn's httptools protocol with two limits it lacks: a deadline and a size cap for request heads.

uvicorn reads a request's headers with no timer (its keep-alive timeout only runs between requests) and
no size limit, so one client trickling a header a byte a second (slowloris) or sending a megabyte of
headers holds a connection and memory for as long as it likes. Behind ingress-nginx its
client_header_timeout and buffer sizes already refuse that; this covers pgpush exposed directly.
"""

from __future__ import annotations

import asyncio
import logging

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("pgpush.http")

HEADER_TIMEOUT_SECONDS = 10.0
# Well above a 16 KiB token in a header or the query (both are answered 401 by the API, not refused here).
MAX_HEAD_BYTES = 64 * 1024


def guarded_protocol(header_timeout: float) -> type[GuardedHttpToolsProtocol]:
    """The protocol class for uvicorn's `http=` setting, with this header deadline."""
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {"header_timeout": header_timeout})


def _refusal(status: int, reason: bytes, error: str, detail: str) -> bytes:
    body = orjson.dumps({"error": error, "detail": detail})
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"connection: close\r\n\r\n%s" % (status, reason, len(body), body)
    )


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """Answers 408 when a request's head is not complete in time, 431 when it is too large; then closes."""

    header_timeout = HEADER_TIMEOUT_SECONDS
    max_head_bytes = MAX_HEAD_BYTES
    _head_timer: asyncio.TimerHandle | None = None
    _head_bytes = 0
    _refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
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
        if not self._refused:
            super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
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

    def _too_slow(self) -> None:
        self._head_timer = None
        if self.cycle is None or self.cycle.response_complete:  # no request in progress past its head
            detail = f"the request headers did not arrive within {self.header_timeout:g} s"
            self._refuse(_refusal(408, b"Request Timeout", "request_timeout", detail))

    def _refuse(self, response: bytes) -> None:
        self._refused = True
        self._disarm()
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "unknown"
        log.info("refused a request head from %s: %s", client, response.split(b"\r\n", 1)[0].decode())
        if not self.transport.is_closing():
            self.transport.write(response)
            self.transport.close()

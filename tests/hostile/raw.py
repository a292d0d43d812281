"""Send request bytes no HTTP library would produce (CR, LF, NUL, raw non-ASCII) and read the answer."""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from typing import Any


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    closed: bool | None  # the server closed the connection after answering (None: not checked)

    def json(self) -> Any:
        return json.loads(self.body)


async def raw_request(
    port: int, request: bytes, within: float = 10, check_close: bool = False
) -> RawResponse:
    """Write `request` as is on a new connection; the response head and (Content-Length) body.

    With `check_close`, also whether the server hangs up after answering (waiting up to 0.2 s for it).
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        async with asyncio.timeout(within):
            writer.write(request)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            status_line, *lines = head.decode("latin-1").split("\r\n")
            headers = {}
            for line in lines:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            status = int(status_line.split()[1])
            body = b""
            if status != 200 and "content-length" in headers:
                body = await reader.readexactly(int(headers["content-length"]))
        closed: bool | None = None
        if check_close:
            closed = False
            with contextlib.suppress(TimeoutError):
                closed = await asyncio.wait_for(reader.read(1), 0.2) == b""
        return RawResponse(status, headers, body, closed)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def get_events(*header_lines: bytes, target: bytes = b"/events") -> bytes:
    """A GET /events request with these header lines (each without its CRLF)."""
    return (
        b"GET "
        + target
        + b" HTTP/1.1\r\nHost: pgpush\r\n"
        + b"".join(h + b"\r\n" for h in header_lines)
        + b"\r\n"
    )

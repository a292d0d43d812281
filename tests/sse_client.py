"""The tests' one SSE client: a raw asyncio socket per stream, h11 for HTTP/1.1, frames split as bytes.

A fault test can hold a thousand of these at once. pgpush ends every line with LF (service/sse.py), so a
frame ends at the first blank line and its fields are read the WHATWG way; a CR in the stream is reported
as a protocol violation. Events are recorded as they arrive (`seqs`, `comments`, `retries`, `controls`)
and can be awaited one by one (`next`, `messages`, `rest`, `quiet`). The full WHATWG parser (CR, CRLF,
BOM) is tests/sse_parser.py, which the encoder's property tests use.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Self
from urllib.parse import urlencode, urlsplit

import h11

READ_SIZE = 256 * 1024
CONTROL_EVENTS = ("reset", "pause", "token_expired")


class ProtocolViolation(AssertionError):
    """The server sent something the SSE contract rules out."""


@dataclass(frozen=True, slots=True)
class Event:
    """A dispatched event: `id` is the frame's own id field (None for control events without one);
    `last_event_id` and `retry` are the stream's values when it was dispatched (as EventSource keeps them)."""

    type: str
    data: str
    id: str | None
    last_event_id: str = ""
    retry: int | None = None

    @property
    def seq(self) -> int:
        return int(self.last_event_id)


class SSEStream:
    """An open GET /events as seen on the wire; row seqs go to `seqs` (a caller's list, if given).

    With `keep_events` every dispatched event is also kept, to be awaited with `next` and its kin.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        conn: h11.Connection,
        response: h11.Response,
        seqs: list[int],
        keep_events: bool,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._conn = conn
        self.status = response.status_code
        self.headers = {name.decode().lower(): value.decode("latin-1") for name, value in response.headers}
        self.body = b""
        self.seqs = seqs
        self.last_event_id = ""
        self.retries: list[int] = []
        self.comments: list[str] = []  # comment lines' text ("ping")
        self.controls: list[Event] = []  # events without an id: reset, pause, token_expired
        self.events: list[Event] | None = [] if keep_events else None
        self._queue: asyncio.Queue[Event | None] | None = asyncio.Queue() if keep_events else None
        self.closed = asyncio.Event()
        self.closed_at: float | None = None  # time.monotonic() when the server ended the stream
        self.violation: ProtocolViolation | None = None
        self._buffer = bytearray()
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        token: str | None,
        *,
        last_event_id: str | int | None = None,
        params: dict[str, str] | None = None,
        headers: list[tuple[str, str]] | None = None,
        seqs: list[int] | None = None,
        keep_events: bool = False,
        read: bool = True,
        within: float = 10,
    ) -> SSEStream:
        """Connect, send the request, read the response head; a 200 starts reading unless `read` is False."""
        async with asyncio.timeout(within):
            reader, writer = await asyncio.open_connection(host, port, limit=READ_SIZE)
            try:
                conn = h11.Connection(h11.CLIENT)
                request_headers = [("Host", f"{host}:{port}"), ("Accept", "text/event-stream")]
                if token is not None:
                    request_headers.append(("Authorization", f"Bearer {token}"))
                if last_event_id is not None:
                    request_headers.append(("Last-Event-ID", str(last_event_id)))
                request_headers += headers or []
                target = "/events" + (f"?{urlencode(params)}" if params else "")
                writer.write(conn.send(h11.Request(method="GET", target=target, headers=request_headers)))
                writer.write(conn.send(h11.EndOfMessage()))
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await reader.read(READ_SIZE))
                    elif isinstance(event, h11.Response):
                        break
                    elif not isinstance(event, h11.InformationalResponse):
                        raise ProtocolViolation(f"expected a response, got {event!r}")
            except BaseException:
                writer.close()
                raise
            stream = cls(reader, writer, conn, event, seqs if seqs is not None else [], keep_events)
            if stream.status != 200:
                await stream._read_body()
            elif read:
                stream.start_reading()
            return stream

    def start_reading(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._read_frames())

    async def _read_body(self) -> None:
        body = bytearray()
        with contextlib.suppress(h11.RemoteProtocolError, ConnectionError):
            while True:
                event = self._conn.next_event()
                if event is h11.NEED_DATA:
                    self._conn.receive_data(await self._reader.read(READ_SIZE))
                elif isinstance(event, h11.Data):
                    body += event.data
                else:
                    break
        self.body = bytes(body)
        self._finish()

    async def _read_frames(self) -> None:
        try:
            while True:
                event = self._conn.next_event()
                if event is h11.NEED_DATA:
                    self._conn.receive_data(await self._reader.read(READ_SIZE))
                elif isinstance(event, h11.Data):
                    self._feed(event.data)
                else:  # EndOfMessage or ConnectionClosed: the server ended the stream
                    break
        except (h11.RemoteProtocolError, ConnectionError):
            pass  # closed mid-chunk (a cut stream): the events parsed so far stand, a partial one is dropped
        except ProtocolViolation as exc:
            self.violation = exc
        finally:
            self._finish()

    def _finish(self) -> None:
        if not self.closed.is_set():
            self.closed_at = time.monotonic()
            self.closed.set()
            if self._queue is not None:
                self._queue.put_nowait(None)  # the end, after every event parsed
        self._writer.close()

    def _feed(self, data: bytes) -> None:
        if b"\r" in data:
            raise ProtocolViolation(f"a CR in the stream: {data[:200]!r}")
        buffer = self._buffer
        buffer += data
        start = 0
        while (end := buffer.find(b"\n\n", start)) >= 0:
            self._frame(bytes(buffer[start:end]))
            start = end + 2
        del buffer[:start]

    def _frame(self, block: bytes) -> None:
        data: list[bytes] = []
        event_type = b""
        frame_id: str | None = None
        for line in block.split(b"\n"):
            if line.startswith(b":"):
                self.comments.append(line[1:].removeprefix(b" ").decode())
                continue
            name, _, value = line.partition(b":")
            value = value.removeprefix(b" ")
            if name == b"data":
                data.append(value)
            elif name == b"event":
                event_type = value
            elif name == b"id":
                frame_id = value.decode()
                self.last_event_id = frame_id
            elif name == b"retry" and value.isdigit():
                self.retries.append(int(value))
        if not data:
            return
        retry = self.retries[-1] if self.retries else None
        event = Event(
            event_type.decode() or "message", b"\n".join(data).decode(), frame_id, self.last_event_id, retry
        )
        if frame_id is None:
            self.controls.append(event)
        else:
            self.seqs.append(int(frame_id))
        if self.events is not None:
            self.events.append(event)
        if self._queue is not None:
            self._queue.put_nowait(event)

    async def close(self) -> None:
        """Hang up (the server sees the client go) and stop reading."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        self._finish()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- awaiting events one by one (keep_events) ---------------------------------------------------

    async def next(self, timeout: float = 30) -> Event:
        """The next event; raises TimeoutError, or EOFError when the server closed the stream."""
        assert self._queue is not None, "opened without keep_events"
        event = await asyncio.wait_for(self._queue.get(), timeout)
        if event is None:
            self._queue.put_nowait(None)
            raise EOFError("the stream ended")
        return event

    async def take(self, count: int, timeout: float = 30) -> list[Event]:
        """Exactly `count` events (within `timeout` overall)."""
        async with asyncio.timeout(timeout):
            return [await self.next(timeout) for _ in range(count)]

    async def messages(self, count: int, timeout: float = 30) -> list[Event]:
        """The next `count` row events (those with an id), skipping control events."""
        found: list[Event] = []
        async with asyncio.timeout(timeout):
            while len(found) < count:
                event = await self.next(timeout)
                if event.id is not None and event.type not in CONTROL_EVENTS:
                    found.append(event)
        return found

    async def rest(self, timeout: float = 30) -> list[Event]:
        """Every event until the server closes the stream."""
        found: list[Event] = []
        async with asyncio.timeout(timeout):
            while True:
                try:
                    found.append(await self.next(timeout))
                except EOFError:
                    return found

    async def quiet(self, seconds: float) -> list[Event]:
        """Whatever arrives within `seconds` (asserted to be nothing, after a sentinel proved delivery)."""
        found: list[Event] = []
        with contextlib.suppress(TimeoutError, EOFError):
            async with asyncio.timeout(seconds):
                while True:
                    found.append(await self.next(seconds))
        return found


async def open_stream(
    base_url: str,
    token: str | None = None,
    *,
    last_event_id: str | int | None = None,
    params: dict[str, str] | None = None,
    cookies: dict[str, str] | None = None,
    expect_status: int = 200,
) -> SSEStream:
    """GET /events on `base_url` with a Bearer token (or other credentials via params/cookies), keeping every
    event to be awaited; fails unless the answer is `expect_status`."""
    url = urlsplit(base_url)
    assert url.hostname is not None and url.port is not None
    headers = [("Cookie", "; ".join(f"{k}={v}" for k, v in cookies.items()))] if cookies else []
    stream = await SSEStream.open(
        url.hostname,
        url.port,
        token,
        last_event_id=last_event_id,
        params=params,
        headers=headers,
        keep_events=True,
        within=30,
    )
    if stream.status != expect_status:
        raise AssertionError(f"GET /events: {stream.status} {stream.body!r}")
    return stream

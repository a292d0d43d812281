"""A light SSE client: one raw asyncio socket per stream, h11 for HTTP/1.1, frames split with bytes methods.

A fault test or the soak tool can hold a thousand of these at once (tests/sse_client.py costs an httpx client
and a pool per stream). pgpush ends every line with LF (service/sse.py), so a frame ends at the first blank
line and its fields are read the WHATWG way; a CR in the stream is reported as a protocol violation. The
full WHATWG parser (CR, CRLF, BOM) is tests/sse_parser.py, which the encoder's property tests use.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from urllib.parse import urlencode

import h11

from tests.faults.ledger import Ledger

READ_SIZE = 256 * 1024


class ProtocolViolation(AssertionError):
    """The server sent something the SSE contract rules out."""


@dataclass(frozen=True, slots=True)
class Event:
    """A dispatched event: `id` is the frame's own id field (None for control events without one)."""

    type: str
    data: bytes
    id: str | None


class LightStream:
    """An open GET /events as seen on the wire; row seqs go to `seqs` (a caller's list, if given)."""

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
        self.comments = 0
        self.controls: list[Event] = []  # events without an id: reset, pause, token_expired
        self.events: list[Event] | None = [] if keep_events else None
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
    ) -> LightStream:
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
                self.comments += 1
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
        event = Event(event_type.decode() or "message", b"\n".join(data), frame_id)
        if frame_id is None:
            self.controls.append(event)
        else:
            self.seqs.append(int(frame_id))
        if self.events is not None:
            self.events.append(event)

    async def close(self) -> None:
        """Hang up (the server sees the client go) and stop reading."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        self._finish()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


async def wait_until(
    predicate: Callable[[], bool], within: float, interval: float = 0.02, what: str = ""
) -> None:
    """Poll `predicate()` until it is true; TimeoutError (naming `what`) after `within` seconds."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not met within {within}s: {what or predicate}")
        await asyncio.sleep(interval)


async def poll(
    check: Callable[[], Awaitable[bool]], within: float, interval: float = 0.05, what: str = ""
) -> None:
    """Like wait_until, for a check that has to ask someone (a server's /metrics, say)."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not met within {within}s: {what or check}")
        await asyncio.sleep(interval)


class ResumingClient:
    """One logical client across connections, as EventSource behaves: when a stream ends it waits the last
    `retry:` it was sent (capped), then reconnects with its Last-Event-ID; refused or 5xx attempts retry too.

    Row seqs of every connection go to one `seqs` list, so a ledger can check the whole history.
    """

    def __init__(
        self,
        host: str,
        port: int,
        token: str,
        seqs: list[int],
        *,
        cursor: str | int | None = None,
        max_delay: float = 3.0,
        refused_delay: float = 0.05,
    ) -> None:
        self.host, self.port, self.token = host, port, token
        self.seqs = seqs
        self.cursor = None if cursor is None else str(cursor)
        self.max_delay = max_delay
        self.refused_delay = refused_delay
        self.connections: list[LightStream] = []  # every answered attempt, in order
        self.refused = 0  # attempts that found no server listening
        self.statuses: list[int] = []

    @property
    def current(self) -> LightStream | None:
        """The open stream, if the client is connected now."""
        last = self.connections[-1] if self.connections else None
        return last if last is not None and last.status == 200 and not last.closed.is_set() else None

    async def run(self, stop: asyncio.Event) -> None:
        """Stay connected until `stop`; then hang up."""
        while not stop.is_set():
            try:
                stream = await LightStream.open(
                    self.host, self.port, self.token, last_event_id=self.cursor, seqs=self.seqs
                )
            except (OSError, TimeoutError, h11.RemoteProtocolError):
                self.refused += 1
                await _sleep_unless(stop, self.refused_delay)
                continue
            self.connections.append(stream)
            self.statuses.append(stream.status)
            if stream.status == 200:
                await _first(stream.closed.wait(), stop.wait())
                if stream.last_event_id:
                    self.cursor = stream.last_event_id
                if stop.is_set():
                    await stream.close()
                    return
            retry_ms = stream.retries[-1] if stream.retries else 1000
            await _sleep_unless(stop, min(retry_ms / 1000, self.max_delay))

    async def hang_up(self) -> None:
        """Drop the current connection (the run loop reconnects)."""
        stream = self.current
        if stream is not None:
            await stream.close()


async def _first(*waits: Coroutine[object, object, object]) -> None:
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def open_ledger_streams(
    port: int, users: list[str], per_user: int, ledger: Ledger, token: Callable[[str], str]
) -> list[LightStream]:
    """`per_user` streams for each user, each recording what it receives in the ledger."""
    return [
        await LightStream.open("127.0.0.1", port, token(user), seqs=ledger.client(f"{user}/{s}", user).seqs)
        for user in users
        for s in range(per_user)
    ]

"""Recipient → live streams: one fetcher reads new rows in batches and copies them into bounded buffers.

The hub never blocks on a stream: a stream whose client does not keep up is closed (it resumes from its
Last-Event-ID), so one slow client cannot stall the others and memory stays bounded (docs/protocol.md §2.4).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from .background import BackgroundTask
from .db import UNAVAILABLE_ERRORS, Database, NewRow, Row, Snapshot
from .hints import CarriedRow, Hint
from .sse import compact_json, message_frame

log = logging.getLogger("pgpush.hub")

# Recipients per fetch query, and rows per query shared among them: small queries let the first events
# leave while later ones are still being read (a 100,000-row burst used to wait for one giant query).
FETCH_CHUNK = 1000
FETCH_ROW_BUDGET = 20000
MIN_PER_RECIPIENT = 10
# Recipients per resync query (their counters against the hub's cursors).
CHECK_CHUNK = 20000
# Unread rows read with a newcomer's cursor: enough to start most fresh or reconnecting streams with no
# query of their own, few enough that a thousand newcomers stay one small result.
NEWCOMER_UNREAD = 32


class CloseReason(StrEnum):
    """Why a stream ended; logged and counted."""

    CLIENT_GONE = "client_gone"
    OVERFLOW = "overflow"
    SEND_TIMEOUT = "send_timeout"
    SHUTDOWN = "shutdown"
    PAUSE = "pause"
    TOKEN_EXPIRED = "token_expired"
    MAX_LIFETIME = "max_lifetime"
    ERROR = "error"


class StreamLimitError(Exception):
    """Opening one more stream would break a cap (`per_user` tells which), or the process is draining."""

    def __init__(self, per_user: bool, *, draining: bool = False) -> None:
        super().__init__("per-user stream limit" if per_user else "process stream limit")
        self.per_user = per_user
        self.draining = draining


@dataclass(slots=True)
class Frame:
    """A row encoded once and shared by every stream of its recipient."""

    seq: int
    data: bytes
    created_at: float


@dataclass(slots=True)
class Batch:
    """What the writer sends at once: the bytes, how many message rows they hold, the oldest row's age."""

    data: bytes
    rows: int
    # For the latency metric: the oldest live row in the write (replayed rows are old by nature, and an
    # ordinary reconnect would fill the histogram alerts watch with its gap), None when none is live.
    oldest_created: float | None


def encode_row(row: Row) -> Frame:
    return Frame(row.seq, message_frame(row.seq, row.event, compact_json(row.data)), row.created_at)


class Stream:
    """One client's connection as the hub sees it: a bounded buffer of encoded frames and a wake-up."""

    __slots__ = (
        "_bytes",
        "_drain_waiter",
        "_frames",
        "_held",
        "_held_bytes",
        "_limit",
        "_oldest_created",
        "_rows",
        "_waiter",
        "close_reason",
        "queued_seq",
        "recipient",
        "send_guard",
        "start",
    )

    def __init__(self, recipient: str, buffer_bytes: int) -> None:
        self.recipient = recipient
        self.queued_seq = 0  # the highest seq handed to the writer
        self.start: Snapshot | None = None  # the hub's cursor when the stream joined: replay stops there
        self.close_reason: CloseReason | None = None
        self._rows = 0  # message rows among the pending frames (the rest are control frames)
        self._oldest_created: float | None = None  # created_at of the oldest pending live row
        self.send_guard: asyncio.Timeout | None = None
        self._frames: list[bytes] = []
        self._bytes = 0
        # Live frames wait here while the replay fills the stream, so the client sees seq order.
        self._held: list[Frame] | None = []
        self._held_bytes = 0
        self._limit = buffer_bytes
        # Bare futures made on demand, not asyncio.Events: an Event carries a deque of about 600 bytes,
        # and tens of thousands of idle streams each held two.
        self._waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None

    def push_live(self, frames: list[Frame]) -> None:
        """Called by the hub's fetcher; never blocks, closes the stream when its buffer is full."""
        if self.close_reason is not None:
            return
        if self._held is not None:
            self._held.extend(frames)
            self._held_bytes += sum(len(f.data) for f in frames)
            if self._held_bytes > self._limit:
                self.close(CloseReason.OVERFLOW)
            return
        self._append(frames, live=True)
        if self._bytes > self._limit:
            self.close(CloseReason.OVERFLOW)

    def push_replay(self, frames: list[Frame]) -> None:
        """Rows read by the replay; its caller waits for `drained` between pages instead of overflowing."""
        self._append(frames, live=False)

    def push_control(self, frame: bytes) -> None:
        """A frame without a seq (reset)."""
        self._frames.append(frame)
        self._bytes += len(frame)
        self._wake()

    def go_live(self) -> None:
        """Replay done: release the live frames that arrived meanwhile, skipping any it already sent."""
        held, self._held, self._held_bytes = self._held or [], None, 0
        self._append(held, live=True)

    def _append(self, frames: Iterable[Frame], *, live: bool) -> None:
        for frame in frames:
            if frame.seq > self.queued_seq:
                self._frames.append(frame.data)
                self._bytes += len(frame.data)
                if live and self._oldest_created is None:
                    self._oldest_created = frame.created_at
                self.queued_seq = frame.seq
                self._rows += 1
        if self._frames:
            self._wake()

    def take(self) -> Batch:
        """Everything pending for the client, to be written in one send."""
        batch = Batch(b"".join(self._frames), self._rows, self._oldest_created)
        self._frames, self._bytes, self._rows, self._oldest_created = [], 0, 0, None
        _resolve(self._drain_waiter)
        return batch

    @property
    def has_pending(self) -> bool:
        return bool(self._frames)

    async def wait(self) -> None:
        """Until there is something to write or the stream is closed."""
        if self._frames or self.close_reason is not None:
            return
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def wait_drained(self) -> None:
        """Until the writer has taken what was pending (replay pacing)."""
        while self._frames and self.close_reason is None:
            self._drain_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None

    def _wake(self) -> None:
        _resolve(self._waiter)

    def close(self, reason: CloseReason) -> None:
        """Ask the writer to finish; the first reason wins. A writer stuck in send is interrupted."""
        if self.close_reason is not None:
            return
        self.close_reason = reason
        self._wake()
        _resolve(self._drain_waiter)
        if reason in (CloseReason.OVERFLOW, CloseReason.CLIENT_GONE) and self.send_guard is not None:
            self.send_guard.reschedule(asyncio.get_running_loop().time())


def _resolve(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


def _new_future() -> asyncio.Future[Snapshot]:
    return asyncio.get_running_loop().create_future()


@dataclass(slots=True, eq=False)
class _Recipient:
    streams: set[Stream] = field(default_factory=set)
    cursor: int | None = None  # the highest seq fetched for this recipient's live streams
    ready: asyncio.Future[Snapshot] = field(default_factory=_new_future)


class Hub(BackgroundTask):
    """The registry of live streams and the single task that reads new rows for them."""

    task_name = "pgpush-hub"

    def __init__(
        self,
        db: Database,
        *,
        max_streams: int,
        max_streams_per_user: int,
        buffer_bytes: int,
        backoff_max: float = 2.0,
        on_rows: Callable[[int], None] | None = None,
        on_carried: Callable[[int], None] | None = None,
    ) -> None:
        self._db = db
        self._recipients: dict[str, _Recipient] = {}
        self._dirty: set[str] = set()
        self._newcomers: set[str] = set()  # recipients whose cursor is still to be read
        self._check_all = False  # compare every live recipient's counter with its cursor
        self._work = asyncio.Event()
        self._max_streams = max_streams
        self._max_per_user = max_streams_per_user
        self._buffer_bytes = buffer_bytes
        self._backoff_max = backoff_max
        self._on_rows = on_rows
        self._on_carried = on_carried
        self.stream_count = 0
        self._closing = False

    # --- streams -------------------------------------------------------------------------------------

    def open(self, recipient: str) -> Stream:
        """Register a stream at once, so no row committed from now on can pass it by."""
        if self._closing:
            raise StreamLimitError(per_user=False, draining=True)
        entry = self._recipients.get(recipient)
        if entry is not None and len(entry.streams) >= self._max_per_user:
            raise StreamLimitError(per_user=True)
        if self.stream_count >= self._max_streams:
            raise StreamLimitError(per_user=False)
        if entry is None:
            entry = self._recipients[recipient] = _Recipient()
            self._newcomers.add(recipient)
            self._work.set()  # its cursor is read by the fetcher, batched with other newcomers
        stream = Stream(recipient, self._buffer_bytes)
        if entry.cursor is not None:
            stream.start = Snapshot(entry.cursor, None)
        entry.streams.add(stream)
        self.stream_count += 1
        return stream

    async def start_point(self, stream: Stream) -> Snapshot:
        """The seq up to which this stream must be filled from the table (live rows follow it), with the
        unread rows up to it when the hub read them along."""
        if stream.start is None:
            stream.start = await asyncio.shield(self._recipients[stream.recipient].ready)
        return stream.start

    def close(self, stream: Stream) -> None:
        entry = self._recipients.get(stream.recipient)
        if entry is None or stream not in entry.streams:
            return
        entry.streams.discard(stream)
        self.stream_count -= 1
        if not entry.streams:
            del self._recipients[stream.recipient]
            if not entry.ready.done():
                entry.ready.cancel()

    def streams_of(self, recipient: str) -> int:
        entry = self._recipients.get(recipient)
        return len(entry.streams) if entry else 0

    @property
    def accepting(self) -> bool:
        """False once shutdown() began: new streams are refused (readiness reports it)."""
        return not self._closing

    def shutdown(self) -> None:
        """Ask every stream to say goodbye (the writer sends the jittered retry); refuse new ones."""
        self._closing = True
        for entry in list(self._recipients.values()):
            for stream in list(entry.streams):
                stream.close(CloseReason.SHUTDOWN)

    # --- hints ---------------------------------------------------------------------------------------

    def notify(self, recipients: Iterable[str] | None) -> None:
        """New rows may exist for these recipients (None: for anyone). Unknown recipients are ignored."""
        if recipients is None:
            self._dirty.update(self._recipients)
        else:
            self._dirty.update(r for r in recipients if r in self._recipients)
        if self._dirty:
            self._work.set()

    def take_hint(self, hint: Hint) -> None:
        """A notification: carried rows go straight to their streams, named recipients are re-read."""
        self.notify(hint.recipients)
        if hint.rows:
            self._deliver_carried(hint.rows)

    def _deliver_carried(self, rows: list[CarriedRow]) -> None:
        """Use a carried row only when the hub provably holds every earlier row of its recipient.

        `previous_seq` is the recipient's last seq before the row's statement, and that statement's rows
        are all its rows after it (the counter lock): a cursor at or past it leaves no gap. Otherwise, e.g.
        when a newcomer's cursor is still being read or a notification went missing, the table decides.
        """
        carried = 0
        for row in rows:
            entry = self._recipients.get(row.recipient)
            if entry is None:
                continue
            if entry.cursor is None or entry.cursor < row.previous_seq:
                self._dirty.add(row.recipient)
                self._work.set()
                continue
            if row.seq <= entry.cursor:
                continue  # a fetch already brought it
            body = message_frame(row.seq, row.event, compact_json(row.data))
            frames = [Frame(row.seq, body, row.created_at)]
            entry.cursor = row.seq
            for stream in entry.streams:
                stream.push_live(frames)
            carried += 1
        if carried and self._on_carried is not None:
            self._on_carried(carried)

    def resync(self) -> None:
        """Catch up every live recipient (after a listener reconnect, and as a safety net).

        One query compares all their counters with the hub's cursors; only those behind are read. Reading
        every recipient's rows instead cost a query per thousand live users every safety-net interval.
        """
        self._check_all = True
        self._work.set()

    # --- the fetcher ---------------------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            await self._work.wait()
            self._work.clear()
            try:
                await self._init_newcomers()
                await self._check_cursors()
                await self._fetch_dirty()
                backoff = 0.05
            except Exception as exc:
                if isinstance(exc, UNAVAILABLE_ERRORS):
                    log.warning("reading new rows failed, retrying in %.2fs: %r", backoff, exc)
                else:
                    log.exception("unexpected error while reading new rows")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._backoff_max)
                self._work.set()

    async def _init_newcomers(self) -> None:
        names, self._newcomers = list(self._newcomers), set()
        for start in range(0, len(names), FETCH_CHUNK):
            batch = names[start : start + FETCH_CHUNK]
            chunk = {name: entry for name in batch if (entry := self._recipients.get(name)) is not None}
            try:
                snapshots = await self._db.newcomers(list(chunk), NEWCOMER_UNREAD)
            except BaseException:
                self._newcomers.update(names[start:])
                raise
            for name, entry in chunk.items():
                if self._recipients.get(name) is not entry:
                    continue  # left while we were reading
                entry.cursor = snapshots[name].seq
                entry.ready.set_result(snapshots[name])  # every stream that waited for it

    async def _check_cursors(self) -> None:
        if not self._check_all:
            return
        self._check_all = False
        cursors = [(name, e.cursor) for name, e in self._recipients.items() if e.cursor is not None]
        try:
            for start in range(0, len(cursors), CHECK_CHUNK):
                behind, ahead = await self._db.drift(cursors[start : start + CHECK_CHUNK])
                self._dirty.update(behind)
                self._restart(ahead)
        except BaseException:
            self._check_all = True
            raise

    def _restart(self, last_seqs: dict[str, int]) -> None:
        """Close the streams of recipients whose cursor is past what the table holds.

        The cursor only ever takes seqs of committed rows, so this means the data was reset, or a
        notification claimed a row the table does not have. Their streams would skip every row up to the
        bad seq: they end, and their clients resume from the table (a cursor ahead gets `reset` first).
        """
        for name, last_seq in last_seqs.items():
            entry = self._recipients.get(name)
            if entry is None:
                continue
            entry.cursor = min(entry.cursor or 0, last_seq)  # streams that join meanwhile start right
            log.warning("a cursor is past the table's last seq; restarting %d stream(s)", len(entry.streams))
            for stream in list(entry.streams):
                stream.close(CloseReason.ERROR)

    async def _fetch_dirty(self) -> None:
        dirty, self._dirty = self._dirty, set()
        # A dirty newcomer without a cursor needs nothing: its first cursor read comes after this hint.
        targets = [
            (name, entry)
            for name in dirty
            if (entry := self._recipients.get(name)) is not None and entry.cursor is not None
        ]
        for start in range(0, len(targets), FETCH_CHUNK):
            chunk = targets[start : start + FETCH_CHUNK]
            per_recipient = max(MIN_PER_RECIPIENT, FETCH_ROW_BUDGET // len(chunk))
            try:
                rows = await self._db.new_rows(((n, e.cursor or 0) for n, e in chunk), per_recipient)
            except BaseException:
                self._dirty.update(name for name, _ in targets[start:])
                raise
            self._dispatch(dict(chunk), rows, per_recipient)
        if self._dirty:
            self._work.set()

    def _dispatch(self, entries: dict[str, _Recipient], rows: list[NewRow], per_recipient: int) -> None:
        """Encode each row once and hand the same bytes to every stream of its recipient."""
        by_recipient: dict[str, list[Frame]] = {}
        compacted: dict[str, bytes] = {}  # a fan-out writes the same data for everyone: compact it once
        for recipient, seq, event, data, created_at in rows:
            body = compacted.get(data)
            if body is None:
                body = compacted[data] = compact_json(data)
            frames = by_recipient.get(recipient)
            if frames is None:
                frames = by_recipient[recipient] = []
            frames.append(Frame(seq, message_frame(seq, event, body), created_at))
        for name, frames in by_recipient.items():
            entry = entries[name]
            if self._recipients.get(name) is not entry:
                continue  # every stream left (and maybe a new one came with a fresh cursor)
            assert entry.cursor is not None
            fetched = len(frames)
            frames = [f for f in frames if f.seq > entry.cursor]
            if not frames:
                continue
            entry.cursor = frames[-1].seq
            for stream in entry.streams:
                stream.push_live(frames)
            if fetched >= per_recipient:
                self._dirty.add(name)  # there may be more
        if self._on_rows is not None:
            self._on_rows(len(rows))

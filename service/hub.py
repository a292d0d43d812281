"""Recipient → live streams: one fetcher reads new rows in batches and copies them into bounded buffers.

The hub never blocks on a stream: a stream whose client does not keep up is closed (it resumes from its
Last-Event-ID), so one slow client cannot stall the others and memory stays bounded (docs/protocol.md §2.4).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TypeVar

from .background import BackgroundTask
from .db import UNAVAILABLE_ERRORS, Database, NewRow, Row, RowsRead, Snapshot
from .hints import CarriedRow, Hint
from .sse import compact_json, message_frame

log = logging.getLogger("pgpush.hub")
T = TypeVar("T")
R = TypeVar("R")

# Recipients per fetch query, and rows per query shared among them: small queries let the first events
# leave while later ones are still being read (a 100,000-row burst used to wait for one giant query).
FETCH_CHUNK = 1000
FETCH_ROW_BUDGET = 20000
MIN_PER_RECIPIENT = 10
# Bytes of frames one fetch query may bring in all; each recipient's share is also capped by the free space
# of its streams' buffers, so a read never hands a stream more than its bound.
FETCH_BYTE_BUDGET = 16 * 1024 * 1024
MIN_RECIPIENT_BYTES = 8 * 1024
# A stream whose full buffer leaves rows in the table and whose writer has waited this long for the client
# to take a single chunk is over its bound: it is cut (the client resumes from the table). A client that
# keeps reading, however slowly, is waited for instead.
STALLED_SEND_SECONDS = 2.0
# Before its first read a recipient's rows are assumed this large (frame bytes); the row limit of a read is
# twice its byte budget over the estimate, so Postgres renders few rows past the byte cut.
INITIAL_ROW_BYTES = 256
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


# Stands for a replayed row's created_at in a stream's pending frames: such rows are counted as delivered
# but kept out of the latency histogram (see Batch.oldest_created).
REPLAYED = float("-inf")


def encode_row(row: Row) -> Frame:
    return Frame(row.seq, message_frame(row.seq, row.event, compact_json(row.data)), row.created_at)


class Stream:
    """One client's connection as the hub sees it: a bounded buffer of encoded frames and a wake-up.

    The buffer holds what the writer has not yet handed to the transport; the writer takes it a chunk at a
    time and waits for the transport to drain between chunks, so the bytes this stream costs are its buffer
    (at most its bound, which pushing past closes it), one chunk, and the transport's high-water mark.
    """

    __slots__ = (
        "_bytes",
        "_created",
        "_drain_waiter",
        "_frames",
        "_held",
        "_held_bytes",
        "_limit",
        "_on_room",
        "_stall_check",
        "_waiter",
        "_wants_room",
        "close_reason",
        "queued_seq",
        "recipient",
        "send_guard",
        "sending_since",
        "start",
    )

    def __init__(
        self, recipient: str, buffer_bytes: int, on_room: Callable[[str], None] | None = None
    ) -> None:
        self.recipient = recipient
        self.queued_seq = 0  # the highest seq handed to the writer
        self.start: Snapshot | None = None  # the hub's cursor when the stream joined: replay stops there
        self.close_reason: CloseReason | None = None
        self.send_guard: asyncio.Timeout | None = None  # set while the writer waits in a send
        self.sending_since = 0.0  # loop time the current send began
        self._frames: list[bytes] = []
        # Each pending frame's row created_at (REPLAYED for a replayed row); None: a control frame.
        self._created: list[float | None] = []
        self._bytes = 0
        # Live frames wait here while the replay fills the stream, so the client sees seq order.
        self._held: list[Frame] | None = []
        self._held_bytes = 0
        self._limit = buffer_bytes
        # The hub left rows in the table because this buffer was full: tell it when there is room again.
        self._on_room = on_room
        self._wants_room = False
        self._stall_check: asyncio.TimerHandle | None = None
        # Bare futures made on demand, not asyncio.Events: an Event carries a deque of about 600 bytes,
        # and tens of thousands of idle streams each held two.
        self._waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None

    @property
    def buffer_bytes(self) -> int:
        """The bound of this stream's buffer (PGPUSH_STREAM_BUFFER_BYTES)."""
        return self._limit

    @property
    def room(self) -> int:
        """Bytes of live frames the stream can take before it is over its bound."""
        used = self._held_bytes if self._held is not None else self._bytes
        return self._limit - used

    def want_room(self) -> None:
        """Call the hub back once the writer has taken the buffer down to half its bound; meanwhile, cut
        the stream if its client stops taking writes (rows are waiting for it in the table)."""
        self._wants_room = True
        if self._stall_check is None:
            self._stall_check = asyncio.get_running_loop().call_later(STALLED_SEND_SECONDS, self._check_stall)

    def _check_stall(self) -> None:
        self._stall_check = None
        if not self._wants_room or self.close_reason is not None:
            return
        loop = asyncio.get_running_loop()
        waited = loop.time() - self.sending_since if self.send_guard is not None else 0.0
        if waited >= STALLED_SEND_SECONDS:
            self.close(CloseReason.OVERFLOW)
            return
        self._stall_check = loop.call_later(STALLED_SEND_SECONDS - waited, self._check_stall)

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
        if self.close_reason is not CloseReason.OVERFLOW:  # a cut stream sends nothing more
            self._append(frames, live=False)

    def push_control(self, frame: bytes) -> None:
        """A frame without a seq (reset)."""
        self._frames.append(frame)
        self._created.append(None)
        self._bytes += len(frame)
        self._wake()

    def go_live(self) -> None:
        """Replay done: release the live frames that arrived meanwhile, skipping any it already sent."""
        held, self._held, self._held_bytes = self._held or [], None, 0
        self._append(held, live=True)
        self._room_freed()

    def _append(self, frames: Iterable[Frame], *, live: bool) -> None:
        for frame in frames:
            if frame.seq > self.queued_seq:
                self._frames.append(frame.data)
                self._created.append(frame.created_at if live else REPLAYED)
                self._bytes += len(frame.data)
                self.queued_seq = frame.seq
        if self._frames:
            self._wake()

    def take(self, max_bytes: int = 2**62) -> Batch:
        """The oldest pending frames, up to `max_bytes` (at least one frame), to be written in one send."""
        frames, size, count = self._frames, 0, 0
        for data in frames:
            if count and size + len(data) > max_bytes:
                break
            size += len(data)
            count += 1
        created = self._created[:count]
        batch = Batch(b"".join(frames[:count]), 0, None)
        del frames[:count], self._created[:count]
        self._bytes -= size
        for stamp in created:
            if stamp is not None:
                if batch.oldest_created is None and stamp != REPLAYED:
                    batch.oldest_created = stamp
                batch.rows += 1
        if not frames:
            _resolve(self._drain_waiter)
        self._room_freed()
        return batch

    def _room_freed(self) -> None:
        if self._wants_room and self.room >= self._limit // 2:
            self._wants_room = False
            if self._stall_check is not None:
                self._stall_check.cancel()
                self._stall_check = None
            if self._on_room is not None:
                self._on_room(self.recipient)

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
        self._wants_room = False
        if self._stall_check is not None:
            self._stall_check.cancel()
            self._stall_check = None
        # Nothing pending is sent after a cut: free it now rather than when the writer notices.
        if reason is CloseReason.OVERFLOW:
            self._frames, self._created, self._bytes = [], [], 0
            self._held, self._held_bytes = None, 0
        self._wake()
        _resolve(self._drain_waiter)
        if reason in (CloseReason.OVERFLOW, CloseReason.CLIENT_GONE) and self.send_guard is not None:
            self.send_guard.reschedule(asyncio.get_running_loop().time())


def _recipient_of(read: RowsRead) -> str:
    return read.recipient


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
    row_bytes: int = INITIAL_ROW_BYTES  # frame bytes per row in its last read (sizes its next row limit)


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
        self._on_room = self._room_freed  # one bound method shared by every stream

    def _room_freed(self, recipient: str) -> None:
        """A stream whose full buffer had left rows in the table has room again: read them."""
        self.notify((recipient,))

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
        elif entry.cursor is None and entry.ready.cancelled():
            entry.ready = _new_future()  # its last cursor read failed (_poisoned): try again for this one
            self._newcomers.add(recipient)
            self._work.set()
        stream = Stream(recipient, self._buffer_bytes, self._on_room)
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
                parts = await self._isolating(list(chunk), self._read_newcomers, str)
            except BaseException:
                self._newcomers.update(names[start:])
                raise
            for _, snapshots in parts:
                for name, snapshot in snapshots.items():
                    entry = chunk[name]
                    if self._recipients.get(name) is not entry:
                        continue  # left while we were reading
                    entry.cursor = snapshot.seq
                    entry.ready.set_result(snapshot)  # every stream that waited for it

    async def _read_newcomers(self, names: list[str]) -> dict[str, Snapshot]:
        return await self._db.newcomers(names, NEWCOMER_UNREAD)

    async def _isolating(
        self, items: list[T], read: Callable[[list[T]], Awaitable[R]], recipient: Callable[[T], str]
    ) -> list[tuple[list[T], R]]:
        """`read(items)`, or when it fails for a reason other than Postgres being unavailable (a row
        Postgres cannot send or we cannot decode, say), the read of each half, down to the one recipient
        it fails for, whose streams are closed: one bad row never stalls the others in its batch."""
        try:
            return [(items, await read(items))]
        except UNAVAILABLE_ERRORS:
            raise
        except Exception as exc:
            if len(items) == 1:
                self._poisoned(recipient(items[0]), exc)
                return []
            middle = len(items) // 2
            first = await self._isolating(items[:middle], read, recipient)
            return first + await self._isolating(items[middle:], read, recipient)

    def _poisoned(self, recipient: str, exc: Exception) -> None:
        """Reading this recipient's rows fails: close its streams (each client retries after its delay)."""
        log.error(
            "reading one recipient's rows failed; closing its streams: %r", exc, extra={"user": recipient}
        )
        self._dirty.discard(recipient)
        entry = self._recipients.get(recipient)
        if entry is None:
            return
        if entry.cursor is None:
            entry.ready.cancel()  # the streams waiting for it end; a new one asks again (open)
        for stream in list(entry.streams):
            stream.close(CloseReason.ERROR)

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
        targets: list[tuple[str, _Recipient, int]] = []
        for name in dirty:
            entry = self._recipients.get(name)
            if entry is None or entry.cursor is None:
                continue
            # Read only what the emptiest stream can take; rows beyond wait in the table. A stream fuller
            # than that is cut when the page reaches it (over its bound); one that has too little room for
            # a useful page leaves the rows in the table until its writer frees half its buffer.
            room = max((s.room for s in entry.streams if s.close_reason is None), default=0)
            if room < self._buffer_bytes // 2:
                for stream in entry.streams:
                    if stream.close_reason is None:
                        stream.want_room()
                continue
            targets.append((name, entry, room))
        for start in range(0, len(targets), FETCH_CHUNK):
            chunk = targets[start : start + FETCH_CHUNK]
            per_recipient = max(MIN_PER_RECIPIENT, FETCH_ROW_BUDGET // len(chunk))
            share = max(MIN_RECIPIENT_BYTES, FETCH_BYTE_BUDGET // len(chunk))
            reads = [
                RowsRead(
                    name,
                    entry.cursor or 0,
                    budget := min(room, share),
                    max(MIN_PER_RECIPIENT, min(per_recipient, 2 * budget // entry.row_bytes)),
                )
                for name, entry, room in chunk
            ]  # the walrus keeps each budget next to the row limit derived from it
            try:
                parts = await self._isolating(reads, self._db.new_rows, _recipient_of)
            except BaseException:
                self._dirty.update(name for name, _, _ in targets[start:])
                raise
            entries = {name: entry for name, entry, _ in chunk}
            for part, rows in parts:
                self._dispatch(entries, part, rows)
        if self._dirty:
            self._work.set()

    def _dispatch(self, entries: dict[str, _Recipient], reads: list[RowsRead], rows: list[NewRow]) -> None:
        """Encode each row once and hand the same bytes to every stream of its recipient."""
        by_recipient: dict[str, list[Frame]] = {}
        page_rows: dict[str, int] = {}
        compacted: dict[str, bytes] = {}  # a fan-out writes the same data for everyone: compact it once
        for recipient, seq, event, data, created_at, read in rows:
            body = compacted.get(data)
            if body is None:
                body = compacted[data] = compact_json(data)
            frames = by_recipient.get(recipient)
            if frames is None:
                frames = by_recipient[recipient] = []
                page_rows[recipient] = read
            frames.append(Frame(seq, message_frame(seq, event, body), created_at))
        for part in reads:
            name = part.recipient
            frames = by_recipient.get(name, [])
            entry = entries[name]
            if self._recipients.get(name) is not entry:
                continue  # every stream left (and maybe a new one came with a fresh cursor)
            fetched = len(frames)
            if fetched:
                entry.row_bytes = max(64, sum(len(f.data) for f in frames) // fetched)
            # Rows left behind: the row limit was reached, or the byte cut stopped the page early.
            if fetched >= part.row_limit or fetched < page_rows.get(name, 0):
                self._dirty.add(name)
            assert entry.cursor is not None
            frames = [f for f in frames if f.seq > entry.cursor]
            if not frames:
                continue
            entry.cursor = frames[-1].seq
            for stream in list(entry.streams):
                try:
                    stream.push_live(frames)
                except Exception:
                    # One stream's failure is its own: the others of this recipient and batch go on.
                    log.exception("handing rows to a stream failed; closing it", extra={"user": name})
                    stream.close(CloseReason.ERROR)
        if self._on_rows is not None:
            self._on_rows(len(rows))

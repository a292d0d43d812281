"""`pgpush publish`: messages from the command line, straight into the table or through the API.

`--follow FILE` turns a file into a feed, like `tail -F`: each line appended becomes a message (its data
the line as a JSON string). It keeps following the name when the file is replaced (rotation) and starts over
when it is truncated. Lines that arrive together go out together: one INSERT for the table; over HTTP one
request per line, since POST /messages carries one message. Each line has its own idempotency key, so a
batch retried after an outage whose outcome was unknown is never written twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TypeVar

from pydantic import ValidationError

from .api.messages import PublishRequest
from .config import Settings
from .db import Database, DatabaseUnavailable, IdempotencyConflict, InvalidMessage
from .migrate import migrate

log = logging.getLogger("pgpush.publish")
T = TypeVar("T")

POLL_SECONDS = 0.2
BATCH_LINES = (
    500  # rows of one recipient per INSERT: a burst of lines becomes a few statements, not one huge one
)
RETRY_MAX_SECONDS = 5.0
HTTP_TIMEOUT_SECONDS = 30.0


class PublishError(Exception):
    """A message could not be published. `retry`: a later attempt may succeed (the server is away)."""

    def __init__(self, detail: str, *, retry: bool = False) -> None:
        super().__init__(detail)
        self.retry = retry


@dataclass(frozen=True, slots=True)
class Line:
    """One message to send: `data` is its JSON text, `key` its idempotency key."""

    data: str
    key: str


class Sink(Protocol):
    """Where messages go: the table (through DATABASE_URL) or the API (through --url)."""

    async def publish(self, recipients: Sequence[str], event: str, data: str, key: str | None) -> Any:
        """One message to every recipient; the API's response body `{"messages": [...]}`."""
        ...

    async def publish_lines(self, recipients: Sequence[str], event: str, lines: Sequence[Line]) -> None:
        """Several messages, in order, to every recipient."""
        ...


class TableSink:
    """Straight into the messages table: delivered like any other writer's rows."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def publish(self, recipients: Sequence[str], event: str, data: str, key: str | None) -> Any:
        try:
            published = await self.db.publish(recipients, event, data, key)
        except IdempotencyConflict as exc:
            raise PublishError(f"{exc} (recipients: {', '.join(exc.recipients)})") from None
        except InvalidMessage as exc:
            raise PublishError(f"{exc.field}: {exc.detail}") from None
        except DatabaseUnavailable as exc:
            raise PublishError(str(exc), retry=True) from None
        return {"messages": [{"id": r.id, "recipient": r.recipient, "seq": r.seq} for r in published.rows]}

    async def publish_lines(self, recipients: Sequence[str], event: str, lines: Sequence[Line]) -> None:
        try:
            await self.db.publish_lines(
                recipients, event, [line.data for line in lines], [line.key for line in lines]
            )
        except InvalidMessage as exc:
            raise PublishError(f"{exc.field}: {exc.detail}") from None
        except DatabaseUnavailable as exc:
            raise PublishError(str(exc), retry=True) from None


class ApiSink:
    """Through a pgpush server's POST /messages with a publisher token (the standard library's HTTP)."""

    def __init__(self, base_url: str, token: str) -> None:
        self.endpoint = base_url.rstrip("/") + "/messages"
        self._token = token

    async def publish(self, recipients: Sequence[str], event: str, data: str, key: str | None) -> Any:
        body: dict[str, Any] = {"recipients": list(recipients), "event": event, "data": json.loads(data)}
        if key is not None:
            body["key"] = key
        return await asyncio.to_thread(self._post, json.dumps(body, ensure_ascii=False).encode())

    async def publish_lines(self, recipients: Sequence[str], event: str, lines: Sequence[Line]) -> None:
        for line in lines:
            await self.publish(recipients, event, line.data, line.key)

    def _post(self, body: bytes) -> Any:
        request = urllib.request.Request(
            self.endpoint,
            data=body,
            method="POST",
            headers={"Authorization": f"Bearer {self._token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_SECONDS) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            detail = _error_detail(exc)
            raise PublishError(
                f"{self.endpoint} answered {exc.code}: {detail}", retry=exc.code >= 500
            ) from None
        except (urllib.error.URLError, OSError) as exc:
            raise PublishError(f"{self.endpoint} is unreachable: {exc}", retry=True) from None


def _error_detail(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read())
        return f"{body['error']}: {body['detail']}"
    except (ValueError, KeyError, TypeError, OSError):
        return str(exc.reason)


# ---- following a file ----


class FileFollower:
    """The complete lines appended to a path, like `tail -F`; blocking reads, one poll at a time.

    Follows the name: when the path names a new file (rotation), the old one is read to its end first; when
    the file shrinks (truncation), reading starts over from its beginning. A missing path is waited for, and
    meanwhile the file already open keeps being read (its writer may not have reopened yet). Truncation is
    noticed by size, as tail does: a file truncated and refilled past the old size between two polls is not.
    """

    def __init__(self, path: Path, max_line_bytes: int) -> None:
        self.path = path
        self.max_line_bytes = max_line_bytes
        self._file: BinaryIO | None = None
        self._identity: tuple[int, int] | None = None
        self._partial = b""

    def start(self) -> None:
        """Open the file as it is now and skip what it already holds: only appended lines are sent."""
        if self._open():
            assert self._file is not None
            self._file.seek(0, os.SEEK_END)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def poll(self) -> list[str]:
        """The lines completed since the last poll, in order (possibly across a rotation)."""
        if self._file is None:
            if not self._open():
                return []
            log.info("following %s: the file appeared", self.path)
        assert self._file is not None
        lines: list[str] = []
        if os.fstat(self._file.fileno()).st_size < self._file.tell():
            log.info("following %s: the file was truncated; reading it from the start", self.path)
            lines += self._flush_partial()
            self._file.seek(0)
        lines += self._read()
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return lines
        if (now.st_dev, now.st_ino) != self._identity:
            log.info("following %s: the file was replaced; following the new one", self.path)
            lines += self._read()  # whatever reached the old file before the switch
            lines += self._flush_partial()
            self.close()
            if self._open():
                lines += self._read()
        return lines

    def _open(self) -> bool:
        try:
            self._file = self.path.open("rb")
        except FileNotFoundError:
            return False
        stat = os.fstat(self._file.fileno())
        self._identity = (stat.st_dev, stat.st_ino)
        return True

    def _read(self) -> list[str]:
        assert self._file is not None
        chunk = self._file.read()
        if not chunk:
            return []
        *complete, self._partial = (self._partial + chunk).split(b"\n")
        lines = [_decode(raw) for raw in complete]
        # A "line" that never ends (a binary file, a runaway writer) is sent in pieces, not held forever.
        while len(self._partial) > self.max_line_bytes:
            lines.append(_decode(self._partial[: self.max_line_bytes]))
            self._partial = self._partial[self.max_line_bytes :]
        return lines

    def _flush_partial(self) -> list[str]:
        partial, self._partial = self._partial, b""
        return [_decode(partial)] if partial else []


def _decode(raw: bytes) -> str:
    # Postgres text cannot hold NUL; a log line may carry one, so it becomes U+FFFD like undecodable bytes.
    return raw.removesuffix(b"\r").decode("utf-8", errors="replace").replace("\x00", "\ufffd")


def line_data(line: str, max_bytes: int) -> str:
    """A line as a JSON string no longer than max_bytes (a longer line is cut, marked with an ellipsis)."""
    data = json.dumps(line, ensure_ascii=False)
    while len(data.encode()) > max_bytes and line:
        excess = len(data.encode()) - max_bytes
        # Each character cut removes at least one byte, and the ellipsis adds three; escapes may make a cut
        # remove more than needed, never less, so this ends after a pass or two.
        line = line[: max(0, len(line) - excess - 3)]
        data = json.dumps(line + "…", ensure_ascii=False)
    return data


async def _with_retry(send: Callable[[], Awaitable[T]], what: str) -> T:
    """Run `send()` until it succeeds or fails for good, waiting out a server or database that is away."""
    delay = 0.2
    while True:
        try:
            return await send()
        except PublishError as exc:
            if not exc.retry:
                raise
            log.warning("%s failed, retrying in %.1fs: %s", what, delay, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_SECONDS)


async def follow(
    sink: Sink,
    path: Path,
    recipients: Sequence[str],
    event: str,
    *,
    max_data_bytes: int,
    poll_seconds: float = POLL_SECONDS,
) -> None:
    """Send each line appended to `path` to the recipients until cancelled (Ctrl-C, SIGTERM)."""
    follower = FileFollower(path, max_data_bytes)
    run = secrets.token_hex(6)  # keys unique to this run: a retried batch is written once, a new run anew
    sent = 0
    await asyncio.to_thread(follower.start)
    log.info("following %s: each new line goes to %s as %r", path, ", ".join(recipients), event)
    try:
        while True:
            texts = await asyncio.to_thread(follower.poll)
            if not texts:
                await asyncio.sleep(poll_seconds)
                continue
            lines = [
                Line(line_data(text, max_data_bytes), f"follow:{run}:{sent + n}")
                for n, text in enumerate(texts)
            ]
            sent += len(lines)
            for start in range(0, len(lines), BATCH_LINES):
                batch = lines[start : start + BATCH_LINES]
                await _with_retry(partial(sink.publish_lines, recipients, event, batch), "sending lines")
            log.debug("sent %d lines", len(lines))
    finally:
        follower.close()


# ---- the command ----


@dataclass(frozen=True, slots=True)
class PublishOptions:
    """What `pgpush publish` was asked to do."""

    recipients: list[str]
    event: str
    data: str | None
    key: str | None = None
    follow: Path | None = None
    url: str | None = None
    token: str | None = None


def validate(options: PublishOptions) -> str | None:
    """The JSON text to send (None with --follow); PublishError when the options break the API's rules."""
    if (options.data is None) == (options.follow is None):
        raise PublishError("give either DATA (a JSON value) or --follow FILE")
    if options.url is not None and not options.token:
        raise PublishError(
            "--url needs --token (a publisher token, e.g. from: "
            "pgpush token --sub backend --scope messages:publish)"
        )
    data: Any = None
    if options.data is not None:
        try:
            data = json.loads(options.data)
        except ValueError:
            raise PublishError(
                f"DATA must be JSON, e.g. '{{\"a\": 1}}' or '\"text\"'; got {options.data!r}"
            ) from None
    try:
        PublishRequest(recipients=options.recipients, event=options.event, data=data, key=options.key)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise PublishError(problems) from None
    if options.data is None:
        return None
    try:
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError:
        raise PublishError("DATA must be plain JSON: NaN and Infinity are not") from None


async def _publish(options: PublishOptions, sink: Sink, data: str | None, max_data_bytes: int) -> None:
    if options.follow is not None:
        await follow(sink, options.follow, options.recipients, options.event, max_data_bytes=max_data_bytes)
        return
    assert data is not None
    result = await sink.publish(options.recipients, options.event, data, options.key)
    print(json.dumps(result))


async def _through_table(options: PublishOptions, database_url: str, data: str | None, limit: int) -> None:
    db = await Database.connect(database_url, max_size=2)
    try:
        await _publish(options, TableSink(db), data, limit)
    finally:
        await db.close()


def run(options: PublishOptions, settings: Settings | None) -> int:
    """Publish as the options say; `settings` (needed without --url) names the database. Exit status."""
    try:
        data = validate(options)
        if options.url is not None:
            assert options.token is not None
            limit = Settings.model_fields["max_data_bytes"].default
            asyncio.run(_publish(options, ApiSink(options.url, options.token), data, limit))
            return 0
        assert settings is not None
        if settings.database_url is not None:
            asyncio.run(_through_table(options, settings.database_url, data, settings.max_data_bytes))
            return 0
        _through_embedded(options, settings, data)
        return 0
    except PublishError as exc:
        log.error("pgpush publish: %s", exc)
        return 1
    except KeyboardInterrupt:
        return 0


def _through_embedded(options: PublishOptions, settings: Settings, data: str | None) -> None:
    """The development database of `pgpush serve`; stopped afterwards only if this command started it."""
    from .embedded import EmbeddedPostgres

    pgdata = settings.data_dir.resolve() / "pgdata"
    embedded = EmbeddedPostgres(pgdata)
    url = embedded.start()
    try:
        migrate(url)
        asyncio.run(_through_table(options, url, data, settings.max_data_bytes))
    finally:
        if embedded.started_here:
            embedded.stop()

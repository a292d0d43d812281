"""GET /events: the SSE stream of one user (docs/protocol.md §3)."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from starlette.types import Message, Receive, Scope, Send

from ..auth import Principal
from ..config import Settings
from ..hub import CloseReason, Hub, Stream, StreamLimitError
from ..metrics import Metrics
from ..replay import fill_stream
from ..sse import PING, CursorError, control_frame, parse_cursor, retry_frame
from .deps import StreamUser, stream_user
from .errors import ApiError, api_error_response, error_response, error_responses

log = logging.getLogger("pgpush.stream")
router = APIRouter()

# A client that has not taken a single write for this long is frozen; its stream is cut.
SEND_TIMEOUT_SECONDS = 30.0
# Bytes per send: uvicorn waits for the transport to drain below its high-water mark (64 KiB) before each
# send, so a stalled client holds at most one chunk plus that mark in the transport; the rest stays in the
# stream's bounded buffer, where it counts against PGPUSH_STREAM_BUFFER_BYTES.
WRITE_CHUNK_BYTES = 64 * 1024
EVENT_STREAM_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


class EventStream(Response):
    """A streaming response driven by the hub: one writer coroutine, one disconnect watcher."""

    media_type = "text/event-stream"  # Starlette appends "; charset=utf-8" to text/* types

    def __init__(self, request: Request, user: Principal, stream: Stream, cursor: int | None) -> None:
        # Not Response.__init__: that would add "content-length: 0" to a body that never ends.
        self.status_code = 200
        self.background = None
        self.init_headers(EVENT_STREAM_HEADERS)
        state = request.app.state
        self._settings: Settings = state.settings
        self._hub: Hub = state.hub
        self._metrics: Metrics = state.metrics
        self._db = state.db
        self._user = user
        self._stream = stream
        self._cursor = cursor
        self._rows_written = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream, loop = self._stream, asyncio.get_running_loop()
        started = time.monotonic()
        metrics = self._metrics
        watcher = loop.create_task(self._watch_disconnect(receive))
        self._filler: asyncio.Task[None] | None = loop.create_task(
            fill_stream(
                self._hub,
                self._db,
                stream,
                self._cursor,
                replay_limit=self._settings.replay_limit,
                backoff_max=self._settings.reconnect_backoff_max_seconds,
                on_replayed=metrics.rows_replayed.inc,
            )
        )
        self._filler.add_done_callback(self._filler_done)
        reason = CloseReason.CLIENT_GONE
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            await self._write(send, retry_frame(self._settings.retry_ms))
            reason = await self._pump(send)
            if reason is not CloseReason.CLIENT_GONE:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except TimeoutError:
            reason = stream.close_reason or CloseReason.SEND_TIMEOUT
        except OSError:
            reason = CloseReason.CLIENT_GONE
        finally:
            watcher.cancel()
            if self._filler is not None:
                self._filler.cancel()
            self._hub.close(stream)
            metrics.streams.dec()
            metrics.streams_closed.labels(reason.value).inc()
            log.info(
                "stream closed",
                extra={
                    "user": stream.recipient,
                    "duration_s": round(time.monotonic() - started, 3),
                    "events_sent": self._rows_written,
                    "close_reason": reason.value,
                },
            )

    async def _pump(self, send: Send) -> CloseReason:
        """Write pending frames, heartbeats, and the closing frame; return why the stream ended."""
        stream, settings, loop = self._stream, self._settings, asyncio.get_running_loop()
        last_write = last_row = loop.time()
        expires = loop.time() + (self._user.exp - time.time())
        # Streams end after a jittered lifetime so that, after a scale-up, clients spread over the new
        # replicas within one lifetime instead of staying where they first landed.
        retires = loop.time() + settings.max_stream_seconds * random.uniform(0.8, 1.0)
        while True:
            if stream.has_pending:
                batch = stream.take(WRITE_CHUNK_BYTES)
                await self._write(send, batch.data)
                last_write = loop.time()
                if batch.rows:
                    last_row = last_write
                    self._rows_written += batch.rows
                    self._metrics.events_delivered.inc(batch.rows)
                    if batch.oldest_created is not None:
                        self._metrics.delivery_latency.observe(time.time() - batch.oldest_created)
                continue
            reason = stream.close_reason
            if reason is CloseReason.SHUTDOWN:
                await self._write(send, retry_frame(random.randint(0, settings.shutdown_jitter_ms)))
            if reason is not None:
                return reason
            now = loop.time()
            if now >= expires:
                await self._write(send, control_frame("token_expired", {"exp": int(self._user.exp)}))
                return CloseReason.TOKEN_EXPIRED
            if now >= retires:
                await self._write(send, retry_frame(random.randint(0, settings.retry_ms)))
                return CloseReason.MAX_LIFETIME
            if now >= last_row + settings.idle_timeout_seconds:
                reconnect_at = int(time.time() * 1000) + settings.pause_retry_ms
                frame = control_frame("pause", {"reconnect_at": reconnect_at}, settings.pause_retry_ms)
                await self._write(send, frame)
                return CloseReason.PAUSE
            if now >= last_write + settings.heartbeat_seconds:
                await self._write(send, PING)
                last_write = now
                continue
            deadline = min(
                expires,
                retires,
                last_row + settings.idle_timeout_seconds,
                last_write + settings.heartbeat_seconds,
            )
            try:
                async with asyncio.timeout_at(deadline):
                    await stream.wait()
            except TimeoutError:
                pass

    async def _write(self, send: Send, body: bytes) -> None:
        """One send; interrupted when the client stalls or the hub cuts the stream (overflow)."""
        async with asyncio.timeout(SEND_TIMEOUT_SECONDS) as guard:
            self._stream.send_guard = guard
            self._stream.sending_since = asyncio.get_running_loop().time()
            try:
                await send({"type": "http.response.body", "body": body, "more_body": True})
            finally:
                self._stream.send_guard = None
        if self._stream.close_reason is CloseReason.CLIENT_GONE:
            raise OSError("client disconnected")

    def _filler_done(self, task: asyncio.Task[None]) -> None:
        self._filler = None  # a finished task is dead weight for the rest of a long stream
        if not task.cancelled() and task.exception() is not None:
            log.error("filling a stream failed", exc_info=task.exception())
            self._stream.close(CloseReason.ERROR)

    async def _watch_disconnect(self, receive: Receive) -> None:
        while True:
            message: Message = await receive()
            if message["type"] == "http.disconnect":
                self._stream.close(CloseReason.CLIENT_GONE)
                return


STREAM_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "An endless text/event-stream of the user's messages",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    },
    **error_responses(
        {
            400: "Last-Event-ID is not an integer in 0 … 2^63-1",
            401: "No credentials, or a token that does not verify",
            429: "Too many streams for this user in this process (see Retry-After)",
            503: "Too many streams in this process, or it is shutting down (see Retry-After)",
        }
    ),
}


@router.get(
    "/events",
    operation_id="stream_events",
    summary="Open the user's event stream",
    response_class=EventStream,
    status_code=200,
    responses=STREAM_RESPONSES,
)
async def stream_events(
    request: Request,
    user: StreamUser,
    last_event_id: Annotated[
        str | None, Header(alias="Last-Event-ID", description="Resume after this seq (wins over lastEventId)")
    ] = None,
    last_event_id_query: Annotated[
        str | None, Query(alias="lastEventId", description="Resume after this seq, for a new EventSource")
    ] = None,
) -> Response:
    """The user's messages as Server-Sent Events: unread rows after the cursor, then live rows."""
    return open_event_stream(request, user, last_event_id, last_event_id_query)


def open_event_stream(
    request: Request, user: Principal, last_event_id: str | None, last_event_id_query: str | None
) -> EventStream:
    """Check the cursor and the caps, register the stream with the hub; raises ApiError."""
    try:
        cursor = parse_cursor(last_event_id, last_event_id_query)
    except CursorError as exc:
        raise ApiError(400, "invalid_last_event_id", str(exc)) from None
    hub: Hub = request.app.state.hub
    metrics: Metrics = request.app.state.metrics
    settings: Settings = request.app.state.settings
    try:
        stream = hub.open(user.sub)
    except StreamLimitError as exc:
        retry_after = str(max(1, settings.retry_ms // 1000))
        if exc.draining:
            metrics.streams_rejected.labels("shutting_down").inc()
            raise ApiError(
                503,
                "shutting_down",
                "this server is shutting down; reconnect to another replica",
                headers={"Retry-After": retry_after},
            ) from None
        metrics.streams_rejected.labels("per_user" if exc.per_user else "process").inc()
        if exc.per_user:
            raise ApiError(
                429,
                "too_many_streams",
                f"this user already has {settings.max_streams_per_user} streams open here",
                headers={"Retry-After": retry_after},
            ) from None
        raise ApiError(
            503,
            "server_full",
            "this server holds as many streams as it may",
            headers={"Retry-After": retry_after},
        ) from None
    metrics.streams_opened.inc()
    metrics.streams.inc()
    return EventStream(request, user, stream, cursor)


def is_stream_request(scope: Scope) -> bool:
    return bool(scope["type"] == "http" and scope["path"] == "/events" and scope["method"] == "GET")


async def serve_stream(scope: Scope, receive: Receive, send: Send) -> None:
    """GET /events served directly, past routing and dependency injection (same functions, same answers).

    A stream lives for minutes: every layer it passes through keeps a coroutine frame alive for that long.
    Skipping the layers a stream does not need cut per-stream memory and the CPU of opening one
    (bench/RESULTS.md); the route stays for the OpenAPI document.
    """
    request = Request(scope, receive)
    response: Response
    try:
        user = await stream_user(request, None, None, None, None)
        response = open_event_stream(
            request, user, request.headers.get("last-event-id"), request.query_params.get("lastEventId")
        )
    except ApiError as exc:
        response = api_error_response(request, exc)
    except Exception:
        log.exception("opening a stream failed")
        response = error_response(500, "internal_error", "the stream could not be opened")
    del request  # its parsed headers, cookies and query would live as long as the stream
    # So would the raw request headers in the scope, the token among them; nothing reads them once the
    # stream is open (CORS took what it needs when the request came in).
    scope["headers"] = []
    await response(scope, receive, send)

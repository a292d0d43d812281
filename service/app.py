"""The application factory: no work at import time; the lifespan builds pool → hub → listener."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from . import __version__
from .announcer import Announcer
from .api import events, health, inbox, messages, page, tickets
from .api.errors import install_error_handlers
from .api.limits import BodySizeLimit
from .auth import TokenVerifier
from .config import Settings
from .db import Database
from .descriptors import stream_capacity
from .hints import Hint
from .hub import Hub
from .listener import Listener
from .metrics import Metrics
from .migrate import migrate
from .retention import Retention

STATIC_DIR = Path(__file__).parent / "static"


def create_app(settings: Settings) -> FastAPI:
    """A pgpush app for these settings; `settings.database_url` must be set (the CLI resolves it)."""
    if settings.database_url is None:
        raise ValueError("create_app needs a database URL (the CLI starts the embedded Postgres)")
    database_url: str = settings.database_url

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.migrate_on_start:
            await asyncio.to_thread(migrate, database_url)
        metrics: Metrics = app.state.metrics
        db = await Database.connect(database_url, max_size=settings.pool_max_size)
        hub = Hub(
            db,
            # The pool, plus the listener's and the announcer's connections with a spare each (reconnects).
            max_streams=stream_capacity(settings.max_streams, settings.pool_max_size + 4),
            max_streams_per_user=settings.max_streams_per_user,
            buffer_bytes=settings.stream_buffer_bytes,
            backoff_max=settings.reconnect_backoff_max_seconds,
            on_rows=metrics.rows_fetched.inc,
            on_carried=metrics.rows_carried.inc,
        )

        def on_hint(hint: Hint) -> None:
            metrics.notifications.inc()
            hub.take_hint(hint)

        listener = Listener(
            settings.listen_database_url or database_url,
            on_hint=on_hint,
            on_connected=hub.resync,
            on_reconnect=metrics.listener_reconnects.inc,
            on_probe_failed=metrics.listener_probe_failures.inc,
            probe_interval=settings.listener_probe_seconds,
            probe_timeout=settings.listener_probe_timeout_seconds,
            safety_net_interval=settings.safety_net_seconds,
            backoff_max=settings.reconnect_backoff_max_seconds,
        )
        metrics.listener_connected.set_function(lambda: float(listener.connected))
        announcer = Announcer(
            settings.listen_database_url or database_url,
            heard=lambda: listener.notifications,
            batch_above=settings.notify_batch_above,
            interval=settings.notify_batch_interval_ms / 1000,
            backoff_max=settings.reconnect_backoff_max_seconds,
            on_announced=metrics.statements_announced.inc,
        )
        metrics.announcer_awake.set_function(lambda: float(announcer.awake))
        retention = Retention(
            db,
            days=settings.retention_days,
            max_unread_per_user=settings.retention_max_unread_per_user,
            interval=settings.retention_interval_seconds,
            batch_rows=settings.retention_batch_rows,
        )
        app.state.db, app.state.hub, app.state.listener = db, hub, listener
        app.state.retention, app.state.announcer = retention, announcer
        hub.start()
        listener.start()
        if settings.notify_batch_above > 0:
            announcer.start()
        retention.start()
        try:
            await _refuse_a_pooled_listener(listener)
            yield
        finally:
            await retention.stop()
            await announcer.stop()
            hub.shutdown()
            await listener.stop()
            await hub.stop()
            await db.close()

    app = PgpushApp(
        title="pgpush",
        version=__version__,
        summary="Postgres-backed per-user notifications over Server-Sent Events",
        lifespan=lifespan,
        docs_url="/docs" if settings.api_docs else None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.verifier = TokenVerifier(settings)
    install_error_handlers(app)
    app.include_router(events.router)
    app.include_router(tickets.router)
    app.include_router(messages.router)
    app.include_router(inbox.router)
    app.include_router(health.router)
    # Added before CORS so its 413s carry CORS headers; the counter wraps the limit to count its 413s too.
    app.add_middleware(
        BodySizeLimit,
        max_body_bytes=settings.max_body_bytes,
        max_unauthenticated_bodies=settings.max_unauthenticated_bodies,
    )
    app.add_middleware(messages.CountPublishRequests, counter=app.state.metrics.publish_requests)
    if settings.serve_page:
        app.include_router(page.router)
        # follow_symlink: in a source checkout pgpush-client.js is a link into clients/js (the one copy of
        # the client package; a wheel holds the file itself). A path still cannot leave the folder (`..`).
        app.mount("/static", StaticFiles(directory=STATIC_DIR, follow_symlink=True), name="static")
    app.stream_entry = events.serve_stream
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, **_cors_options(settings))
        app.stream_entry = CORSMiddleware(events.serve_stream, **_cors_options(settings))
    return app


async def _refuse_a_pooled_listener(listener: Listener) -> None:
    """Fail startup when the listener's first connection finds a transaction-mode pooler in its way.

    pgpush starts while Postgres is down, so a first attempt that cannot connect lets startup go on; a
    pooler found later is logged and shown by /readyz (`"listener": "misconfigured"`).
    """
    await listener.first_attempt()
    if listener.failure is not None:
        raise RuntimeError(listener.failure)


def _cors_options(settings: Settings) -> dict[str, Any]:
    return {
        "allow_origins": list(settings.cors_origins),
        "allow_credentials": True,
        "allow_methods": ["GET", "POST"],
        "allow_headers": ["Authorization", "Content-Type", "Last-Event-ID"],
    }


class PgpushApp(FastAPI):
    """FastAPI, except that GET /events goes straight to its handler (CORS included when configured).

    A stream lives for minutes and every ASGI layer above it keeps a frame alive that long. FastAPI's own
    outer layers (error, telemetry and body-limit middleware) and its per-request OpenTelemetry check,
    which reads os.environ, were about a sixth of the CPU of opening a stream (bench/RESULTS.md).
    """

    stream_entry: ASGIApp | None = None

    def openapi(self) -> dict[str, Any]:
        """FastAPI's document with exact integer bounds (its OpenAPI model turns a body schema's bounds into
        floats, and the largest seq, 2^63-1, is not one: as a float it reads 2^63)."""
        if not self.openapi_schema:
            self.openapi_schema = _exact_integer_bounds(super().openapi())
        return self.openapi_schema

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.stream_entry is not None and events.is_stream_request(scope):
            scope["app"] = self  # what Starlette sets: request.app reaches the state
            await self.stream_entry(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def _exact_integer_bounds(node: Any) -> Any:
    """Every integer schema's float bound back to an int; the float of 2^63-1 back to 2^63-1."""
    if isinstance(node, list):
        return [_exact_integer_bounds(item) for item in node]
    if not isinstance(node, dict):
        return node
    fixed = {key: _exact_integer_bounds(value) for key, value in node.items()}
    if fixed.get("type") == "integer":
        for key in _BOUNDS:
            value = fixed.get(key)
            if isinstance(value, float) and value.is_integer():
                exact_max_seq = key == "maximum" and value == float(inbox.MAX_SEQ)
                fixed[key] = inbox.MAX_SEQ if exact_max_seq else int(value)
    return fixed

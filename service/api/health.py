"""Liveness, readiness and metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from ..db import Database
from ..listener import ListenerState
from .errors import ErrorBody, error_responses

router = APIRouter()

# Under the manifests' probe timeout (3 s): a database that hangs must not make the probe itself time out.
PING_SECONDS = 2.0

DatabaseState = Literal["up", "down"]


class Readiness(BaseModel):
    """What `GET /readyz` answers with 200."""

    status: Literal["ready", "degraded"] = Field(
        description="`ready`: Postgres answers and the listener is connected; `degraded`: one of them is "
        "not, and streams are still accepted (they catch up when both are back)"
    )
    database: DatabaseState = Field(description="Whether Postgres answered a trivial query just now")
    listener: ListenerState = Field(
        description="The LISTEN connection; `misconfigured` when it reaches Postgres through a "
        "transaction-mode pooler, where notifications cannot arrive"
    )


class NotReady(ErrorBody):
    """What `GET /readyz` answers with 503: the error shape plus the same states."""

    database: DatabaseState
    listener: ListenerState


@router.get("/healthz", operation_id="healthz", summary="The process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    operation_id="readyz",
    summary="The process accepts streams; with strict=true, also Postgres answers and the listener is up",
    response_model=Readiness,
    responses={
        503: {
            "model": NotReady,
            "description": "Shutting down (draining its streams), or with strict=true: Postgres does not "
            "answer or the listener is down",
        },
        **error_responses({422: "`strict` is not a boolean"}),
    },
)
async def readyz(
    request: Request,
    strict: Annotated[
        bool,
        Query(
            description="Also require Postgres and the LISTEN connection (for monitors; Kubernetes probes "
            "without it, so a database outage does not empty the Service of pods that still accept streams)"
        ),
    ] = False,
) -> JSONResponse:
    state = request.app.state
    database: DatabaseState = "up" if await _database_answers(state.db) else "down"
    listener: ListenerState = state.listener.state
    states = {"database": database, "listener": listener}
    if not state.hub.accepting:
        detail = "this server is shutting down; its streams move to other replicas"
        return _not_ready("shutting_down", detail, states)
    healthy = database == "up" and listener == "connected"
    if strict and not healthy:
        problems = ["Postgres does not answer"] if database != "up" else []
        problems += [f"the listener is {listener}"] if listener != "connected" else []
        return _not_ready("not_ready", f"not ready: {' and '.join(problems)}", states)
    return JSONResponse({"status": "ready" if healthy else "degraded", **states})


async def _database_answers(db: Database) -> bool:
    try:
        async with asyncio.timeout(PING_SECONDS):
            return await db.ping()
    except TimeoutError:
        return False


def _not_ready(error: str, detail: str, states: Mapping[str, str]) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail, **states}, status_code=503)


@router.get(
    "/metrics",
    operation_id="metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def metrics(request: Request) -> Response:
    state = request.app.state
    usage = await state.db.notification_queue_usage()
    if usage is not None:
        state.metrics.notification_queue_usage.set(usage)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

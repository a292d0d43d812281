"""Liveness, readiness and metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .errors import error_response

router = APIRouter()


@router.get("/healthz", operation_id="healthz", summary="The process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    operation_id="readyz",
    summary="Postgres answers and the listener is connected",
    responses={503: {"description": "Not ready"}},
)
async def readyz(request: Request) -> JSONResponse:
    state = request.app.state
    db_ok = await state.db.ping()
    listener_ok = bool(state.listener.connected)
    if db_ok and listener_ok:
        return JSONResponse({"status": "ready"})
    problems = [name for name, ok in (("postgres", db_ok), ("listener", listener_ok)) if not ok]
    return error_response(503, "not_ready", f"not ready: {', '.join(problems)} unavailable")


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

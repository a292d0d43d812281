"""The one error shape of the API: {"error": code, "detail": sentence} (+ "fields" for validation)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..db import DatabaseUnavailable

log = logging.getLogger("pgpush.api")


class ApiError(Exception):
    """Raised by handlers and dependencies; rendered as a JSON error response."""

    def __init__(
        self,
        status: int,
        error: str,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        fields: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = headers
        self.fields = fields


def error_response(
    status: int,
    error: str,
    detail: str,
    headers: dict[str, str] | None = None,
    fields: list[dict[str, Any]] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"error": error, "detail": detail}
    if fields is not None:
        body["fields"] = fields
    return JSONResponse(body, status_code=status, headers=headers)


_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_streams",
}


def _field_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    return [
        {"field": ".".join(str(p) for p in err.get("loc", ()) if p != "body"), "message": err.get("msg", "")}
        for err in exc.errors()
    ]


def api_error_response(request: Request, exc: ApiError) -> JSONResponse:
    """Log a refused request (never its credentials) and render its JSON error."""
    log.info("%s %s -> %d %s: %s", request.method, request.url.path, exc.status, exc.error, exc.detail)
    return error_response(exc.status, exc.error, exc.detail, exc.headers, exc.fields)


def install_error_handlers(app: FastAPI) -> None:
    """Every failure, including the framework's own (404, 405, validation), speaks the same JSON."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return api_error_response(request, exc)

    @app.exception_handler(DatabaseUnavailable)
    async def _database_unavailable(request: Request, exc: DatabaseUnavailable) -> JSONResponse:
        return api_error_response(
            request, ApiError(503, "database_unavailable", str(exc), headers={"Retry-After": "1"})
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        fields = _field_errors(exc)
        if any(err.get("type") == "json_invalid" for err in exc.errors()):
            log.info("%s %s -> 400 malformed JSON", request.method, request.url.path)
            return error_response(400, "malformed_json", "the request body is not valid JSON")
        detail = "; ".join(f"{f['field'] or 'body'}: {f['message']}" for f in fields)
        log.info("%s %s -> 422 %s", request.method, request.url.path, detail)
        return error_response(422, "invalid_request", detail, fields=fields)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "error")
        log.info("%s %s -> %d", request.method, request.url.path, exc.status_code)
        return error_response(exc.status_code, code, str(exc.detail), dict(exc.headers or {}))


class FieldError(BaseModel):
    """One field that broke its rule: its dotted location (e.g. `recipients.2`) and what is wrong."""

    field: str
    message: str


class ErrorBody(BaseModel):
    """The JSON body of every error response (docs/protocol.md, "The REST API")."""

    error: str = Field(description="A stable machine-readable code, e.g. `invalid_request`")
    detail: str = Field(description="A human sentence")
    fields: list[FieldError] | None = Field(default=None, description="Only on validation errors (422)")


def error_responses(descriptions: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: each error status with its description and the error model."""
    return {status: {"model": ErrorBody, "description": text} for status, text in descriptions.items()}

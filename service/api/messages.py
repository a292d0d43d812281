"""POST /messages: a publisher writes one message to up to 1,000 recipients (docs/protocol.md §4).

The API writes to the same table as any SQL writer, so what it publishes is delivered exactly like a row
inserted with psql: the trigger orders and announces it, the stream reads it.
"""

from __future__ import annotations

import json
import logging
import unicodedata
from collections import Counter
from typing import Annotated

import prometheus_client
from fastapi import APIRouter, Request, Response
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, JsonValue, field_validator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..db import Database, IdempotencyConflict, InvalidMessage
from ..table_rules import EVENT_PATTERN, reserved_event_problem
from .deps import PublisherUser
from .errors import ApiError, error_responses

log = logging.getLogger("pgpush.publish")
router = APIRouter()

MAX_RECIPIENTS = 1000


def storable_text(value: str) -> str:
    """Refuse text Postgres cannot store: NUL, and lone surrogates (not UTF-8)."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (no lone surrogates)") from None
    return value


def no_control_characters(value: str) -> str:
    """The table's CHECK refuses control characters in a recipient; say so before Postgres does."""
    if any(unicodedata.category(c) == "Cc" for c in value):
        raise ValueError("must not contain control characters")
    return storable_text(value)


def not_reserved(event: str) -> str:
    """Control events are the stream's own; the table's CHECK refuses them too (migration 0004)."""
    problem = reserved_event_problem(event)
    if problem is not None:
        raise ValueError(problem)
    return event


# What no_control_characters and storable_text let through, for the schema only: pydantic's regex engine
# would check the same again.
EVENT_SCHEMA_PATTERN = r"^(?!(?:pause|reset|token_expired)$)(?!pgpush)[A-Za-z0-9_.:-]{1,64}$"
RECIPIENT_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]+$"
KEY_PATTERN = r"^[^\x00]*$"

Recipient = Annotated[
    str,
    Field(min_length=1, max_length=256, json_schema_extra={"pattern": RECIPIENT_PATTERN}),
    AfterValidator(no_control_characters),
]


class PublishRequest(BaseModel):
    """One message for one or more recipients."""

    model_config = ConfigDict(extra="forbid", strict=True)

    recipients: list[Recipient] = Field(
        min_length=1,
        max_length=MAX_RECIPIENTS,
        description="Distinct users (JWT `sub`s), 1 to 1,000",
        json_schema_extra={"uniqueItems": True},  # enforced by _distinct below
    )
    event: Annotated[str, AfterValidator(not_reserved)] = Field(
        default="message",
        pattern=EVENT_PATTERN,
        description="The SSE event type; not pause, reset, token_expired or a name starting with pgpush",
        # The schema states the reserved names too, so what it admits the server accepts; pydantic's own
        # regex engine has no look-ahead, hence not_reserved for the check itself.
        json_schema_extra={"pattern": EVENT_SCHEMA_PATTERN},
    )
    data: JsonValue = Field(description="Any JSON value; at most PGPUSH_MAX_DATA_BYTES as compact JSON")
    key: (
        Annotated[str, Field(json_schema_extra={"pattern": KEY_PATTERN}), AfterValidator(storable_text)]
        | None
    ) = Field(
        default=None,
        max_length=256,
        description="Idempotency key: a repeat for a recipient returns its existing message",
    )

    @field_validator("recipients")
    @classmethod
    def _distinct(cls, recipients: list[str]) -> list[str]:
        repeated = sorted(r for r, n in Counter(recipients).items() if n > 1)
        if repeated:
            raise ValueError(f"recipients must be distinct; repeated: {', '.join(map(repr, repeated))}")
        return recipients


class PublishedMessage(BaseModel):
    """Where the message landed for one recipient; `seq` is its SSE event id in that user's stream."""

    id: int
    recipient: str
    seq: int


class PublishResponse(BaseModel):
    """One entry per recipient, in the order the recipients were given."""

    messages: list[PublishedMessage]


def compact_data(data: JsonValue, limit: int) -> str:
    """`data` as compact JSON text, checked against the size limit (413) and JSON's own rules (422)."""
    try:
        text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        size = len(text.encode("utf-8"))
    except ValueError as exc:  # NaN/Infinity, or a lone surrogate that UTF-8 cannot encode
        message = "must be valid JSON text: no NaN or Infinity, no lone surrogates"
        raise ApiError(
            422, "invalid_request", f"data: {message}", fields=[{"field": "data", "message": message}]
        ) from exc
    if size > limit:
        raise ApiError(
            413,
            "payload_too_large",
            f"data is {size} bytes as compact JSON; the limit is {limit} bytes (PGPUSH_MAX_DATA_BYTES)",
        )
    return text


@router.post(
    "/messages",
    operation_id="publish_message",
    summary="Publish a message to one or more recipients",
    status_code=201,
    response_model=PublishResponse,
    responses={
        200: {"model": PublishResponse, "description": "Every recipient already had this key: nothing new"},
        201: {"description": "At least one new message was written"},
        **error_responses(
            {
                400: "The body is not valid JSON",
                401: "No credentials, or a token that does not verify",
                403: "The token lacks the `messages:publish` scope",
                409: "The key is already used for a recipient with another event or data",
                413: "The body is over PGPUSH_MAX_BODY_BYTES, or `data` over PGPUSH_MAX_DATA_BYTES",
                422: "A field breaks its rule (see `fields`)",
                503: "The database is not answering; retry",
            }
        ),
    },
)
async def publish_message(
    request: Request, response: Response, body: PublishRequest, publisher: PublisherUser
) -> PublishResponse:
    """Write the message for every recipient in one statement; each recipient's stream delivers it.

    With a `key`, a recipient that already has a message with that key gets no new one: its existing
    message is returned (200 when no recipient got a new one), or 409 when its event or data differ.
    """
    state = request.app.state
    db: Database = state.db
    data = compact_data(body.data, state.settings.max_data_bytes)
    try:
        published = await db.publish(body.recipients, body.event, data, body.key)
    except IdempotencyConflict as exc:
        raise ApiError(
            409,
            "idempotency_conflict",
            f"key {exc.key!r} is already used with another event or data for: {', '.join(exc.recipients)}",
        ) from None
    except InvalidMessage as exc:
        raise ApiError(
            422,
            "invalid_request",
            f"{exc.field}: {exc.detail}",
            fields=[{"field": exc.field, "message": exc.detail}],
        ) from None
    if published.created == 0:
        response.status_code = 200
    log.info(
        "published",
        extra={
            "publisher": publisher.sub,
            "event": body.event,
            "recipients": len(body.recipients),
            "created_rows": published.created,
        },
    )
    return PublishResponse(
        messages=[PublishedMessage(id=r.id, recipient=r.recipient, seq=r.seq) for r in published.rows]
    )


class CountPublishRequests:
    """Counts POST /messages by response status, whoever answered (the route, validation, the body limit)."""

    def __init__(self, app: ASGIApp, counter: prometheus_client.Counter) -> None:
        self.app = app
        self.counter = counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/messages":
            await self.app(scope, receive, send)
            return
        status = 500

        async def record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            self.counter.labels(str(status)).inc()

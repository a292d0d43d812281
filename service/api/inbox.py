"""The user's inbox over REST: GET /me/messages (keyset pages) and POST /me/messages/read (protocol §4).

Pages are cut by `seq`, never by OFFSET: a page starts strictly after (or before) the last seq the previous
one returned, so rows written or marked read while a client pages can never make it skip or repeat a row.
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, JsonValue, model_validator

from ..db import Database, InboxRow
from ..sse import compact_json
from .deps import CurrentUser
from .errors import ApiError, error_responses

router = APIRouter()

MAX_SEQ = 2**63 - 1
MAX_PAGE = 500
# What encode_cursor makes: unpadded base64url.
CURSOR_PATTERN = r"^[A-Za-z0-9_-]+$"
MAX_MARK_SEQS = 10_000


def _integral(value: object) -> object:
    """JSON Schema counts 3.0 as an integer, so the API takes it as 3 (3.5 is still refused)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Seq = Annotated[int, Field(ge=0, le=MAX_SEQ), BeforeValidator(_integral)]


class InboxMessage(BaseModel):
    """One of the user's messages."""

    id: int
    seq: int = Field(description="The message's SSE event id; increasing, not dense")
    event: str
    data: JsonValue
    created_at: datetime
    read_at: datetime | None


class InboxPage(BaseModel):
    """A page of messages and the cursor of the next one (null when there is none)."""

    messages: list[InboxMessage]
    next: str | None = Field(description="Pass as `cursor` for the next page; opaque")


class MarkReadRequest(BaseModel):
    """Either the seqs to mark read, or `through`: every message with a seq up to it."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        # _exactly_one, as the schema says it: one of the two is given and not null.
        json_schema_extra={
            "oneOf": [
                {"properties": {"seqs": {"type": "array"}}, "required": ["seqs"]},
                {"properties": {"through": {"type": "integer"}}, "required": ["through"]},
            ]
        },
    )

    seqs: list[Seq] | None = Field(default=None, max_length=MAX_MARK_SEQS)
    through: Seq | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> MarkReadRequest:
        if (self.seqs is None) == (self.through is None):
            raise ValueError("send exactly one of 'seqs' and 'through'")
        return self


class MarkReadResponse(BaseModel):
    """How many messages went from unread to read."""

    updated: int


# ---- the cursor: the query it belongs to and the last seq it returned, as unpadded base64url JSON ----

_CURSOR_FIELDS = {"unread": "u", "order": "o", "after": "a", "before": "b"}


def encode_cursor(query: dict[str, Any], last_seq: int) -> str:
    payload = {short: query[name] for name, short in _CURSOR_FIELDS.items()} | {"s": last_seq}
    return base64.urlsafe_b64encode(orjson.dumps(payload)).rstrip(b"=").decode()


def _is_seq(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_SEQ


def decode_cursor(cursor: str) -> tuple[dict[str, Any], int]:
    """The query and last seq in a cursor; ValueError when it is not one this server made."""
    try:
        payload = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, ValueError):
        raise ValueError("not a cursor from a previous page's `next`") from None
    if not isinstance(payload, dict) or set(payload) != {*_CURSOR_FIELDS.values(), "s"}:
        raise ValueError("not a cursor from a previous page's `next`")
    query = {name: payload[short] for name, short in _CURSOR_FIELDS.items()}
    valid = (
        isinstance(query["unread"], bool)
        and query["order"] in ("asc", "desc")
        and all(query[n] is None or _is_seq(query[n]) for n in ("after", "before"))
        and _is_seq(payload["s"])
    )
    if not valid:
        raise ValueError("not a cursor from a previous page's `next`")
    return query, int(payload["s"])


def _invalid_cursor(message: str) -> ApiError:
    return ApiError(
        422, "invalid_request", f"cursor: {message}", fields=[{"field": "query.cursor", "message": message}]
    )


def _message(row: InboxRow) -> dict[str, Any]:
    # `data` goes out as the stream sends it (compact JSON made from jsonb's own text), never through a
    # Python value: a value nested past pydantic's or orjson's depth limits (both accept ~255 levels, the
    # API and Postgres far more) or a number beyond a double would fail or change on the way back out.
    return {
        "id": row.id,
        "seq": row.seq,
        "event": row.event,
        "data": orjson.Fragment(compact_json(row.data)),
        "created_at": row.created_at,
        "read_at": row.read_at,
    }


def page_response(rows: list[InboxRow], next_cursor: str | None) -> Response:
    """InboxPage's JSON, written directly; datetimes as pydantic writes them (`…Z` for UTC)."""
    body = orjson.dumps(
        {"messages": [_message(row) for row in rows], "next": next_cursor}, option=orjson.OPT_UTC_Z
    )
    return Response(body, media_type="application/json")


@router.get(
    "/me/messages",
    operation_id="list_my_messages",
    summary="List the user's messages, a page at a time",
    response_model=InboxPage,
    responses=error_responses(
        {
            401: "No credentials, or a token that does not verify",
            422: "A parameter breaks its rule, or the cursor does not belong to this query",
            503: "The database is not answering; retry",
        }
    ),
)
async def list_my_messages(
    request: Request,
    user: CurrentUser,
    unread: Annotated[bool, Query(description="Only messages not marked read")] = False,
    after: Annotated[int | None, Query(ge=0, le=MAX_SEQ, description="Only seqs greater than this")] = None,
    before: Annotated[int | None, Query(ge=0, le=MAX_SEQ, description="Only seqs less than this")] = None,
    order: Annotated[Literal["asc", "desc"], Query(description="By seq; newest first by default")] = "desc",
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="At most this many messages")] = 50,
    cursor: Annotated[
        str | None,
        Query(
            max_length=512,
            pattern=CURSOR_PATTERN,
            description="A previous page's `next`, as it was sent: an opaque value (unpadded base64url) that "
            "only this server makes; any other value, or one sent with different query parameters, is a 422",
        ),
    ] = None,
) -> Response:
    """The caller's messages by seq, a page at a time; follow `next` (as `cursor`) for the next page."""
    query: dict[str, Any] = {"unread": unread, "order": order, "after": after, "before": before}
    position: int | None = None
    if cursor is not None:
        try:
            from_cursor, position = decode_cursor(cursor)
        except ValueError as exc:
            raise _invalid_cursor(str(exc)) from None
        # Clients may repeat the first page's parameters with the cursor, but may not change them.
        for name, value in query.items():
            if name in request.query_params and from_cursor[name] != value:
                raise _invalid_cursor(f"it belongs to a query with {name}={from_cursor[name]!r}")
        query = from_cursor
    ascending = query["order"] == "asc"
    # Bounds: lower exclusive, upper inclusive (before - 1 cannot overflow; after + 1 could).
    lower = -1 if query["after"] is None else query["after"]
    upper = MAX_SEQ if query["before"] is None else query["before"] - 1
    if position is not None:
        if ascending:
            lower = max(lower, position)
        else:
            upper = min(upper, position - 1)
    db: Database = request.app.state.db
    rows = await db.inbox_page(
        user.sub, unread=query["unread"], ascending=ascending, after=lower, upto=upper, limit=limit + 1
    )
    page = rows[:limit]
    next_cursor = encode_cursor(query, page[-1].seq) if len(rows) > limit else None
    return page_response(page, next_cursor)


@router.post(
    "/me/messages/read",
    operation_id="mark_my_messages_read",
    summary="Mark some of the user's messages read",
    response_model=MarkReadResponse,
    responses=error_responses(
        {
            400: "The body is not valid JSON",
            401: "No credentials, or a token that does not verify",
            413: "The body is over PGPUSH_MAX_BODY_BYTES",
            422: "Neither or both of `seqs` and `through`, or a seq out of range",
            503: "The database is not answering; retry",
        }
    ),
)
async def mark_my_messages_read(
    request: Request, user: CurrentUser, body: MarkReadRequest
) -> MarkReadResponse:
    """Mark the caller's messages read by seq, or all up to one; other users' rows are never touched."""
    db: Database = request.app.state.db
    if body.seqs is not None:
        updated = await db.mark_read(user.sub, body.seqs)
    else:
        assert body.through is not None  # the model guarantees exactly one of the two
        updated = await db.mark_read_through(user.sub, body.through)
    return MarkReadResponse(updated=updated)

"""Schemathesis hooks for tests/integration/test_openapi.py (loaded through SCHEMATHESIS_HOOKS).

The inbox's `cursor` is opaque (the spec says so): only a page's `next`, sent with the same query, is valid,
which no schema can state. A generated cursor that fits the schema is replaced with one this server would
have made for the same query, so the checks exercise cursors as clients send them.
"""

from __future__ import annotations

import re
from typing import Any

import schemathesis
from pgpush.api.inbox import CURSOR_PATTERN, MAX_PAGE, MAX_SEQ, encode_cursor


def _flag(value: object) -> bool | None:
    if value in (True, "true"):
        return True
    if value in (False, "false", None):
        return False
    return None


def _integer(value: object) -> int | None:
    """The value as the API reads an integer parameter; None when it would refuse it."""
    if isinstance(value, str) and re.fullmatch(r"[0-9]{1,19}", value):
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_SEQ:
        return value
    return None


@schemathesis.hook
def before_call(ctx: Any, case: Any, **kwargs: Any) -> None:
    """Right before each request, in every phase (the coverage phase bypasses the generation hooks)."""
    if case.operation.path == "/me/messages" and case.method.upper() == "GET":
        case.query = with_a_real_cursor(case.query)


def with_a_real_cursor(query: dict[str, Any] | None) -> dict[str, Any] | None:
    cursor = query.get("cursor") if query else None
    if query is None or not isinstance(cursor, str) or not re.fullmatch(CURSOR_PATTERN, cursor):
        return query
    unread, order = _flag(query.get("unread")), query.get("order", "desc")
    limit = _integer(query.get("limit", 50))
    after = None if query.get("after") is None else _integer(query["after"])
    before = None if query.get("before") is None else _integer(query["before"])
    valid = (
        unread is not None
        and order in ("asc", "desc")
        and limit is not None
        and 1 <= limit <= MAX_PAGE
        and (after is not None or query.get("after") is None)
        and (before is not None or query.get("before") is None)
    )
    if valid:  # otherwise another parameter is already wrong: the request is refused for that
        made_for = {"unread": unread, "after": after, "before": before, "order": order, "limit": limit}
        query["cursor"] = encode_cursor(made_for, last_seq=1)
    return query

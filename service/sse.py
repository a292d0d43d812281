"""The SSE wire format: frames pgpush writes and the cursor it reads (WHATWG HTML §9.2, protocol §3)."""

from __future__ import annotations

import re

import orjson

MAX_CURSOR = 2**63 - 1
_DIGITS = re.compile(r"[0-9]+")
# jsonb prints ", " and ": " between tokens; a string token is kept whole so its spaces survive.
_JSON_TOKEN_OR_SPACE = re.compile(r'("(?:[^"\\]|\\.)*")|[ \t\r\n]+')
# orjson reads integers beyond 64 bits and decimals beyond a double's precision as doubles, losing digits.
# Such a number has at least 16 significant digits (jsonb never prints an exponent), so 17 or more digits and
# dots in a row send the text to the exact path; a run inside a string only costs speed. (str.translate then
# a substring search is several times faster than a regex scan for the run.)
_DIGIT_OR_DOT_TO_ZERO = str.maketrans(dict.fromkeys("0123456789.", "0"))
_LONG_NUMBER = "0" * 17

PING = b": ping\n\n"


class CursorError(ValueError):
    """A Last-Event-ID (or lastEventId) that is not an integer in 0 … 2^63-1."""


def parse_cursor(header: str | None, query: str | None) -> int | None:
    """The client's resume point: the header wins over the query parameter; absent or empty means none."""
    value = header if header else query
    if not value:
        return None
    # Leading zeros are only padding (the value decides); the length check keeps int() off huge input.
    if not _DIGITS.fullmatch(value) or len(value.lstrip("0")) > 19 or int(value) > MAX_CURSOR:
        raise CursorError("Last-Event-ID must be an integer from 0 to 9223372036854775807")
    return int(value)


def compact_json(jsonb_text: str) -> bytes:
    """Compact JSON bytes (no insignificant whitespace, UTF-8 unescaped) for a jsonb value's text."""
    if _LONG_NUMBER not in jsonb_text.translate(_DIGIT_OR_DOT_TO_ZERO):
        try:
            return orjson.dumps(orjson.loads(jsonb_text))
        except (orjson.JSONDecodeError, TypeError):
            pass  # a number out of a double's range, or nesting past orjson's limits (254 levels written)
    # The exact path: jsonb's own text, numbers digit for digit, only the spaces between tokens dropped.
    return _JSON_TOKEN_OR_SPACE.sub(lambda m: m.group(1) or "", jsonb_text).encode()


def message_frame(seq: int, event: str, data: bytes) -> bytes:
    """A row as an SSE event. `event` is safe: the table's CHECK admits no CR or LF (docs/protocol.md §1)."""
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (seq, event.encode(), data)


def control_frame(event: str, data: object, retry_ms: int | None = None) -> bytes:
    """An event without `id:` (reset, pause, token_expired), so the client's Last-Event-ID is kept."""
    retry = b"retry: %d\n" % retry_ms if retry_ms is not None else b""
    return b"event: %s\n%sdata: %s\n\n" % (event.encode(), retry, orjson.dumps(data))


def retry_frame(retry_ms: int) -> bytes:
    """Only a reconnection delay."""
    return b"retry: %d\n\n" % retry_ms

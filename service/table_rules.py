"""The messages table's rules for a recipient and an event, restated for values that have not been
through Postgres' CHECK constraints: an API request, or a notification's carried row."""

from __future__ import annotations

import re
import unicodedata

EVENT_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"
_EVENT = re.compile(EVENT_PATTERN)
# Control events a stream sends of its own (migration 0004 refuses them as a row's event): a row could
# otherwise make a client pause, reset its inbox or drop its token.
RESERVED_EVENTS = frozenset({"pause", "reset", "token_expired"})
RESERVED_PREFIX = "pgpush"
MAX_RECIPIENT_CHARS = 256


def is_reserved_event(event: str) -> bool:
    return event in RESERVED_EVENTS or event.startswith(RESERVED_PREFIX)


def reserved_event_problem(event: str) -> str | None:
    """Why a row may not use this event name, or None."""
    if is_reserved_event(event):
        return (
            f"{event!r} is reserved for pgpush's control events (pause, reset, token_expired and every name "
            f"starting with {RESERVED_PREFIX!r})"
        )
    return None


def is_row_event(event: str) -> bool:
    """What the table's CHECKs admit as a row's event: the pattern, and no reserved name."""
    return _EVENT.fullmatch(event) is not None and not is_reserved_event(event)


def has_control_characters(text: str) -> bool:
    return any(unicodedata.category(c) == "Cc" for c in text)


def is_recipient(name: str) -> bool:
    """What the table's CHECK admits as a recipient: 1 to 256 characters, no control characters."""
    return 1 <= len(name) <= MAX_RECIPIENT_CHARS and not has_control_characters(name)

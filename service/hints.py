"""What a notification says (migrations 0002, 0004): recipients to re-read, or small statements' rows whole.

Each line is a recipient name, or one row as tab-separated fields: recipient, the recipient's last seq
before the statement, seq, event, created_at (epoch seconds), jsonb text. The whole payload `*` means
"anyone may have new rows". Recipients and events hold no control characters and jsonb text escapes them,
so neither separator can occur inside a field. A payload that carries rows also names their recipients,
for releases that read only names; here a name whose rows are carried is not a hint.

Only the owner's trigger functions and the service know the private channel (docs/protocol.md, "Trust").
Even so every field is checked against the table's own rules before a row can reach a stream: a line
that breaks one is not used as a row, and its recipients are re-read from the table instead.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, replace

from .sse import MAX_CURSOR
from .table_rules import is_recipient, is_row_event

log = logging.getLogger("pgpush.hints")


@dataclass(frozen=True, slots=True)
class CarriedRow:
    """A row delivered inside its notification; `previous_seq` proves nothing was skipped before it."""

    recipient: str
    previous_seq: int
    seq: int
    event: str
    data: str
    created_at: float


@dataclass(frozen=True, slots=True)
class Hint:
    """Recipients whose new rows must be read (None: every live recipient) and the rows carried whole."""

    recipients: list[str] | None
    rows: list[CarriedRow]


EVERYONE = Hint(None, [])


def parse_hint(payload: str) -> Hint:
    if payload == "*":
        return EVERYONE
    names: list[str] = []
    rows: list[CarriedRow] = []
    for line in payload.split("\n"):
        if "\t" not in line:
            if not is_recipient(line):
                return _unreadable("a recipient name the table would refuse")
            names.append(line)
            continue
        row = _carried_row(line)
        if row is None:
            return _unreadable("a carried row the table would refuse")
        rows.append(row)
    carried = {row.recipient for row in rows}
    return Hint([name for name in names if name not in carried], rows)


def names_only(hint: Hint) -> Hint:
    """The hint with its carried rows turned back into names to re-read (nothing of them is used)."""
    if hint.recipients is None or not hint.rows:
        return replace(hint, rows=[])
    return Hint(list(dict.fromkeys([*hint.recipients, *(row.recipient for row in hint.rows)])), [])


def _unreadable(what: str) -> Hint:
    # Not ours to guess at: read the table for everyone rather than risk skipping or inventing a row.
    log.warning("notification with %s; re-reading every live recipient", what)
    return EVERYONE


def _carried_row(line: str) -> CarriedRow | None:
    """The row of one line, or None when any field breaks the table's rules."""
    fields = line.split("\t", 5)
    if len(fields) != 6:
        return None
    recipient, previous_text, seq_text, event, created_text, data = fields
    try:
        previous, seq, created = int(previous_text), int(seq_text), float(created_text)
    except ValueError:
        return None
    if not (0 <= previous < seq <= MAX_CURSOR) or not math.isfinite(created):
        return None
    if not is_recipient(recipient) or not is_row_event(event) or not _is_jsonb_text(data):
        return None
    return CarriedRow(recipient, previous, seq, event, data, created)


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _is_jsonb_text(text: str) -> bool:
    """JSON as jsonb prints it: one value, no raw control character anywhere (a bare CR would end an SSE
    field), no NaN or Infinity."""
    if any(ord(c) < 0x20 for c in text):
        return False
    try:
        json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return False
    return True

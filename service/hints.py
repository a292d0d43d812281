"""What a `pgpush` notification says (migration 0002): recipients to re-read, or small statements' rows whole.

Each line is a recipient name, or one row as tab-separated fields: recipient, the recipient's last seq
before the statement, seq, event, created_at (epoch seconds), jsonb text. The whole payload `*` means
"anyone may have new rows". Recipients and events hold no control characters and jsonb text escapes them,
so neither separator can occur inside a field. A payload that carries rows also names their recipients,
for releases that read only names; here a name whose rows are carried is not a hint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

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


def parse_hint(payload: str) -> Hint:
    if payload == "*":
        return Hint(None, [])
    names: list[str] = []
    rows: list[CarriedRow] = []
    for line in payload.split("\n"):
        if "\t" not in line:
            names.append(line)
            continue
        fields = line.split("\t", 5)
        try:
            recipient, previous, seq, event, created, data = fields
            rows.append(CarriedRow(recipient, int(previous), int(seq), event, data, float(created)))
        except ValueError:
            # Not ours to guess at: read the table for everyone rather than risk skipping a row.
            log.warning("unreadable notification line; re-reading every live recipient")
            return Hint(None, [])
    carried = {row.recipient for row in rows}
    return Hint([name for name in names if name not in carried], rows)

"""Small statements carry their rows in the notification, so the listener can skip the table read.

A notification line is either a recipient name (a hint: read that recipient's new rows) or one whole row,
tab-separated: recipient, the recipient's last seq before this statement, seq, event, created_at (epoch
seconds), data (jsonb text). A payload that carries rows still names their recipients first, so a release
that reads only names (0.1.0, during a rolling upgrade or after a rollback) reads the table as before;
this release skips a name whose rows came with it. The "last seq before" lets the hub prove it has every
earlier row before it uses a carried one (docs/protocol.md §2: the table stays the truth; a carried row
only saves a read). Recipients and events hold no control characters and jsonb text escapes them, so tabs
and newlines are unambiguous.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# Rows a statement may carry: beyond a few, building the payload costs more than the read it saves.
CARRY_MAX_ROWS = 16

UPGRADE = rf"""
CREATE OR REPLACE FUNCTION pgpush_advance_and_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    small boolean;
    names text;
    carried text;
BEGIN
    small := NOT EXISTS (SELECT FROM new_rows OFFSET {CARRY_MAX_ROWS});
    -- Every part of one statement sees the counters as they were before its UPDATE: "previous" is each
    -- recipient's last seq before this statement (its rows hold that recipient's counter lock). Only a
    -- small statement reads it and builds the rows' lines.
    WITH latest AS (
        SELECT recipient, max(seq) AS seq FROM new_rows GROUP BY recipient
    ), previous AS (
        SELECT c.recipient, c.last_seq FROM message_counters AS c JOIN latest USING (recipient)
    ), advanced AS (
        UPDATE message_counters AS c SET last_seq = latest.seq
        FROM latest WHERE c.recipient = latest.recipient
    )
    SELECT
        (SELECT string_agg(recipient, E'\n') FROM latest),
        CASE WHEN small THEN (
            SELECT string_agg(
                concat_ws(
                    E'\t', n.recipient, p.last_seq, n.seq, n.event, extract(epoch FROM n.created_at), n.data
                ),
                E'\n' ORDER BY n.seq
            )
            FROM new_rows AS n JOIN previous AS p USING (recipient)
        ) END
    INTO names, carried;
    IF names IS NULL THEN
        RETURN NULL;  -- the statement inserted nothing
    END IF;
    -- Rows whole when they fit, else the names alone, else "everyone, re-read".
    IF octet_length(names) + 1 + coalesce(octet_length(carried), 8000) <= 7900 THEN
        PERFORM pg_notify('pgpush', names || E'\n' || carried);
    ELSIF octet_length(names) <= 7900 THEN
        PERFORM pg_notify('pgpush', names);
    ELSE
        PERFORM pg_notify('pgpush', '*');
    END IF;
    RETURN NULL;
END
$$
"""

# 0001's function, as it was.
DOWNGRADE = r"""
CREATE OR REPLACE FUNCTION pgpush_advance_and_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    payload text;
BEGIN
    WITH latest AS (
        SELECT recipient, max(seq) AS seq FROM new_rows GROUP BY recipient
    ), advanced AS (
        UPDATE message_counters AS c SET last_seq = latest.seq
        FROM latest WHERE c.recipient = latest.recipient
        RETURNING c.recipient
    )
    SELECT string_agg(recipient, E'\n') INTO payload FROM advanced;
    IF payload IS NULL THEN
        RETURN NULL;
    END IF;
    IF octet_length(payload) > 7900 THEN
        payload := '*';
    END IF;
    PERFORM pg_notify('pgpush', payload);
    RETURN NULL;
END
$$
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)

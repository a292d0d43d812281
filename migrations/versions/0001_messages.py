"""The messages table, per-recipient counters, and the triggers that order and announce new rows.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

UPGRADE = [
    r"""
CREATE TABLE message_counters (
    recipient text PRIMARY KEY,
    last_seq  bigint NOT NULL
)
""",
    r"""
CREATE TABLE messages (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    recipient  text NOT NULL
               CONSTRAINT messages_recipient_valid
               CHECK (char_length(recipient) BETWEEN 1 AND 256 AND recipient !~ '[[:cntrl:]]'),
    seq        bigint NOT NULL,
    event      text NOT NULL DEFAULT 'message'
               CONSTRAINT messages_event_valid CHECK (event ~ '^[A-Za-z0-9_.:-]{1,64}$'),
    data       jsonb NOT NULL,
    key        text CONSTRAINT messages_key_valid CHECK (char_length(key) <= 256),
    created_at timestamptz NOT NULL DEFAULT now(),
    read_at    timestamptz,
    CONSTRAINT messages_recipient_seq_key UNIQUE (recipient, seq),
    CONSTRAINT messages_recipient_key_key UNIQUE (recipient, key)
)
""",
    r"""
-- Replay and the inbox read unread rows of one recipient by seq.
CREATE INDEX messages_unread_idx ON messages (recipient, seq) WHERE read_at IS NULL
""",
    r"""
-- seq values come from one sequence, taken only after the recipient's counter row is locked; the lock is
-- held until the inserting transaction ends, so one recipient's rows commit in seq order: a reader that has
-- seen seq n committed can never later find a smaller one (docs/protocol.md §2). seq is increasing, not
-- dense.
CREATE SEQUENCE messages_seq_seq AS bigint OWNED BY messages.seq
""",
    r"""
-- Locking (ON CONFLICT … DO UPDATE … WHERE false locks the row and writes nothing) instead of
-- incrementing per row: updating one row N times in a transaction walks an ever longer chain of row
-- versions, which made a 20,000-row insert for one recipient 14 times slower. The counter is written once
-- per statement, by the AFTER STATEMENT trigger below.
CREATE FUNCTION pgpush_assign_seq() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO message_counters AS c (recipient, last_seq) VALUES (NEW.recipient, 0)
    ON CONFLICT (recipient) DO UPDATE SET last_seq = c.last_seq WHERE false;
    NEW.seq := nextval('messages_seq_seq');
    RETURN NEW;
END
$$
""",
    r"""
CREATE TRIGGER messages_assign_seq
BEFORE INSERT ON messages
FOR EACH ROW EXECUTE FUNCTION pgpush_assign_seq()
""",
    r"""
-- Once per statement: advance each recipient's counter to its newest seq (the row is already locked by
-- this transaction), then send one hint naming those recipients (newline-separated: recipients hold no
-- control characters). Past NOTIFY's 8000-byte payload limit the hint becomes '*': "everyone, re-read".
CREATE FUNCTION pgpush_advance_and_notify() RETURNS trigger
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
""",
    r"""
CREATE TRIGGER messages_advance_and_notify
AFTER INSERT ON messages
REFERENCING NEW TABLE AS new_rows
FOR EACH STATEMENT EXECUTE FUNCTION pgpush_advance_and_notify()
""",
]

DOWNGRADE = [
    "DROP TABLE messages",
    "DROP TABLE message_counters",
    "DROP FUNCTION pgpush_advance_and_notify()",
    "DROP FUNCTION pgpush_assign_seq()",
]


# One statement per execute: asyncpg prepares each, and a prepared statement holds one command.


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)

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
-- The counter row's lock is held until the inserting transaction ends, so one recipient's rows commit
-- in seq order: a reader that has seen seq n committed can never later find a smaller one (DESIGN §2).
CREATE FUNCTION pgpush_assign_seq() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO message_counters AS c (recipient, last_seq) VALUES (NEW.recipient, 1)
    ON CONFLICT (recipient) DO UPDATE SET last_seq = c.last_seq + 1
    RETURNING c.last_seq INTO NEW.seq;
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
-- One hint per statement naming the recipients with new rows (newline-separated: recipients hold no
-- control characters). Past NOTIFY's 8000-byte payload limit the hint becomes '*': "everyone, re-read".
CREATE FUNCTION pgpush_notify_new_rows() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    payload text;
BEGIN
    SELECT string_agg(recipient, E'\n') INTO payload
    FROM (SELECT DISTINCT recipient FROM new_rows) AS r;
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
CREATE TRIGGER messages_notify_new_rows
AFTER INSERT ON messages
REFERENCING NEW TABLE AS new_rows
FOR EACH STATEMENT EXECUTE FUNCTION pgpush_notify_new_rows()
""",
]

DOWNGRADE = [
    "DROP TABLE messages",
    "DROP TABLE message_counters",
    "DROP FUNCTION pgpush_notify_new_rows()",
    "DROP FUNCTION pgpush_assign_seq()",
]


# One statement per execute: asyncpg prepares each, and a prepared statement holds one command.


def upgrade() -> None:
    for statement in UPGRADE:
        op.execute(statement)


def downgrade() -> None:
    for statement in DOWNGRADE:
        op.execute(statement)

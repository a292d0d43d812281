"""While the write rate is high, writers hand their notification to one announcer instead of sending it.

Every notifying commit holds Postgres' cluster-wide NOTIFY lock through its own WAL flush and the
signalling of every listener, so notifying commits run one at a time (docs/scaling.md). Above a rate, one
replica's announcer (service/announcer.py) takes the "awake" advisory lock. A statement that cannot take
that lock in share mode appends its recipients to the unlogged `message_changes` table instead of calling
pg_notify, and the announcer sends one notification per batch for every statement it collected.

No hint can be stranded. A statement that finds the announcer awake holds the "handover" lock in share
mode until it commits, and looks again once it has it. To go back to sleep, the announcer releases
"awake", then takes "handover" exclusively, which waits for every statement that saw it awake, and only
then reads the table a last time. The locks are not MVCC, so a REPEATABLE READ writer sees them as they are.
`message_changes` is unlogged: after a crash it is empty, and the replicas resync from their cursors when
their listeners reconnect (docs/protocol.md §2.3), as for any lost hint. The table stays the truth.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# Advisory lock keys (bigint space; retention uses ...02): "pgpush" in ASCII, then a number of our own.
AWAKE_LOCK_KEY = 0x70677075736803
HANDOVER_LOCK_KEY = 0x70677075736804
# Rows a statement may carry in its own notification (0002).
CARRY_MAX_ROWS = 16

CHANGES_TABLE = """
CREATE UNLOGGED TABLE message_changes (
    recipients text NOT NULL  -- one statement's recipients, newline-separated
)
"""

# Writers' half of the handover: share mode on "awake" fails while the announcer holds it (or waits for it).
TAKE_HANDOVER_LOCKS = f"""
    batched := NOT pg_try_advisory_xact_lock_shared({AWAKE_LOCK_KEY});
    IF batched THEN
        PERFORM pg_advisory_xact_lock_shared({HANDOVER_LOCK_KEY});
        batched := NOT pg_try_advisory_xact_lock_shared({AWAKE_LOCK_KEY});
    END IF;"""
HAND_OVER = """
    IF batched THEN
        INSERT INTO message_changes (recipients) VALUES (names);
        RETURN NULL;
    END IF;"""


def advance_function(*, handover: bool) -> str:
    """pgpush_advance_and_notify(): 0002's, plus this revision's handover when `handover` is true."""
    return rf"""
CREATE OR REPLACE FUNCTION pgpush_advance_and_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    batched boolean := false;
    small boolean;
    names text;
    carried text;
BEGIN{TAKE_HANDOVER_LOCKS if handover else ""}
    small := NOT batched AND NOT EXISTS (SELECT FROM new_rows OFFSET {CARRY_MAX_ROWS});
    -- Every part of one statement sees the counters as they were before its UPDATE: "previous" is each
    -- recipient's last seq before this statement (its rows hold that recipient's counter lock). Only a
    -- small statement that notifies itself reads it and builds the rows' lines.
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
    END IF;{HAND_OVER if handover else ""}
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


# The announcer's one round trip per batch: take every collected statement, notify their distinct
# recipients in payloads under the 8000-byte limit, and say how many statements that was. Its commit need
# not wait for the WAL flush: it writes nothing durable (the table is unlogged), and a lost hint is only
# a delay.
ANNOUNCE = r"""
CREATE FUNCTION pgpush_announce() RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    taken_statements bigint;
    taken_names text[];
    name text;
    payload text := '';
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    WITH taken AS (
        DELETE FROM message_changes AS c RETURNING c.recipients AS names
    )
    SELECT
        (SELECT count(*) FROM taken),
        (SELECT array_agg(DISTINCT r) FROM taken, unnest(string_to_array(taken.names, E'\n')) AS r)
    INTO taken_statements, taken_names;
    IF taken_statements = 0 THEN
        RETURN 0;
    END IF;
    FOREACH name IN ARRAY taken_names LOOP
        IF payload <> '' AND octet_length(payload) + 1 + octet_length(name) > 7900 THEN
            PERFORM pg_notify('pgpush', payload);
            payload := '';
        END IF;
        payload := CASE WHEN payload = '' THEN name ELSE payload || E'\n' || name END;
    END LOOP;
    PERFORM pg_notify('pgpush', payload);
    RETURN taken_statements;
END
$$
"""


def upgrade() -> None:
    op.execute(CHANGES_TABLE)
    op.execute(advance_function(handover=True))
    op.execute(ANNOUNCE)


def downgrade() -> None:
    # Statements handed over and not yet announced become one "everyone, re-read" hint.
    op.execute("SELECT pg_notify('pgpush', '*') FROM message_changes LIMIT 1")
    op.execute(advance_function(handover=False))
    op.execute("DROP FUNCTION pgpush_announce()")
    op.execute("DROP TABLE message_changes")

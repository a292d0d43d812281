"""Trust boundary: a private notification channel, triggers that run as the owner, reserved event names.

Postgres checks no privilege for LISTEN or NOTIFY: on the public channel `pgpush` any role that can
connect read every carried row and could forge rows into anyone's stream. From this revision:

- The channel is a random name (128 bits) drawn here and kept in `pgpush_channel`, a table only the owner
  (and the roles it grants SELECT to: the service) can read. The functions read it at run time and never
  embed it: a function's source (`pg_proc.prosrc`) is readable by every role.
- The trigger functions and `pgpush_announce()` are SECURITY DEFINER with a fixed search_path, so a
  writer needs INSERT on `messages` and nothing else; nobody but the owner needs, or gets, any access to
  `message_counters`, the seq sequence or `message_changes`. EXECUTE is revoked from PUBLIC;
  `pgpush_announce()` is for the service role alone (GRANT EXECUTE, see deploy/roles.sql).
- Writers hand their notification to the announcer (0003) only when it also says it is awake, in a
  sequence only the owner and the service can set, and never wait on a lock: any role can take advisory
  locks, and holding 0003's "awake" and "handover" stalled every writer or stranded their hints.
- `pause`, `reset`, `token_expired` and every name starting with `pgpush` are control events the stream
  itself sends: the table refuses them as events of a row. The constraint is NOT VALID so adding it
  neither scans the table nor fails on old rows; new rows are checked.

A 0.3.0 replica still listens on `pgpush`, which now carries nothing: during a rolling upgrade its streams
get their rows from its safety-net resync (PGPUSH_SAFETY_NET_SECONDS, 30 s by default) instead of live.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""

from __future__ import annotations

import importlib.util
import secrets
from pathlib import Path
from types import ModuleType

from alembic import op
from sqlalchemy import text

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# Advisory lock keys and carry size: the same numbers as 0003 (writers and announcer agree on them).
AWAKE_LOCK_KEY = 0x70677075736803
HANDOVER_LOCK_KEY = 0x70677075736804
CARRY_MAX_ROWS = 16

# The control events a stream sends of its own; see docs/protocol.md.
RESERVED_EVENTS = ("pause", "reset", "token_expired")
RESERVED_PREFIX = "pgpush"

CHANNEL_TABLE = """
CREATE TABLE pgpush_channel (
    only_row boolean PRIMARY KEY DEFAULT true CONSTRAINT pgpush_channel_one_row CHECK (only_row),
    name     text NOT NULL
)
"""

# 0003's function, notifying on the private channel and running as the owner.
ADVANCE = rf"""
CREATE OR REPLACE FUNCTION pgpush_advance_and_notify() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = {{search_path}} AS $$
DECLARE
    batched boolean := false;
    small boolean;
    names text;
    carried text;
    channel text;
BEGIN
    -- Hand over only to the elected announcer. Any role may take advisory locks, so "awake" held is not
    -- enough: the announcer also says so in a sequence only the owner and the service can set, read
    -- without MVCC (a REPEATABLE READ writer sees it as it is now). Step by step, because the order is
    -- the proof: the announcer clears the marker before it releases "awake" and waits for "handover", so
    -- a writer that still reads it set already holds its share of "handover" and will be announced.
    -- Every lock is only tried: a writer never waits on a lock someone else may hold forever.
    batched := NOT pg_try_advisory_xact_lock_shared({AWAKE_LOCK_KEY});
    IF batched THEN
        batched := pg_try_advisory_xact_lock_shared({HANDOVER_LOCK_KEY});
    END IF;
    IF batched THEN
        batched := NOT pg_try_advisory_xact_lock_shared({AWAKE_LOCK_KEY});
    END IF;
    IF batched THEN
        batched := (SELECT last_value = 1 FROM pgpush_announcer_awake);
    END IF;
    small := NOT batched AND NOT EXISTS (SELECT FROM new_rows OFFSET {CARRY_MAX_ROWS});
    -- Every part of one statement sees the counters as they were before its UPDATE: "previous" is each
    -- recipient's last seq before this statement (its rows hold that recipient's counter lock).
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
    IF batched THEN
        INSERT INTO message_changes (recipients) VALUES (names);
        RETURN NULL;
    END IF;
    -- Read at run time, never written into this body: pg_proc.prosrc is world-readable.
    SELECT c.name INTO STRICT channel FROM pgpush_channel AS c;
    IF octet_length(names) + 1 + coalesce(octet_length(carried), 8000) <= 7900 THEN
        PERFORM pg_notify(channel, names || E'\n' || carried);
    ELSIF octet_length(names) <= 7900 THEN
        PERFORM pg_notify(channel, names);
    ELSE
        PERFORM pg_notify(channel, '*');
    END IF;
    RETURN NULL;
END
$$
"""

ANNOUNCE = r"""
CREATE OR REPLACE FUNCTION pgpush_announce() RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = {search_path} AS $$
DECLARE
    taken_statements bigint;
    taken_names text[];
    name text;
    payload text := '';
    channel text;
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
    SELECT c.name INTO STRICT channel FROM pgpush_channel AS c;
    FOREACH name IN ARRAY taken_names LOOP
        IF payload <> '' AND octet_length(payload) + 1 + octet_length(name) > 7900 THEN
            PERFORM pg_notify(channel, payload);
            payload := '';
        END IF;
        payload := CASE WHEN payload = '' THEN name ELSE payload || E'\n' || name END;
    END LOOP;
    PERFORM pg_notify(channel, payload);
    RETURN taken_statements;
END
$$
"""

# The announcer's word that it holds "awake": 1 or 0 (a sequence is read and set outside MVCC).
AWAKE_MARKER = "CREATE SEQUENCE pgpush_announcer_awake AS integer MINVALUE 0 MAXVALUE 1 START 0"
SET_AWAKE = """
CREATE FUNCTION pgpush_announcer_awake(awake boolean) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = {search_path} AS $$
    SELECT setval('pgpush_announcer_awake', CASE WHEN awake THEN 1 ELSE 0 END, true)
$$
"""

_RESERVED_LIST = ", ".join(f"'{name}'" for name in RESERVED_EVENTS)
RESERVED_CHECK = f"""
ALTER TABLE messages ADD CONSTRAINT messages_event_not_reserved
CHECK (event NOT IN ({_RESERVED_LIST}) AND left(event, {len(RESERVED_PREFIX)}) <> '{RESERVED_PREFIX}')
NOT VALID
"""

FUNCTIONS = ("pgpush_assign_seq()", "pgpush_advance_and_notify()", "pgpush_announce()")
NEW_FUNCTIONS = ("pgpush_announcer_awake(boolean)",)


def _search_path() -> str:
    """The schema the tables live in, between pg_catalog (first, so nothing shadows a built-in) and
    pg_temp (last, so no session's temporary table can stand in for ours)."""
    schema = op.get_bind().execute(text("SELECT quote_ident(current_schema())")).scalar_one()
    return f"pg_catalog, {schema}, pg_temp"


def upgrade() -> None:
    search_path = _search_path()
    op.execute(CHANNEL_TABLE)
    op.execute("REVOKE ALL ON pgpush_channel FROM PUBLIC")
    # Bound, not spliced into the SQL text, so the name appears in no statement log.
    op.get_bind().execute(
        text("INSERT INTO pgpush_channel (name) VALUES (:name)"), {"name": f"pgpush_{secrets.token_hex(16)}"}
    )
    op.execute(AWAKE_MARKER)
    op.execute("REVOKE ALL ON SEQUENCE pgpush_announcer_awake FROM PUBLIC")
    op.execute(SET_AWAKE.format(search_path=search_path))
    op.execute(f"ALTER FUNCTION pgpush_assign_seq() SECURITY DEFINER SET search_path = {search_path}")
    op.execute(ADVANCE.format(search_path=search_path))
    op.execute(ANNOUNCE.format(search_path=search_path))
    for function in FUNCTIONS + NEW_FUNCTIONS:
        op.execute(f"REVOKE EXECUTE ON FUNCTION {function} FROM PUBLIC")
    op.execute(RESERVED_CHECK)


def _revision_0003() -> ModuleType:
    """0003's module, for its functions exactly as they were (one text, not a second copy)."""
    path = Path(__file__).with_name("0003_batch_announcer.py")
    spec = importlib.util.spec_from_file_location("pgpush_migration_0003", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def downgrade() -> None:
    previous = _revision_0003()
    op.execute("ALTER TABLE messages DROP CONSTRAINT messages_event_not_reserved")
    op.execute("ALTER FUNCTION pgpush_assign_seq() SECURITY INVOKER RESET ALL")
    # CREATE OR REPLACE resets SECURITY DEFINER and the SET clause to the new text's (none).
    op.execute(previous.advance_function(handover=True))
    op.execute(previous.ANNOUNCE.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1))
    for function in FUNCTIONS:
        op.execute(f"GRANT EXECUTE ON FUNCTION {function} TO PUBLIC")
    # Replicas of this release listen on the private channel: one last "everyone, re-read" there, sent
    # when this transaction commits, so they catch up once before the channel goes away.
    op.execute("SELECT pg_notify(name, '*') FROM pgpush_channel")
    op.execute("DROP TABLE pgpush_channel")
    op.execute("DROP FUNCTION pgpush_announcer_awake(boolean)")
    op.execute("DROP SEQUENCE pgpush_announcer_awake")

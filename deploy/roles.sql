-- The privileges of pgpush's three roles, after `pgpush migrate` (run it again after every upgrade: each
-- GRANT is idempotent). Run as the owner role, connected to pgpush's database; rename the two roles to
-- yours. Creating them is yours too, e.g. as a superuser:
--   CREATE ROLE pgpush_service LOGIN PASSWORD '…';   -- what `pgpush serve` connects as
--   CREATE ROLE pgpush_writer LOGIN PASSWORD '…';    -- a product backend that writes messages
-- The owner (the role that ran the migrations) owns every object and is the only one that needs, or may
-- have, anything more. The trigger functions run as the owner (SECURITY DEFINER), so nobody else needs
-- any access to message_counters, message_changes, the seq sequence or pgpush_channel's secret, except
-- the service, which must know the channel it listens on.

GRANT USAGE ON SCHEMA public TO pgpush_service, pgpush_writer;

-- The service: streams and replay read messages and counters; POST /messages inserts; the inbox marks
-- rows read (read_at only); retention deletes; the announcer batches notifications.
GRANT SELECT, INSERT, DELETE ON messages TO pgpush_service;
GRANT UPDATE (read_at) ON messages TO pgpush_service;
GRANT SELECT ON message_counters TO pgpush_service;
GRANT SELECT ON pgpush_channel TO pgpush_service;
GRANT EXECUTE ON FUNCTION pgpush_announce(), pgpush_announcer_awake(boolean) TO pgpush_service;

-- A writer: INSERT is enough for its rows to be ordered, announced and delivered.
GRANT INSERT ON messages TO pgpush_writer;
-- Optional: to read its own rows back (INSERT … RETURNING, `pgpush publish` through the table).
-- GRANT SELECT ON messages TO pgpush_writer;

"""How many streams the process's open-files limit leaves room for.

Every stream holds a socket, and so does every database connection. Streams that take the last descriptors
leave the pool, the listener and ordinary requests with none: Postgres becomes unreachable from a process
that otherwise looks healthy (at 20,000 streams under a 20,000-file limit, reads and retention failed with
EMFILE). So the per-process stream cap is lowered, once at startup, to what the limit leaves after a reserve.
"""

from __future__ import annotations

import logging
import os

try:
    import resource
except ImportError:  # pragma: no cover - Windows: no rlimits to respect
    resource = None  # type: ignore[assignment]

log = logging.getLogger("pgpush.descriptors")

# Descriptors kept for everything that is not a stream: REST requests and probes in flight, the listening
# socket, log files, the interpreter's own. Database connections are counted separately by the caller.
RESERVED_FOR_REQUESTS = 128
# Where the hard limit is unlimited: Linux refuses a soft limit above fs.nr_open (2^20 by default).
UNLIMITED_TARGET = 1 << 20


def raise_open_files_limit() -> int | None:
    """Raise the soft RLIMIT_NOFILE to the hard one, as a server should; return the soft limit now in force
    (None where there are no rlimits)."""
    if resource is None:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = UNLIMITED_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-files limit from %d to %d: %s", soft, target, exc)
    return None if soft == resource.RLIM_INFINITY else soft


def open_descriptors() -> int:
    """How many descriptors the process holds now (0 where the platform does not say)."""
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(folder))
        except OSError:
            continue
    return 0


def stream_capacity(max_streams: int, database_connections: int) -> int:
    """`max_streams`, lowered (with a warning) to what the open-files limit leaves for streams once
    `database_connections`, the descriptors already open and RESERVED_FOR_REQUESTS are set aside."""
    limit = raise_open_files_limit()
    if limit is None:
        return max_streams
    room = limit - open_descriptors() - database_connections - RESERVED_FOR_REQUESTS
    if max_streams <= room:
        return max_streams
    capacity = max(room, 1)
    log.warning(
        "PGPUSH_MAX_STREAMS=%d does not fit the open-files limit of %d (%d kept for the database and"
        " requests): this process takes at most %d streams; raise the hard limit (ulimit -Hn) for more",
        max_streams,
        limit,
        limit - room,
        capacity,
    )
    return capacity

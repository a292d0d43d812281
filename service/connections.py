"""Opening Postgres sessions that work directly or through a connection pooler such as PgBouncer.

A pooler in transaction mode hands each transaction to whichever server connection is free, which breaks
three things pgpush would otherwise do:
- asyncpg's statement cache: a named prepared statement lives on one server connection, and the next
  transaction may run on another ("prepared statement … does not exist"); a pooled session needs
  `statement_cache_size=0` (asyncpg then re-parses each statement in the same round trip as its execution);
- LISTEN: it stays behind on a server connection that other clients then borrow, so notifications go to
  whoever holds it, or nowhere; the listener needs a direct session (`PGPUSH_LISTEN_DATABASE_URL`);
- startup parameters: PgBouncer refuses any it does not know (our `tcp_keepalives_*`), unless its
  `ignore_startup_parameters` lists them.
"""

from __future__ import annotations

import logging
from typing import Any

import asyncpg

log = logging.getLogger("pgpush.connections")

# The startup parameters every pooler passes on (PgBouncer tracks application_name itself).
POOLER_SAFE_SETTINGS = frozenset({"application_name"})


async def connect(dsn: str, server_settings: dict[str, str], **kwargs: Any) -> asyncpg.Connection:
    """`asyncpg.connect`; when a pooler refuses a startup parameter, again with only those it accepts.

    The refused ones are server-side TCP keepalives: behind a pooler they would tune the pooler's
    connections to Postgres, which are the pooler's business.
    """
    try:
        return await asyncpg.connect(dsn, server_settings=server_settings, **kwargs)
    except asyncpg.ProtocolViolationError as exc:
        if "unsupported startup parameter" not in str(exc):
            raise
        log.debug("the server refused a startup parameter (%s); connecting without them", exc)
    safe = {name: value for name, value in server_settings.items() if name in POOLER_SAFE_SETTINGS}
    return await asyncpg.connect(dsn, server_settings=safe, **kwargs)


async def behind_pooler(conn: asyncpg.Connection) -> bool:
    """True when the session is not a Postgres backend of its own but a pooler's client session.

    Postgres tells each session its backend's pid in the cancellation key (BackendKeyData); a pooler maps
    one client session onto several backends, so it makes up a key of its own, and the pid in it is not
    the pid of the backend that runs our query.
    """
    return bool(conn.get_server_pid() != await conn.fetchval("SELECT pg_backend_pid()"))


class PoolConnector:
    """`asyncpg.create_pool(connect=…)`: notices a pooler on the first connection, then opens every
    connection without the statement cache (a pooler is either there for all of them or for none)."""

    def __init__(self, server_settings: dict[str, str]) -> None:
        self._server_settings = server_settings
        self.pooled: bool | None = None  # None until a connection has told

    async def __call__(self, dsn: str, **kwargs: Any) -> asyncpg.Connection:
        if self.pooled is not None:
            return await connect(dsn, self._server_settings, **self._cache_options(), **kwargs)
        # The question itself must not leave a named statement behind a pooler: ask without the cache.
        conn = await connect(dsn, self._server_settings, statement_cache_size=0, **kwargs)
        try:
            pooled = await behind_pooler(conn)
        except BaseException:
            conn.terminate()
            raise
        await conn.close()
        if pooled and not self.pooled:
            log.info(
                "DATABASE_URL reaches Postgres through a connection pooler: statements are not cached "
                "(a transaction-mode pooler would lose them between transactions)"
            )
        self.pooled = pooled
        return await connect(dsn, self._server_settings, **self._cache_options(), **kwargs)

    def _cache_options(self) -> dict[str, int]:
        return {"statement_cache_size": 0} if self.pooled else {}

"""Signing keys from an identity provider's JWKS URL: cached, selected by `kid`, refetched on rotation.

pyjwt's `PyJWKClient` fetches and parses the key set (http/https only, no redirects, a timeout); this
module owns the cache around it, because the client's own cache fetches inside the lookup and so would
block the event loop. Here a lookup never does I/O: `key()` reads the cached set, and the async
`refresh()` runs the blocking fetch in a thread, one fetch at a time, at most one per `refetch_interval`.
A token whose `kid` is unknown triggers a refresh (that is how a rotated-in key is picked up), so the
interval is what stops a stream of made-up `kid`s from hammering the provider.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time

from jwt import PyJWK, PyJWKClient, PyJWTError

log = logging.getLogger("pgpush.auth")

FETCH_TIMEOUT_SECONDS = 5.0


class JwksUnavailableError(Exception):
    """The key set could not be fetched (the provider is down or answered something unusable)."""


class JwksCache:
    """The provider's signing keys by `kid`; stale sets keep serving while a fresh one is fetched."""

    def __init__(self, url: str, *, max_age: float, refetch_interval: float) -> None:
        # cache_jwk_set=False: every call we make is a deliberate fetch; the caching is ours.
        self._client = PyJWKClient(url, cache_jwk_set=False, timeout=FETCH_TIMEOUT_SECONDS)
        self.url = url
        self._max_age = max_age
        self.refetch_interval = refetch_interval
        self._keys: dict[str, PyJWK] = {}
        self._fetched_at = -math.inf
        self._attempted_at = -math.inf
        self._last_error: str | None = None
        self._lock = threading.Lock()
        self._inflight: asyncio.Future[None] | None = None
        self.fetches = 0
        # Bumped by every successful fetch: a cache of verified tokens drops its entries when it changes.
        self.generation = 0

    def key(self, kid: str) -> PyJWK | None:
        """The cached key with this `kid`, without any I/O."""
        return self._keys.get(kid)

    @property
    def loaded(self) -> bool:
        return bool(self._keys)

    @property
    def last_error(self) -> str | None:
        return self._last_error

    def may_fetch(self) -> bool:
        """True when the rate limit allows a fetch now."""
        return time.monotonic() - self._attempted_at >= self.refetch_interval

    def is_stale(self) -> bool:
        return time.monotonic() - self._fetched_at >= self._max_age

    def fetch(self) -> None:
        """Fetch the key set now, blocking, unless the rate limit forbids it; keeps the old set on failure."""
        with self._lock:
            if not self.may_fetch():
                return
            self._attempted_at = time.monotonic()
            self.fetches += 1
            try:
                signing_keys = self._client.get_signing_keys(refresh=True)
            # Connection errors, invalid JSON, a set without usable signing keys: keep the old keys.
            except (PyJWTError, ValueError, OSError) as exc:
                self._last_error = str(exc)
                log.warning("fetching the JWKS failed", extra={"jwks_url": self.url, "error": str(exc)})
                return
            # Symmetric keys have no place in a published key set: admitting one would let anyone who
            # can read the set mint tokens.
            keys = {k.key_id: k for k in signing_keys if k.key_id and k.key_type != "oct"}
            self.generation += 1
            self._keys, self._fetched_at, self._last_error = keys, time.monotonic(), None
            log.info("fetched the JWKS", extra={"jwks_url": self.url, "kids": sorted(keys)})

    async def refresh(self) -> None:
        """Fetch in a worker thread (rate limit permitting); concurrent callers share one fetch."""
        inflight = self._inflight
        if inflight is None or inflight.done() or inflight.get_loop() is not asyncio.get_running_loop():
            inflight = self._inflight = asyncio.ensure_future(asyncio.to_thread(self.fetch))
        # shield: a caller that goes away must not cancel the fetch the others are waiting for.
        await asyncio.shield(inflight)

    def refresh_in_background(self) -> None:
        """Start a refresh without waiting for it (stale keys keep serving meanwhile)."""
        if self.may_fetch() and (self._inflight is None or self._inflight.done()):
            self._inflight = asyncio.ensure_future(asyncio.to_thread(self.fetch))

"""The verified-token cache: a hit skips verification, never past `exp`, the cap, a refetch or a changed byte.

The cache reads a clock the tests move (no sleeps, no timed assertions); pyjwt's own checks keep the real one.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import get_default_algorithms
from pgpush.auth import (
    TOKEN_CACHE_SECONDS,
    AuthError,
    TicketSigner,
    TokenVerifier,
    VerifiedTokenCache,
    token_digest,
)
from pgpush.config import Settings

SECRET = "unit-test-secret-that-is-long-enough-for-hs256"


class Clock:
    """A wall clock the test sets."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def verifier_with(clock: Clock, leeway: float = 0, **cache: Any) -> TokenVerifier:
    settings = Settings.model_validate({"jwt_secret": SECRET, "jwt_leeway_seconds": leeway})
    return TokenVerifier(settings, token_cache=VerifiedTokenCache(clock=clock, **cache))


def token(sub: str = "alice", ttl: float = 600, key: Any = SECRET, alg: str = "HS256", **headers: Any) -> str:
    now = int(time.time())
    return jwt.encode({"sub": sub, "iat": now, "exp": now + int(ttl)}, key, algorithm=alg, headers=headers)


def test_a_verified_token_is_served_from_the_cache_without_verifying_again() -> None:
    verifier = verifier_with(Clock())
    text = token()

    first = verifier.verify(text)
    again = [verifier.verify(text) for _ in range(5)]

    assert verifier.verifications == 1
    assert verifier.token_cache.hits == 5
    assert all(p == first for p in again)


async def test_the_async_path_shares_the_cache() -> None:
    verifier = verifier_with(Clock())
    text = token()
    assert (await verifier.verify_async(text)).sub == "alice"
    assert verifier.verify(text).sub == "alice"
    assert (await verifier.verify_async(text)).sub == "alice"
    assert verifier.verifications == 1


def test_the_cache_is_keyed_by_the_tokens_digest_never_the_token() -> None:
    verifier = verifier_with(Clock())
    text = token()
    verifier.verify(text)
    keys = list(verifier.token_cache._entries)
    assert keys == [token_digest(text)]
    assert all(text.encode() not in key and len(key) == 32 for key in keys)


@pytest.mark.parametrize("leeway", [0, 30])
def test_a_cached_token_is_refused_from_its_exp_plus_leeway_on(leeway: float) -> None:
    clock = Clock()
    verifier = verifier_with(clock, leeway=leeway)
    text = token(ttl=20)
    exp = verifier.verify(text).exp

    clock.now = exp + leeway - 0.001
    assert verifier.verify(text).sub == "alice"  # still valid, from the cache
    assert verifier.verifications == 1

    clock.now = exp + leeway  # pyjwt's rule: refused once exp <= now - leeway
    with pytest.raises(AuthError, match="expired"):
        verifier.verify(text)
    assert len(verifier.token_cache) == 0


def test_an_entry_is_verified_afresh_after_the_cap() -> None:
    clock = Clock()
    verifier = verifier_with(clock)
    text = token(ttl=3600)
    verifier.verify(text)

    clock.now += TOKEN_CACHE_SECONDS - 1
    verifier.verify(text)
    assert verifier.verifications == 1

    clock.now += 1
    verifier.verify(text)
    assert verifier.verifications == 2  # re-verified (and cached again)
    verifier.verify(text)
    assert verifier.verifications == 2


def test_a_token_with_one_byte_changed_is_not_served_from_the_cache() -> None:
    verifier = verifier_with(Clock())
    text = token()
    verifier.verify(text)
    header, payload, signature = text.split(".")

    def flipped(part: str) -> str:
        return part[:-2] + ("A" if part[-2] != "A" else "B") + part[-1]

    for tampered in (
        f"{header}.{payload}.{flipped(signature)}",
        f"{header}.{flipped(payload)}.{signature}",
        text + "A",
    ):
        with pytest.raises(AuthError):
            verifier.verify(tampered)
    assert verifier.verifications == 1 + 3
    assert len(verifier.token_cache) == 1


def test_a_flood_of_distinct_tokens_keeps_the_cache_bounded() -> None:
    verifier = verifier_with(Clock(), max_entries=100)
    tokens = [token(sub=f"user{i}") for i in range(1000)]
    for text in tokens:
        verifier.verify(text)
    assert len(verifier.token_cache) == 100

    # The most recently used stayed; the first ones left and are verified again.
    verifier.verify(tokens[-1])
    assert verifier.verifications == 1000
    verifier.verify(tokens[0])
    assert verifier.verifications == 1001
    assert len(verifier.token_cache) == 100


def test_refusals_are_never_cached() -> None:
    verifier = verifier_with(Clock())
    bad = [token(sub=f"user{i}", key="another-secret-that-is-long-enough-too-xx") for i in range(200)]
    for text in bad * 2:
        with pytest.raises(AuthError):
            verifier.verify(text)
    expired = token(ttl=-10)
    for _ in range(2):
        with pytest.raises(AuthError, match="expired"):
            verifier.verify(expired)
    assert len(verifier.token_cache) == 0
    assert verifier.verifications == 402


def test_tickets_are_always_verified() -> None:
    signer = TicketSigner(SECRET, 60)
    verifier = verifier_with(Clock())
    user = verifier.verify(token())
    ticket, _ = signer.issue(user)
    assert signer.verify(ticket).sub == "alice"
    assert len(verifier.token_cache) == 1  # the API token only


# --- a JWKS refetch empties the cache -----------------------------------------------------------------


class JwksServer:
    """A key endpoint on 127.0.0.1 serving `keys`."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = json.dumps({"keys": owner.keys}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/jwks.json"
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    served = JwksServer()
    yield served
    served.close()


async def test_a_key_rotated_out_of_the_jwks_refuses_its_cached_tokens_at_the_next_fetch(
    jwks_server: JwksServer,
) -> None:
    key, new_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())

    def jwk(private_key: Any, kid: str) -> dict[str, Any]:
        public = get_default_algorithms()["ES256"].to_jwk(private_key.public_key(), as_dict=True)
        return {**public, "kid": kid, "alg": "ES256", "use": "sig"}

    jwks_server.keys = [jwk(key, "k1")]
    settings = Settings.model_validate({"jwt_jwks_url": jwks_server.url, "jwt_jwks_refetch_seconds": 0.001})
    verifier = TokenVerifier(settings)
    assert verifier.jwks is not None
    await verifier.prefetch()
    text = token(key=key, alg="ES256", kid="k1")

    assert (await verifier.verify_async(text)).sub == "alice"
    assert (await verifier.verify_async(text)).sub == "alice"
    assert verifier.verifications == 1

    jwks_server.keys = [jwk(new_key, "k2")]
    verifier.jwks.fetch()  # the refetch a stale set or an unknown kid would trigger
    with pytest.raises(AuthError, match="no signing key"):
        await verifier.verify_async(text)
    assert len(verifier.token_cache) == 0

"""Who may open GET /events or publish, against a real server (protocol §3, §4): every 401, every key type,
a JWKS rotated under a running server, and publishers verified apart from subscribers."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import asyncpg
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import get_default_algorithms

from tests.conftest import JWT_SECRET, RunningServer, ServerFactory, make_token
from tests.polling import wait_until
from tests.sse_client import open_stream

BEARER = "Bearer"
# Plain HTTP on loopback: not loading the CA bundle saves ~70 ms per client.
CLIENT_OPTIONS: dict[str, Any] = {"timeout": 10, "verify": False}
INVALID_TOKEN = 'Bearer error="invalid_token"'
OTHER_SECRET = "a-different-secret-that-is-also-long-enough!"


# --- helpers ----------------------------------------------------------------------------------------


async def get_events(
    server: RunningServer,
    token: str | None = None,
    *,
    params: dict[str, str] | None = None,
    cookies: dict[str, str] | None = None,
) -> httpx.Response:
    """GET /events; a 200 stream is closed at once (and awaited gone), anything else read whole."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with (
        httpx.AsyncClient(base_url=server.url, cookies=cookies, **CLIENT_OPTIONS) as client,
        client.stream("GET", "/events", headers=headers, params=params) as response,
    ):
        if response.status_code != 200:
            await response.aread()
    if response.status_code == 200:
        await wait_until(lambda: server.stream_count == 0)
    return response


def assert_refused(response: httpx.Response, challenge: str, case: str) -> None:
    assert response.status_code == 401, f"{case}: {response.status_code} {response.text}"
    assert response.headers["www-authenticate"] == challenge, case
    body = response.json()
    expected_error = "unauthorized" if challenge == BEARER else "invalid_token"
    assert body["error"] == expected_error, case
    assert isinstance(body["detail"], str) and body["detail"], case


def public_pem(private_key: Any) -> str:
    return str(
        private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def signed(private_key: Any, alg: str, sub: str = "alice", *, kid: str | None = None, ttl: int = 600) -> str:
    now = int(time.time())
    headers = {"kid": kid} if kid else None
    return jwt.encode({"sub": sub, "iat": now, "exp": now + ttl}, private_key, algorithm=alg, headers=headers)


def hs256_signed_with(raw_key: bytes, claims: dict[str, Any]) -> str:
    """An HS256 token keyed with any bytes (pyjwt itself refuses a PEM as an HMAC secret)."""
    header = jwt.utils.base64url_encode(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = jwt.utils.base64url_encode(json.dumps(claims).encode())
    signature = hmac.new(raw_key, header + b"." + payload, hashlib.sha256).digest()
    return (header + b"." + payload + b"." + jwt.utils.base64url_encode(signature)).decode()


def jwk(private_key: Any, kid: str, alg: str) -> dict[str, Any]:
    public: dict[str, Any] = get_default_algorithms()[alg].to_jwk(private_key.public_key(), as_dict=True)
    return {**public, "kid": kid, "alg": alg, "use": "sig"}


class JwksServer:
    """An identity provider's key endpoint on 127.0.0.1: serves `keys`, counts fetches."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.fetches = 0
        # Cleared, it holds every fetch until set: a provider slow for exactly as long as a test needs.
        self.release = threading.Event()
        self.release.set()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.fetches += 1
                owner.release.wait(60)
                body = json.dumps({"keys": owner.keys}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/.well-known/jwks.json"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    served = JwksServer()
    yield served
    served.close()


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


# --- the 401s of protocol §3 --------------------------------------------------------------------------------


async def test_every_refused_credential_gets_its_401_challenge_and_a_json_body(
    start_server: ServerFactory, rsa_key: rsa.RSAPrivateKey
) -> None:
    server = await start_server(
        jwt_audience="pgpush", jwt_issuer="https://idp.example", jwt_leeway_seconds=30
    )
    now = int(time.time())
    claims = {"aud": "pgpush", "iss": "https://idp.example"}
    good = make_token("alice", **claims)
    header, _, signature = good.split(".")
    unsigned = jwt.encode({"sub": "alice", "exp": now + 600, **claims}, None, algorithm="none")
    hs256_with_pem = hs256_signed_with(
        public_pem(rsa_key).encode(), {"sub": "alice", "exp": now + 600, **claims}
    )

    assert_refused(await get_events(server), BEARER, "no credentials")
    cases = {
        "expired beyond the leeway": make_token("alice", ttl=-60, **claims),
        "signed with another secret": make_token("alice", secret=OTHER_SECRET, **claims),
        "garbage": "not-a-token",
        "three garbage segments": "abc.def.ghi",
        "truncated": good[:-10],
        "payload swapped": f"{header}.{make_token('bob', **claims).split('.')[1]}.{signature}",
        "wrong audience": make_token("alice", aud="someone-else", iss="https://idp.example"),
        "no audience": make_token("alice", iss="https://idp.example"),
        "wrong issuer": make_token("alice", aud="pgpush", iss="https://evil.example"),
        "alg none": unsigned,
        "HS256 keyed with the RSA public key PEM": hs256_with_pem,
        "nbf beyond the leeway": make_token("alice", nbf=now + 120, **claims),
        "no sub": jwt.encode({"exp": now + 600, **claims}, JWT_SECRET, algorithm="HS256"),
        "sub over 256 characters": make_token("x" * 257, **claims),
        "no exp": jwt.encode({"sub": "alice", **claims}, JWT_SECRET, algorithm="HS256"),
    }
    for case, token in cases.items():
        assert_refused(await get_events(server, token), INVALID_TOKEN, case)
        assert_refused(await get_events(server, params={"access_token": token}), INVALID_TOKEN, case)
    assert (await get_events(server, good)).status_code == 200


async def test_leeway_admits_tokens_a_little_past_exp_or_before_nbf(start_server: ServerFactory) -> None:
    server = await start_server(jwt_leeway_seconds=30)
    now = int(time.time())
    assert (await get_events(server, make_token("alice", ttl=-10))).status_code == 200
    assert (await get_events(server, make_token("alice", nbf=now + 10))).status_code == 200
    assert_refused(await get_events(server, make_token("alice", ttl=-40)), INVALID_TOKEN, "exp - 40 s")
    strict = await start_server(jwt_leeway_seconds=0)
    assert_refused(await get_events(strict, make_token("alice", ttl=-10)), INVALID_TOKEN, "no leeway")


async def test_the_first_credential_found_wins_header_cookie_ticket_access_token(
    server: RunningServer,
) -> None:
    good, bad = make_token("alice"), "garbage"
    async with httpx.AsyncClient(base_url=server.url, **CLIENT_OPTIONS) as client:
        response = await client.post("/events/ticket", headers={"Authorization": f"Bearer {good}"})
    ticket = response.json()["ticket"]
    places: list[tuple[str, str]] = [
        ("header", good),
        ("cookie", good),
        ("ticket", ticket),
        ("access_token", good),
    ]

    async def attempt(credentials: dict[str, str]) -> httpx.Response:
        params = {k: v for k, v in credentials.items() if k in ("ticket", "access_token")}
        cookies = {"pgpush_token": credentials["cookie"]} if "cookie" in credentials else None
        return await get_events(server, credentials.get("header"), params=params, cookies=cookies)

    for i, (higher, valid_higher) in enumerate(places):
        for lower, valid_lower in places[i + 1 :]:
            alone = await attempt({higher: valid_higher})
            assert alone.status_code == 200, f"{higher} alone"
            bad_first = await attempt({higher: bad, lower: valid_lower})
            assert_refused(bad_first, INVALID_TOKEN, f"a bad {higher} is not skipped for a good {lower}")
            good_first = await attempt({higher: valid_higher, lower: bad})
            assert good_first.status_code == 200, f"a good {higher} wins over a bad {lower}"


# --- public keys --------------------------------------------------------------------------------------


async def test_rs256_tokens_verify_with_a_pem_public_key(
    start_server: ServerFactory, rsa_key: rsa.RSAPrivateKey
) -> None:
    server = await start_server(jwt_secret=None, jwt_public_key=public_pem(rsa_key))
    assert (await get_events(server, signed(rsa_key, "RS256"))).status_code == 200
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert_refused(await get_events(server, signed(other, "RS256")), INVALID_TOKEN, "another RSA key")
    assert_refused(await get_events(server, make_token("alice")), INVALID_TOKEN, "an HS256 token")


async def test_es256_and_eddsa_tokens_verify_with_their_pem_keys(start_server: ServerFactory) -> None:
    es_key = ec.generate_private_key(ec.SECP256R1())
    ed_key = ed25519.Ed25519PrivateKey.generate()
    es_server = await start_server(jwt_secret=None, jwt_public_key=public_pem(es_key))
    ed_server = await start_server(jwt_secret=None, jwt_public_key=public_pem(ed_key))
    assert (await get_events(es_server, signed(es_key, "ES256"))).status_code == 200
    assert (await get_events(ed_server, signed(ed_key, "EdDSA"))).status_code == 200
    assert_refused(await get_events(es_server, signed(ed_key, "EdDSA")), INVALID_TOKEN, "EdDSA on EC")
    assert_refused(await get_events(ed_server, signed(es_key, "ES256")), INVALID_TOKEN, "ES256 on Ed25519")


# --- JWKS ---------------------------------------------------------------------------------------------


async def test_a_jwks_rotation_is_picked_up_once_the_refetch_interval_allows(
    start_server: ServerFactory, jwks_server: JwksServer, rsa_key: rsa.RSAPrivateKey
) -> None:
    interval = 2.0
    es_key, ed_key = ec.generate_private_key(ec.SECP256R1()), ed25519.Ed25519PrivateKey.generate()
    jwks_server.keys = [
        jwk(es_key, "k1", "ES256"),
        {
            "kty": "oct",
            "k": jwt.utils.base64url_encode(OTHER_SECRET.encode()).decode(),
            "kid": "hs",
            "alg": "HS256",
        },
    ]
    server = await start_server(
        jwt_secret=None, jwt_jwks_url=jwks_server.url, jwt_jwks_refetch_seconds=interval
    )
    assert jwks_server.fetches == 0  # fetched when first needed, off the event loop

    assert (await get_events(server, signed(es_key, "ES256", kid="k1"))).status_code == 200
    assert (await get_events(server, signed(es_key, "ES256", kid="k1", sub="bob"))).status_code == 200
    assert jwks_server.fetches == 1
    symmetric = jwt.encode(
        {"sub": "alice", "exp": int(time.time()) + 60}, OTHER_SECRET, algorithm="HS256", headers={"kid": "hs"}
    )
    assert_refused(await get_events(server, symmetric), INVALID_TOKEN, "a symmetric key from the JWKS")
    wrong_family = signed(rsa_key, "RS256", kid="k1")
    assert_refused(await get_events(server, wrong_family), INVALID_TOKEN, "RS256 with an EC key's kid")

    # The provider rotates: k1 out, k2 (Ed25519) in. The new kid works once the interval allows one fetch;
    # the attempts before that are refused without asking the provider.
    jwks_server.keys = [jwk(ed_key, "k2", "EdDSA")]
    await accepted_eventually(server, signed(ed_key, "EdDSA", kid="k2"))
    assert jwks_server.fetches == 2
    assert_refused(await get_events(server, signed(es_key, "ES256", kid="k1")), INVALID_TOKEN, "rotated out")

    jwks_server.keys.append(jwk(rsa_key, "k3", "RS256"))
    await accepted_eventually(server, signed(rsa_key, "RS256", kid="k3"))
    assert jwks_server.fetches == 3


async def accepted_eventually(server: RunningServer, token: str) -> None:
    """Open a stream with `token` every 0.2 s until it is accepted (each refusal a clean 401)."""

    async def accepted() -> bool:
        response = await get_events(server, token)
        if response.status_code != 200:
            assert_refused(response, INVALID_TOKEN, "a kid not fetched yet")
        return response.status_code == 200

    await wait_until(accepted, interval=0.2, what="the new key was fetched")


async def test_unknown_kids_do_not_make_the_server_ask_the_provider_again_within_the_interval(
    start_server: ServerFactory, jwks_server: JwksServer
) -> None:
    es_key, ed_key = ec.generate_private_key(ec.SECP256R1()), ed25519.Ed25519PrivateKey.generate()
    jwks_server.keys = [jwk(es_key, "k1", "ES256")]
    # An interval no run of this test comes near: every request below falls inside it.
    server = await start_server(jwt_secret=None, jwt_jwks_url=jwks_server.url, jwt_jwks_refetch_seconds=3600)
    assert (await get_events(server, signed(es_key, "ES256", kid="k1"))).status_code == 200
    assert jwks_server.fetches == 1
    for n in range(5):  # made-up kids right after a fetch: refused without asking the provider again
        made_up = signed(ed_key, "EdDSA", kid=f"nope-{n}")
        assert_refused(await get_events(server, made_up), INVALID_TOKEN, "an unknown kid")
    assert jwks_server.fetches == 1


async def test_a_stale_jwks_keeps_serving_while_it_is_refreshed_in_the_background(
    start_server: ServerFactory, jwks_server: JwksServer
) -> None:
    es_key = ec.generate_private_key(ec.SECP256R1())
    jwks_server.keys = [jwk(es_key, "k1", "ES256")]
    server = await start_server(
        jwt_secret=None, jwt_jwks_url=jwks_server.url, jwt_jwks_cache_seconds=0.5, jwt_jwks_refetch_seconds=0
    )
    assert (await get_events(server, signed(es_key, "ES256", kid="k1"))).status_code == 200
    assert jwks_server.fetches == 1
    jwks_server.keys = []  # a broken refresh must not wipe the keys that work

    async def served_while_refreshing() -> bool:
        assert (await get_events(server, signed(es_key, "ES256", kid="k1"))).status_code == 200
        # The cache went stale and refreshed in the background (more than once on a slow machine: it is
        # stale again 0.5 s later).
        return jwks_server.fetches >= 2

    await wait_until(served_while_refreshing, interval=0.1, what="a background refresh")
    assert (await get_events(server, signed(es_key, "ES256", kid="k1"))).status_code == 200


async def test_a_slow_jwks_fetch_does_not_block_the_server(
    start_server: ServerFactory, jwks_server: JwksServer
) -> None:
    es_key = ec.generate_private_key(ec.SECP256R1())
    jwks_server.keys = [jwk(es_key, "k1", "ES256")]
    jwks_server.release.clear()  # the provider hangs until the test lets it answer
    server = await start_server(jwt_secret=None, jwt_jwks_url=jwks_server.url)
    waiting = asyncio.create_task(get_events(server, signed(es_key, "ES256", kid="k1")))
    try:
        await wait_until(lambda: jwks_server.fetches == 1, what="the JWKS fetch started")
        async with httpx.AsyncClient(base_url=server.url, **CLIENT_OPTIONS) as client:
            assert (await client.get("/healthz")).status_code == 200
        assert not waiting.done(), "the stream request was answered before the JWKS fetch finished"
    finally:
        jwks_server.release.set()
    assert (await asyncio.wait_for(waiting, 30)).status_code == 200


async def test_an_unreachable_jwks_is_a_503_with_retry_after(start_server: ServerFactory) -> None:
    unreachable = JwksServer()
    unreachable.close()  # the port is now closed: connections are refused
    server = await start_server(jwt_secret=None, jwt_jwks_url=unreachable.url, jwt_jwks_refetch_seconds=5)
    es_key = ec.generate_private_key(ec.SECP256R1())
    response = await get_events(server, signed(es_key, "ES256", kid="k1"))
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert response.json()["error"] == "auth_unavailable"


# --- publishers ---------------------------------------------------------------------------------------


async def publish_as(server: RunningServer, token: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = {"recipients": ["alice"], "event": "lead", "data": {"company": "ACME"}}
    async with httpx.AsyncClient(base_url=server.url, **CLIENT_OPTIONS) as client:
        return await client.post("/messages", headers=headers, json=body)


async def test_publishers_need_the_publish_scope(server: RunningServer) -> None:
    allowed = await publish_as(server, make_token("backend", scope="read messages:publish"))
    assert allowed.status_code == 201, allowed.text
    listed = await publish_as(server, make_token("backend", scp=["messages:publish"]))
    assert listed.status_code == 201, listed.text
    forbidden = await publish_as(server, make_token("alice", scope="read"))
    assert forbidden.status_code == 403
    assert forbidden.json()["error"] == "forbidden"
    assert "messages:publish" in forbidden.json()["detail"]
    assert (
        forbidden.headers["www-authenticate"] == 'Bearer error="insufficient_scope", scope="messages:publish"'
    )
    assert_refused(await publish_as(server, None), BEARER, "no token")


async def test_publisher_tokens_come_from_their_own_configuration(
    start_server: ServerFactory, rsa_key: rsa.RSAPrivateKey
) -> None:
    server = await start_server(
        publisher_jwt_public_key=public_pem(rsa_key), publisher_jwt_issuer="https://backend.example"
    )
    now = int(time.time())
    publisher_claims = {"sub": "backend", "exp": now + 600, "iss": "https://backend.example"}
    publisher = jwt.encode({**publisher_claims, "scope": "messages:publish"}, rsa_key, algorithm="RS256")
    assert (await publish_as(server, publisher)).status_code == 201
    # A subscriber token, even one with the scope, is not a publisher token here...
    subscriber_with_scope = make_token("alice", scope="messages:publish", iss="https://backend.example")
    assert_refused(await publish_as(server, subscriber_with_scope), INVALID_TOKEN, "subscriber key")
    no_issuer = jwt.encode({**publisher_claims, "iss": "https://idp.example"}, rsa_key, algorithm="RS256")
    assert_refused(await publish_as(server, no_issuer), INVALID_TOKEN, "publisher issuer")
    # ...and a publisher token does not open streams, which use the subscriber configuration.
    assert_refused(await get_events(server, publisher), INVALID_TOKEN, "publisher token on /events")
    assert (await get_events(server, make_token("alice"))).status_code == 200


# --- whose rows a stream carries ----------------------------------------------------------------------


async def assert_each_stream_carries_only_its_subs_rows(
    server: RunningServer, db: asyncpg.Connection, tokens: dict[str, str]
) -> None:
    """Open a stream per sub; rows for all of them and for a stranger interleave in one statement, then a
    last row per sub marks the end: each stream holds exactly its sub's rows, in order (no quiet window)."""
    streams = {sub: await open_stream(server.url, token) for sub, token in tokens.items()}
    try:
        await wait_until(lambda: server.stream_count == len(tokens))
        subs = [*tokens, "stranger"]
        rows = [(sub, n) for n in range(3) for sub in subs]
        await db.execute(
            "INSERT INTO messages (recipient, data) SELECT r, to_jsonb(n) FROM unnest($1::text[], $2::int[]) "
            "AS t(r, n)",
            [r for r, _ in rows],
            [n for _, n in rows],
        )
        await db.executemany(
            "INSERT INTO messages (recipient, data) VALUES ($1, '\"end\"')", [(s,) for s in subs]
        )
        for sub, stream in streams.items():
            events = await stream.messages(4, timeout=30)
            assert [e.data for e in events] == ["0", "1", "2", '"end"'], sub
    finally:
        for stream in streams.values():
            await stream.close()


async def test_streams_opened_with_pem_key_tokens_carry_their_own_subs_rows_only(
    start_server: ServerFactory, db: asyncpg.Connection, rsa_key: rsa.RSAPrivateKey
) -> None:
    es_key, ed_key = ec.generate_private_key(ec.SECP256R1()), ed25519.Ed25519PrivateKey.generate()
    for key, alg in ((rsa_key, "RS256"), (es_key, "ES256"), (ed_key, "EdDSA")):
        server = await start_server(jwt_secret=None, jwt_public_key=public_pem(key))
        tokens = {sub: signed(key, alg, sub=sub) for sub in (f"{alg}-alice", f"{alg}-bob")}
        await assert_each_stream_carries_only_its_subs_rows(server, db, tokens)


async def test_streams_opened_with_jwks_tokens_carry_their_own_subs_rows_only(
    start_server: ServerFactory,
    db: asyncpg.Connection,
    jwks_server: JwksServer,
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    es_key, ed_key = ec.generate_private_key(ec.SECP256R1()), ed25519.Ed25519PrivateKey.generate()
    keys = {"rs": (rsa_key, "RS256"), "es": (es_key, "ES256"), "ed": (ed_key, "EdDSA")}
    jwks_server.keys = [jwk(key, kid, alg) for kid, (key, alg) in keys.items()]
    server = await start_server(jwt_secret=None, jwt_jwks_url=jwks_server.url)
    tokens = {f"{kid}-user": signed(key, alg, sub=f"{kid}-user", kid=kid) for kid, (key, alg) in keys.items()}
    await assert_each_stream_carries_only_its_subs_rows(server, db, tokens)


async def test_a_new_stream_is_refused_503_shutting_down_while_the_server_drains(
    start_server: ServerFactory, jwks_server: JwksServer
) -> None:
    """A request already inside the server when SIGTERM comes reaches the stream code after the drain began.

    The held JWKS fetch is the synchronisation point: the request waits in authentication while the
    server starts draining, and is let through only once the drain has visibly begun.
    """
    es_key = ec.generate_private_key(ec.SECP256R1())
    jwks_server.keys = [jwk(es_key, "k1", "ES256")]
    server = await start_server(jwt_secret=None, jwt_jwks_url=jwks_server.url, jwt_jwks_refetch_seconds=0)
    # A stream opened before the drain: its goodbye shows the drain has begun.
    bob = await open_stream(server.url, signed(es_key, "ES256", sub="bob", kid="k1"))
    # A token with a kid the server has not fetched yet: its request waits for a fetch, held until released.
    jwks_server.keys.append(jwk(es_key, "k2", "ES256"))
    jwks_server.release.clear()
    fetched = jwks_server.fetches
    headers = {"Authorization": f"Bearer {signed(es_key, 'ES256', kid='k2')}"}
    async with httpx.AsyncClient(base_url=server.url, **CLIENT_OPTIONS) as client:
        late = asyncio.create_task(client.get("/events", headers=headers))
        try:
            await wait_until(lambda: jwks_server.fetches > fetched, what="the request waits for the keys")
            await asyncio.to_thread(server.drain)
            await asyncio.wait_for(bob.closed.wait(), 30)
        finally:
            jwks_server.release.set()
        response = await asyncio.wait_for(late, 30)
    await bob.close()
    assert response.status_code == 503, response.text
    assert response.json()["error"] == "shutting_down"
    assert response.headers["retry-after"].isdigit()
    assert server.metric("pgpush_streams_rejected_total", reason="shutting_down") == 1

"""A token an identity provider issued for another application does not open pgpush.

With a public key or JWKS (the provider's, which signs tokens for every application it serves) and no
PGPUSH_JWT_AUDIENCE, 0.3.0 accepted any `aud`. `pgpush serve` now refuses to start that way unless
PGPUSH_JWT_AUDIENCE_OPTIONAL=true says so; with an audience, the other application's token is refused.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.serve_process import ServerProcess

PROVIDER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PROVIDER_PUBLIC_PEM = (
    PROVIDER_KEY.public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    .decode()
)


def provider_token(sub: str, **claims: Any) -> str:
    """A token as the shared identity provider issues it, for whichever application `aud` names."""
    now = int(time.time())
    return jwt.encode({"sub": sub, "iat": now, "exp": now + 600, **claims}, PROVIDER_KEY, algorithm="RS256")


async def refused_start(**settings: str) -> str:
    """Run `pgpush serve` with these settings (the caller's PGPUSH_* stripped); its stderr once it exits 1."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGPUSH_") and k != "DATABASE_URL"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pgpush",
        "serve",
        "--port",
        "0",
        env=env | settings,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    except TimeoutError:
        raise AssertionError(f"pgpush serve started with {sorted(settings)} instead of refusing") from None
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 1, err.decode()
    return err.decode()


@pytest.mark.timeout(120)
async def test_a_provider_key_without_an_audience_is_refused_at_start(database_url: str) -> None:
    base = {"DATABASE_URL": database_url}
    for missing in (
        {"PGPUSH_JWT_PUBLIC_KEY": PROVIDER_PUBLIC_PEM},
        {"PGPUSH_JWT_JWKS_URL": "https://login.example/.well-known/jwks.json"},
    ):
        err = await refused_start(**base, **missing, PGPUSH_TICKET_SECRET="t" * 32)
        assert "PGPUSH_JWT_AUDIENCE" in err and "PGPUSH_JWT_AUDIENCE_OPTIONAL=true" in err, err
        assert err.count("\n") == 1 and err.startswith("pgpush serve: "), err
    # Publishers with their own provider need their own audience (or the subscribers' one to fall back on).
    err = await refused_start(
        **base,
        PGPUSH_JWT_SECRET="s" * 40,
        PGPUSH_PUBLISHER_JWT_PUBLIC_KEY=PROVIDER_PUBLIC_PEM,
    )
    assert "PGPUSH_PUBLISHER_JWT_AUDIENCE" in err, err


@pytest.mark.timeout(120)
async def test_with_an_audience_another_applications_token_is_refused(database_url: str) -> None:
    server = ServerProcess(database_url, jwt_public_key=PROVIDER_PUBLIC_PEM, jwt_audience="pgpush")
    try:
        await server.ready()
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            for token, status in (
                (provider_token("alice", aud="billing-app"), 401),  # the attack: a token for another app
                (provider_token("alice"), 401),  # no audience at all
                (provider_token("alice", aud="pgpush"), 200),
            ):
                answer = await client.get("/me/messages", headers={"Authorization": f"Bearer {token}"})
                assert answer.status_code == status, answer.text
    finally:
        assert await server.stop() == 0


@pytest.mark.timeout(120)
async def test_audience_optional_says_explicitly_that_any_audience_is_accepted(database_url: str) -> None:
    server = ServerProcess(database_url, jwt_public_key=PROVIDER_PUBLIC_PEM, jwt_audience_optional="true")
    try:
        await server.ready()
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            other = provider_token("alice", aud="billing-app")
            answer = await client.get("/me/messages", headers={"Authorization": f"Bearer {other}"})
        assert answer.status_code == 200, answer.text
    finally:
        assert await server.stop() == 0

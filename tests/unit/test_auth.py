"""Token and ticket verification without a server: key families, claims, publishers, tickets."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from pgpush.auth import (
    TICKET_AUDIENCE,
    TICKET_TYPE,
    AuthError,
    Principal,
    TicketSigner,
    TokenVerifier,
    derive_ticket_key,
    mint_token,
)
from pgpush.config import Settings
from pydantic import ValidationError

SECRET = "unit-test-secret-that-is-long-enough-for-hs256"
OTHER_SECRET = "another-unit-test-secret-long-enough-for-hs256"


def settings(**values: Any) -> Settings:
    return Settings.model_validate(values)


def pem(private_key: Any) -> str:
    return str(
        private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def token(key: Any, alg: str, sub: str = "alice", ttl: float = 600, **claims: Any) -> str:
    now = time.time()
    return jwt.encode({"sub": sub, "iat": int(now), "exp": int(now + ttl), **claims}, key, algorithm=alg)


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def refusal(verifier: TokenVerifier, text: str) -> str:
    with pytest.raises(AuthError) as caught:
        verifier.verify(text)
    assert not caught.value.missing
    return caught.value.detail


# --- shared secret --------------------------------------------------------------------------------


def test_a_secret_verifies_hs256_and_reads_sub_exp_and_scopes() -> None:
    verifier = TokenVerifier(settings(jwt_secret=SECRET))
    user = verifier.verify(token(SECRET, "HS256", scope="messages:publish other", scp=["x"]))
    assert user.sub == "alice"
    assert user.exp > time.time()
    assert user.scopes == {"messages:publish", "other", "x"}
    assert user.can_publish


def test_hs384_and_hs512_verify_only_when_allowed() -> None:
    secret = SECRET * 2  # RFC 7518 §3.2: a key at least as long as the hash
    default = TokenVerifier(settings(jwt_secret=secret))
    assert "not allowed" in refusal(default, token(secret, "HS512"))
    widened = TokenVerifier(settings(jwt_secret=secret, jwt_algorithms="HS256,HS384 HS512"))
    assert widened.verify(token(secret, "HS384")).sub == "alice"
    assert widened.verify(token(secret, "HS512")).sub == "alice"


def test_mint_token_output_verifies() -> None:
    verifier = TokenVerifier(settings(jwt_secret=SECRET))
    user = verifier.verify(mint_token(SECRET, "bob", ttl_seconds=60, scopes=("messages:publish",)))
    assert (user.sub, user.can_publish) == ("bob", True)


@pytest.mark.parametrize(
    ("claims", "detail"),
    [
        ({"exp": None}, "no 'exp' claim"),
        ({"sub": None}, "no 'sub' claim"),
        ({"sub": "x" * 257}, "1 to 256 characters"),
        ({"sub": ""}, "1 to 256 characters"),
        ({"sub": "al\nice"}, "control characters"),
        ({"exp": int(time.time()) - 3600}, "expired"),
        ({"nbf": int(time.time()) + 3600}, "not valid yet"),
        ({"iat": int(time.time()) + 3600}, "not valid yet"),
    ],
)
def test_claims_that_are_refused(claims: dict[str, Any], detail: str) -> None:
    verifier = TokenVerifier(settings(jwt_secret=SECRET))
    payload = {"sub": "alice", "exp": int(time.time()) + 600, **claims}
    payload = {k: v for k, v in payload.items() if v is not None}
    assert detail in refusal(verifier, jwt.encode(payload, SECRET, algorithm="HS256"))


def test_a_subject_of_256_characters_is_accepted() -> None:
    verifier = TokenVerifier(settings(jwt_secret=SECRET))
    assert verifier.verify(token(SECRET, "HS256", sub="x" * 256)).sub == "x" * 256


def test_leeway_admits_small_clock_skew_only() -> None:
    verifier = TokenVerifier(settings(jwt_secret=SECRET, jwt_leeway_seconds=30))
    assert verifier.verify(token(SECRET, "HS256", ttl=-10)).sub == "alice"
    assert verifier.verify(token(SECRET, "HS256", nbf=int(time.time()) + 10)).sub == "alice"
    assert "expired" in refusal(verifier, token(SECRET, "HS256", ttl=-60))
    assert "not valid yet" in refusal(verifier, token(SECRET, "HS256", nbf=int(time.time()) + 60))


def test_audience_and_issuer_are_checked_only_when_configured() -> None:
    loose = TokenVerifier(settings(jwt_secret=SECRET))
    assert loose.verify(token(SECRET, "HS256", aud="anything", iss="anyone")).sub == "alice"
    strict = TokenVerifier(settings(jwt_secret=SECRET, jwt_audience="pgpush", jwt_issuer="https://idp"))
    assert strict.verify(token(SECRET, "HS256", aud="pgpush", iss="https://idp")).sub == "alice"
    assert strict.verify(token(SECRET, "HS256", aud=["other", "pgpush"], iss="https://idp")).sub == "alice"
    assert "another audience" in refusal(strict, token(SECRET, "HS256", aud="other", iss="https://idp"))
    assert "another issuer" in refusal(strict, token(SECRET, "HS256", aud="pgpush", iss="https://evil"))
    assert "no 'aud' claim" in refusal(strict, token(SECRET, "HS256", iss="https://idp"))
    assert "no 'iss' claim" in refusal(strict, token(SECRET, "HS256", aud="pgpush"))


def test_alg_none_and_garbage_are_refused() -> None:
    verifier = TokenVerifier(settings(jwt_secret=SECRET))
    unsigned = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, None, algorithm="none")
    assert "not allowed" in refusal(verifier, unsigned)
    good = token(SECRET, "HS256")
    for bad in ("garbage", "a.b.c", good[:-5], good + "x", good.replace(".", ". ", 1), ""):
        refusal(verifier, bad)
    assert "signature" in refusal(verifier, token(OTHER_SECRET, "HS256"))


def test_none_can_never_be_configured() -> None:
    with pytest.raises(ValidationError, match="none"):
        settings(jwt_secret=SECRET, jwt_algorithms="HS256,none")
    with pytest.raises(ValueError, match="unknown algorithms"):
        TokenVerifier(settings(jwt_secret=SECRET, jwt_algorithms="HS256,RS999"))


# --- public keys ------------------------------------------------------------------------------------


def test_rs256_ps256_verify_with_a_pem_key_by_default(rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = TokenVerifier(settings(jwt_public_key=pem(rsa_key)))
    assert verifier.verify(token(rsa_key, "RS256")).sub == "alice"
    assert verifier.verify(token(rsa_key, "PS512")).sub == "alice"


def hs256_signed_with(raw_key: bytes, claims: dict[str, Any]) -> str:
    """An HS256 token keyed with any bytes (pyjwt itself refuses a PEM as an HMAC secret)."""
    header = jwt.utils.base64url_encode(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = jwt.utils.base64url_encode(json.dumps(claims).encode())
    signature = hmac.new(raw_key, header + b"." + payload, hashlib.sha256).digest()
    return (header + b"." + payload + b"." + jwt.utils.base64url_encode(signature)).decode()


def test_hs256_signed_with_the_public_pem_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    public_pem = pem(rsa_key)
    forged = hs256_signed_with(public_pem.encode(), {"sub": "alice", "exp": int(time.time()) + 60})
    only_public = TokenVerifier(settings(jwt_public_key=public_pem))
    assert "not allowed" in refusal(only_public, forged)
    # Even with HS256 explicitly listed, the public key never serves as an HMAC secret.
    listed = TokenVerifier(settings(jwt_public_key=public_pem, jwt_algorithms="HS256,RS256"))
    assert "not allowed" in refusal(listed, forged)


def test_ec_keys_verify_only_the_algorithm_of_their_curve() -> None:
    p256 = ec.generate_private_key(ec.SECP256R1())
    verifier = TokenVerifier(settings(jwt_public_key=pem(p256)))
    assert verifier.verify(token(p256, "ES256")).sub == "alice"
    p384 = ec.generate_private_key(ec.SECP384R1())
    assert "not allowed" in refusal(verifier, token(p384, "ES384"))
    # Listing ES384 does not make a P-256 key verify it.
    listed = TokenVerifier(settings(jwt_public_key=pem(p256), jwt_algorithms="ES256,ES384"))
    assert "not allowed" in refusal(listed, token(p384, "ES384"))


def test_eddsa_verifies_with_an_ed25519_pem() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    verifier = TokenVerifier(settings(jwt_public_key=pem(key)))
    assert verifier.verify(token(key, "EdDSA")).sub == "alice"
    assert "not allowed" in refusal(verifier, token(SECRET, "HS256"))


def test_an_algorithm_list_without_the_keys_family_is_a_configuration_error(
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    with pytest.raises(ValueError, match="admits no algorithm"):
        TokenVerifier(settings(jwt_public_key=pem(rsa_key), jwt_algorithms="ES256"))
    narrowed = TokenVerifier(settings(jwt_public_key=pem(rsa_key), jwt_algorithms="RS256"))
    assert "not allowed" in refusal(narrowed, token(rsa_key, "PS256"))


def test_the_public_key_may_be_a_path_a_certificate_or_one_line_with_escaped_newlines(
    rsa_key: rsa.RSAPrivateKey, tmp_path: Path
) -> None:
    path = tmp_path / "key.pem"
    path.write_text(pem(rsa_key))
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(rsa_key.public_key())
        .serial_number(1)
        .not_valid_before(datetime(2020, 1, 1))
        .not_valid_after(datetime(2040, 1, 1))
        .sign(rsa_key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    for source in (str(path), cert_pem, pem(rsa_key).strip().replace("\n", "\\n")):
        verifier = TokenVerifier(settings(jwt_public_key=source))
        assert verifier.verify(token(rsa_key, "RS256")).sub == "alice"


def test_secret_and_public_key_each_verify_their_own_family(rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = TokenVerifier(settings(jwt_secret=SECRET, jwt_public_key=pem(rsa_key)))
    assert verifier.verify(token(SECRET, "HS256")).sub == "alice"
    assert verifier.verify(token(rsa_key, "RS256")).sub == "alice"


def test_a_jwks_token_needs_a_kid_and_an_unknown_kid_is_refused_without_io() -> None:
    verifier = TokenVerifier(settings(jwt_jwks_url="http://127.0.0.1:9/jwks.json"))
    key = ec.generate_private_key(ec.SECP256R1())
    assert "'kid'" in refusal(verifier, token(key, "ES256"))
    with_kid = jwt.encode(
        {"sub": "alice", "exp": int(time.time()) + 60}, key, algorithm="ES256", headers={"kid": "k1"}
    )
    assert "no signing key" in refusal(verifier, with_kid)
    assert verifier.jwks is not None and verifier.jwks.fetches == 0


# --- publishers ---------------------------------------------------------------------------------------


def test_publishers_share_the_subscriber_configuration_unless_their_own_is_set() -> None:
    shared = TokenVerifier(settings(jwt_secret=SECRET))
    assert shared.publishers is shared
    separate = TokenVerifier(
        settings(jwt_secret=SECRET, publisher_jwt_secret=OTHER_SECRET, publisher_jwt_issuer="backend")
    )
    publisher_token = token(OTHER_SECRET, "HS256", iss="backend", scope="messages:publish")
    assert separate.publishers.verify(publisher_token).can_publish
    assert "signature" in refusal(separate, publisher_token)
    assert "signature" in refusal(separate.publishers, token(SECRET, "HS256", iss="backend"))
    assert "no 'iss' claim" in refusal(separate.publishers, token(OTHER_SECRET, "HS256"))


def test_a_publisher_audience_alone_keeps_the_subscriber_keys() -> None:
    verifier = TokenVerifier(settings(jwt_secret=SECRET, publisher_jwt_audience="publish-api"))
    assert verifier.publishers is not verifier
    assert verifier.publishers.verify(token(SECRET, "HS256", aud="publish-api")).sub == "alice"
    assert "another audience" in refusal(verifier.publishers, token(SECRET, "HS256", aud="web"))
    assert verifier.verify(token(SECRET, "HS256", aud="web")).sub == "alice"


def test_new_secrets_must_be_long_enough() -> None:
    with pytest.raises(ValidationError, match="PGPUSH_TICKET_SECRET"):
        settings(jwt_secret=SECRET, ticket_secret="short")
    with pytest.raises(ValidationError, match="PGPUSH_PUBLISHER_JWT_SECRET"):
        settings(jwt_secret=SECRET, publisher_jwt_secret="short")


# --- tickets -------------------------------------------------------------------------------------------


def alice(exp_in: float = 3600) -> Principal:
    return Principal(sub="alice", exp=time.time() + exp_in, scopes=frozenset({"messages:publish"}))


def test_a_ticket_opens_for_its_user_and_carries_the_tokens_expiry_but_no_scopes() -> None:
    signer = TicketSigner(SECRET, ttl_seconds=60)
    user = alice()
    ticket, expires_at = signer.issue(user)
    assert time.time() + 58 <= expires_at <= time.time() + 60
    back = signer.verify(ticket)
    assert (back.sub, back.exp, back.scopes) == ("alice", user.exp, frozenset())
    assert jwt.get_unverified_header(ticket)["typ"] == TICKET_TYPE


def test_a_ticket_never_outlives_its_token() -> None:
    signer = TicketSigner(SECRET, ttl_seconds=60)
    user = alice(exp_in=10)
    _, expires_at = signer.issue(user)
    assert expires_at <= user.exp
    with pytest.raises(AuthError, match="expired"):
        signer.issue(alice(exp_in=-1))


def test_an_expired_or_tampered_ticket_is_refused() -> None:
    signer = TicketSigner(SECRET, ttl_seconds=60)
    old, _ = signer.issue(alice(), now=time.time() - 61)
    with pytest.raises(AuthError, match="expired"):
        signer.verify(old)
    ticket, _ = signer.issue(alice())
    header, _, signature = ticket.split(".")
    claims = jwt.decode(ticket, options={"verify_signature": False})
    stretched = jwt.utils.base64url_encode(
        json.dumps({**claims, "exp": claims["exp"] + 3600, "sub": "bob"}).encode()
    ).decode()
    with pytest.raises(AuthError, match="signature"):
        signer.verify(f"{header}.{stretched}.{signature}")
    with pytest.raises(AuthError):
        signer.verify(ticket[:-3])


def test_tickets_and_api_tokens_never_stand_in_for_each_other() -> None:
    verifier = TokenVerifier(settings(jwt_secret=SECRET))
    assert verifier.tickets is not None
    ticket, _ = verifier.tickets.issue(alice())
    assert "signature" in refusal(verifier, ticket)
    with pytest.raises(AuthError):
        verifier.tickets.verify(token(SECRET, "HS256"))
    # Even a token signed with the ticket key itself is no ticket without the ticket's typ and aud.
    ticket_key = derive_ticket_key(SECRET)
    assert ticket_key != SECRET.encode()
    with pytest.raises(AuthError, match="not a stream ticket"):
        verifier.tickets.verify(token(ticket_key, "HS256", aud=TICKET_AUDIENCE, token_exp=time.time() + 60))
    no_aud = jwt.encode(
        {"sub": "alice", "exp": int(time.time()) + 60, "token_exp": time.time() + 60},
        ticket_key,
        algorithm="HS256",
        headers={"typ": TICKET_TYPE},
    )
    with pytest.raises(AuthError, match="'aud'"):
        verifier.tickets.verify(no_aud)


def test_tickets_need_a_secret(rsa_key: rsa.RSAPrivateKey) -> None:
    assert TokenVerifier(settings(jwt_public_key=pem(rsa_key))).tickets is None
    with_ticket_secret = TokenVerifier(settings(jwt_public_key=pem(rsa_key), ticket_secret=OTHER_SECRET))
    assert with_ticket_secret.tickets is not None
    ticket, _ = with_ticket_secret.tickets.issue(alice())
    assert with_ticket_secret.tickets.verify(ticket).sub == "alice"
    other_replica = TicketSigner(OTHER_SECRET, ttl_seconds=60)
    assert other_replica.verify(ticket).sub == "alice"
    with pytest.raises(AuthError):
        TicketSigner(SECRET, ttl_seconds=60).verify(ticket)

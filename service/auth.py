"""JWT verification: which tokens open a stream or publish (DESIGN §3, §4). No web framework here."""

from __future__ import annotations

import time
from dataclasses import dataclass

import jwt

from service.config import Settings

PUBLISH_SCOPE = "messages:publish"
MAX_SUBJECT_LENGTH = 256
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})


class AuthError(Exception):
    """A request's credentials were refused. `missing` distinguishes "none sent" from "bad token"."""

    def __init__(self, detail: str, *, missing: bool = False) -> None:
        super().__init__(detail)
        self.detail = detail
        self.missing = missing


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a verified token speaks for."""

    sub: str
    exp: float
    scopes: frozenset[str]

    @property
    def can_publish(self) -> bool:
        return PUBLISH_SCOPE in self.scopes


def _scopes(claims: dict[str, object]) -> frozenset[str]:
    scope, scp = claims.get("scope"), claims.get("scp")
    found: set[str] = set()
    if isinstance(scope, str):
        found.update(scope.split())
    if isinstance(scp, list):
        found.update(s for s in scp if isinstance(s, str))
    elif isinstance(scp, str):
        found.update(scp.split())
    return frozenset(found)


class TokenVerifier:
    """Checks signature, `exp`/`nbf`/`iat` with leeway, `sub`, and `aud`/`iss` when configured.

    The key decides the algorithm family: a shared secret admits only HMAC algorithms and a public key
    only asymmetric ones, so an HS token "signed" with the public key can never verify; `none` never does.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        allowed = set(settings.jwt_algorithms)
        self._key: str | bytes
        if settings.jwt_public_key:
            self._key = settings.jwt_public_key
            self._algorithms = sorted(allowed - HMAC_ALGORITHMS)
        elif settings.jwt_secret is not None:
            self._key = settings.jwt_secret.get_secret_value()
            self._algorithms = sorted(allowed & HMAC_ALGORITHMS)
        else:
            raise ValueError("no JWT key configured")
        if not self._algorithms:
            raise ValueError(
                f"PGPUSH_JWT_ALGORITHMS {sorted(allowed)} admits none usable with the configured key"
            )

    def verify(self, token: str) -> Principal:
        """The token's principal, or AuthError saying what is wrong (never echoing the token)."""
        s = self._settings
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                audience=s.jwt_audience,
                issuer=s.jwt_issuer,
                leeway=s.jwt_leeway_seconds,
                options={"require": ["exp", "sub"], "verify_aud": s.jwt_audience is not None},
            )
        except jwt.ExpiredSignatureError as exc:
            raise AuthError("the token has expired") from exc
        except jwt.ImmatureSignatureError as exc:
            raise AuthError("the token is not valid yet") from exc
        except jwt.InvalidAudienceError as exc:
            raise AuthError("the token is for another audience") from exc
        except jwt.InvalidIssuerError as exc:
            raise AuthError("the token is from another issuer") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"the token has no {exc.claim!r} claim") from exc
        except jwt.InvalidAlgorithmError as exc:
            raise AuthError("the token's algorithm is not allowed") from exc
        except jwt.InvalidSignatureError as exc:
            raise AuthError("the token's signature does not verify") from exc
        except jwt.PyJWTError as exc:
            raise AuthError("the token is malformed") from exc
        sub = claims.get("sub")
        if not isinstance(sub, str) or not 1 <= len(sub) <= MAX_SUBJECT_LENGTH:
            raise AuthError(f"the token's 'sub' must be a string of 1 to {MAX_SUBJECT_LENGTH} characters")
        if any(ord(c) < 32 or ord(c) == 127 for c in sub):
            raise AuthError("the token's 'sub' holds control characters")
        return Principal(sub=sub, exp=float(claims["exp"]), scopes=_scopes(claims))


def mint_token(
    secret: str, sub: str, *, ttl_seconds: int, scopes: tuple[str, ...] = (), algorithm: str = "HS256"
) -> str:
    """A signed token for `pgpush token` and the development mode."""
    now = int(time.time())
    claims: dict[str, object] = {"sub": sub, "iat": now, "exp": now + ttl_seconds}
    if scopes:
        claims["scope"] = " ".join(scopes)
    return jwt.encode(claims, secret, algorithm=algorithm)

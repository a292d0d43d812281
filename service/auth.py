"""JWT verification and stream tickets: which credentials open a stream or publish (docs/protocol.md §3, §4).

No web framework here. `TokenVerifier(settings)` is the app's whole auth configuration: it verifies
subscriber tokens, its `publishers` attribute verifies publisher tokens (another issuer or key when
configured), and its `tickets` attribute issues and checks stream tickets (None when no secret can sign them).
"""

from __future__ import annotations

import hashlib
import math
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from jwt.algorithms import get_default_algorithms

from .config import Settings
from .jwks import JwksCache

PUBLISH_SCOPE = "messages:publish"
MAX_SUBJECT_LENGTH = 256
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
# An EC key verifies exactly one algorithm: the one named after its curve (RFC 7518 §3.4).
EC_ALGORITHM_BY_CURVE = {
    "secp256r1": "ES256",
    "secp384r1": "ES384",
    "secp521r1": "ES512",
    "secp256k1": "ES256K",
}
ASYMMETRIC_ALGORITHMS = RSA_ALGORITHMS | frozenset(EC_ALGORITHM_BY_CURVE.values()) | {"EdDSA"}

TICKET_AUDIENCE = "pgpush:stream"
TICKET_TYPE = "pgpush-ticket+jwt"
TICKET_ALGORITHM = "HS256"
# HKDF `info`: the ticket key is a different key from the secret it comes from, so a ticket never
# verifies as an API token and an API token never verifies as a ticket.
TICKET_KEY_INFO = b"pgpush stream ticket key v1"

# The verified-token cache: how long a verified token may be served without verifying it again (a JWKS
# refetch, a config change by restart, or a key revoked at the provider takes effect within this), and how
# many tokens it remembers (least recently used first out, so a flood of distinct tokens cannot grow it).
TOKEN_CACHE_SECONDS = 60.0
TOKEN_CACHE_ENTRIES = 10_000

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey


class AuthError(Exception):
    """A request's credentials were refused. `missing` distinguishes "none sent" from "bad token"."""

    def __init__(self, detail: str, *, missing: bool = False) -> None:
        super().__init__(detail)
        self.detail = detail
        self.missing = missing


class AuthUnavailableError(AuthError):
    """The token cannot be checked right now: the JWKS has never been fetched successfully."""


class _UnknownKidError(AuthError):
    """The token names a `kid` the cached key set lacks (a refresh may find it)."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a verified token speaks for."""

    sub: str
    exp: float
    scopes: frozenset[str]

    @property
    def can_publish(self) -> bool:
        return PUBLISH_SCOPE in self.scopes


@dataclass(frozen=True, slots=True)
class KeyConfig:
    """Where one audience's tokens (subscribers' or publishers') get their keys and which claims they need."""

    secret: str | None = field(repr=False)  # never in a log line or traceback
    public_key: str | None
    jwks_url: str | None
    audience: str | None
    issuer: str | None
    label: str

    @classmethod
    def for_subscribers(cls, s: Settings) -> KeyConfig:
        return cls(
            secret=s.jwt_secret.get_secret_value() if s.jwt_secret else None,
            public_key=s.jwt_public_key,
            jwks_url=s.jwt_jwks_url,
            audience=s.jwt_audience,
            issuer=s.jwt_issuer,
            label="PGPUSH_JWT",
        )

    @classmethod
    def for_publishers(cls, s: Settings) -> KeyConfig:
        """The publisher settings, each unset one taken from the subscribers'; key sources go as a group."""
        base = cls.for_subscribers(s)
        own_keys = s.publisher_jwt_secret or s.publisher_jwt_public_key or s.publisher_jwt_jwks_url
        return cls(
            secret=(s.publisher_jwt_secret.get_secret_value() if s.publisher_jwt_secret else None)
            if own_keys
            else base.secret,
            public_key=s.publisher_jwt_public_key if own_keys else base.public_key,
            jwks_url=s.publisher_jwt_jwks_url if own_keys else base.jwks_url,
            audience=s.publisher_jwt_audience or base.audience,
            issuer=s.publisher_jwt_issuer or base.issuer,
            label="PGPUSH_PUBLISHER_JWT" if own_keys else base.label,
        )


def token_digest(token: str) -> bytes:
    """The cache key of a token: its SHA-256, so the cache never holds a credential."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class VerifiedTokenCache:
    """Principals of tokens that verified, by the SHA-256 of the token, until `exp` (+ leeway) or the cap.

    Only successes go in (a refused token is verified again every time: nothing an attacker sends can
    fill it with refusals). A hit past the token's `exp` (+ leeway, exactly pyjwt's rule) is refused and
    dropped; a hit past the cap is dropped and the token verified afresh. Bounded: the least recently
    used entry leaves when a new one would exceed `max_entries`.
    """

    def __init__(
        self,
        *,
        max_entries: int = TOKEN_CACHE_ENTRIES,
        max_age: float = TOKEN_CACHE_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_entries = max_entries
        self.max_age = max_age
        self.clock = clock  # the wall clock, as pyjwt's `exp` check uses
        self._entries: OrderedDict[bytes, tuple[Principal, float, float]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def get(self, digest: bytes) -> Principal | None:
        """The cached principal; None on a miss; AuthError when the cached token has expired since."""
        entry = self._entries.get(digest)
        if entry is None:
            self.misses += 1
            return None
        principal, expires_at, cached_until = entry
        now = self.clock()
        if now >= expires_at:
            del self._entries[digest]
            raise AuthError("the token has expired")
        if now >= cached_until:
            del self._entries[digest]
            self.misses += 1
            return None
        self._entries.move_to_end(digest)
        self.hits += 1
        return principal

    def put(self, digest: bytes, principal: Principal, leeway: float) -> None:
        # pyjwt refuses a token once `exp <= now - leeway`: the entry dies at the same instant.
        expires_at = principal.exp + leeway
        now = self.clock()
        if now >= expires_at or self.max_entries <= 0:
            return
        self._entries[digest] = (principal, expires_at, now + self.max_age)
        self._entries.move_to_end(digest)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


def load_public_key(text_or_path: str) -> PublicKey:
    """A PEM public key (or X.509 certificate) given as its text or as the path of a file holding it."""
    text = text_or_path.strip()
    if not text.startswith("-----BEGIN"):
        text = Path(text).expanduser().read_text().strip()
    elif "\n" not in text:
        # A PEM squeezed into one environment line usually carries literal "\n" sequences.
        text = text.replace("\\n", "\n")
    data = text.encode()
    key: Any
    if text.startswith("-----BEGIN CERTIFICATE"):
        key = x509.load_pem_x509_certificate(data).public_key()
    else:
        key = serialization.load_pem_public_key(data)
    if not isinstance(key, PublicKey):
        raise ValueError(f"unsupported public key type {type(key).__name__}: use RSA, EC or Ed25519/Ed448")
    return key


def algorithms_for_key(key: object) -> frozenset[str]:
    """The JWS algorithms a public key can verify: the family check that keeps HS* away from it."""
    if isinstance(key, rsa.RSAPublicKey):
        return RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        alg = EC_ALGORITHM_BY_CURVE.get(key.curve.name)
        return frozenset({alg}) if alg else frozenset()
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return frozenset({"EdDSA"})
    return frozenset()


def _scopes(claims: dict[str, Any]) -> frozenset[str]:
    scope, scp = claims.get("scope"), claims.get("scp")
    found: set[str] = set()
    if isinstance(scope, str):
        found.update(scope.split())
    if isinstance(scp, list):
        found.update(s for s in scp if isinstance(s, str))
    elif isinstance(scp, str):
        found.update(scp.split())
    return frozenset(found)


def _check_subject(claims: dict[str, Any]) -> str:
    """The `sub`, when it is a name the messages table's recipient CHECK (and Postgres' text) accepts.

    Any other `sub` could never have a row, and as a query parameter it failed every batched hub query that
    named it (a lone surrogate cannot be sent to Postgres at all), stalling other users' streams.
    """
    sub = claims.get("sub")
    if not isinstance(sub, str) or not 1 <= len(sub) <= MAX_SUBJECT_LENGTH:
        raise AuthError(f"the token's 'sub' must be a string of 1 to {MAX_SUBJECT_LENGTH} characters")
    # Category Cc is C0, DEL and C1: what the CHECK's [[:cntrl:]] matches in a UTF-8 database.
    if any(unicodedata.category(c) == "Cc" for c in sub):
        raise AuthError("the token's 'sub' holds control characters")
    try:
        sub.encode("utf-8")
    except UnicodeEncodeError:
        raise AuthError("the token's 'sub' is not valid Unicode (a lone surrogate)") from None
    return sub


def _header(token: str) -> dict[str, Any]:
    try:
        return jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise AuthError("the token is malformed") from exc


def _decode_error(exc: jwt.PyJWTError, what: str = "token") -> AuthError:
    """A sentence for the client saying what is wrong, never echoing the credential."""
    match exc:
        case jwt.ExpiredSignatureError():
            return AuthError(f"the {what} has expired")
        case jwt.ImmatureSignatureError():
            return AuthError(f"the {what} is not valid yet")
        case jwt.InvalidAudienceError():
            return AuthError(f"the {what} is for another audience")
        case jwt.InvalidIssuerError():
            return AuthError(f"the {what} is from another issuer")
        case jwt.MissingRequiredClaimError():
            return AuthError(f"the {what} has no {exc.claim!r} claim")
        case jwt.InvalidAlgorithmError():
            return AuthError(f"the {what}'s algorithm is not allowed")
        case jwt.InvalidSignatureError():
            return AuthError(f"the {what}'s signature does not verify")
    return AuthError(f"the {what} is malformed")


class TokenVerifier:
    """Checks signature, `exp`/`nbf`/`iat` with leeway, `sub`, and `aud`/`iss` when configured.

    Each key source verifies only its own algorithm family: the shared secret HS*, a PEM key the
    algorithms of its type (RSA: RS*/PS*, EC: the ES* of its curve, Ed25519/Ed448: EdDSA), a JWKS key
    the one algorithm it names (or pyjwt infers from its type). So an HS token "signed" with a public
    key can never verify, and `none` never does. PGPUSH_JWT_ALGORITHMS, when set, narrows all of them;
    unset, it admits HS256 with the secret and whatever the configured public key supports.

    `verify` never does I/O; `verify_async` also fetches the JWKS (in a thread) when a token names a
    `kid` the cache lacks, as often as the refetch rate limit allows.

    Both serve a token that verified before from `token_cache` (keyed by its SHA-256) until its `exp` and
    at most TOKEN_CACHE_SECONDS, so a reconnecting client is not verified again on every open; the cache
    is emptied whenever the JWKS is refetched. `verifications` counts the tokens actually verified.
    """

    def __init__(
        self, settings: Settings, keys: KeyConfig | None = None, token_cache: VerifiedTokenCache | None = None
    ) -> None:
        config = keys or KeyConfig.for_subscribers(settings)
        self._config = config
        self._leeway = settings.jwt_leeway_seconds
        explicit = "jwt_algorithms" in settings.model_fields_set
        listed = frozenset(settings.jwt_algorithms)
        unknown = listed - set(get_default_algorithms())
        if unknown:
            raise ValueError(f"PGPUSH_JWT_ALGORITHMS names unknown algorithms {sorted(unknown)}")
        if config.public_key and config.jwks_url:
            raise ValueError(f"set {config.label}_PUBLIC_KEY or {config.label}_JWKS_URL, not both")

        self._secret: bytes | None = None
        self._public_key: PublicKey | None = None
        self._public_algorithms: frozenset[str] = frozenset()
        self._jwks: JwksCache | None = None
        allowed: set[str] = set()
        if config.secret is not None:
            self._secret = config.secret.encode()
            # An explicit list without HS* leaves the secret to signing (`pgpush token`, tickets).
            allowed |= listed & HMAC_ALGORITHMS
        if config.public_key:
            self._public_key = load_public_key(config.public_key)
            supported = algorithms_for_key(self._public_key)
            self._public_algorithms = (listed & supported) if explicit else supported
            allowed |= self._public_algorithms
        if config.jwks_url:
            self._jwks = JwksCache(
                config.jwks_url,
                max_age=settings.jwt_jwks_cache_seconds,
                refetch_interval=settings.jwt_jwks_refetch_seconds,
            )
            allowed |= (listed & ASYMMETRIC_ALGORITHMS) if explicit else ASYMMETRIC_ALGORITHMS
        if self._secret is None and self._public_key is None and self._jwks is None:
            raise ValueError(f"no JWT key configured: set {config.label}_SECRET, _PUBLIC_KEY or _JWKS_URL")
        if not allowed:
            raise ValueError(
                f"PGPUSH_JWT_ALGORITHMS {sorted(listed)} admits no algorithm usable with the keys of "
                f"{config.label}_* (a secret takes HS*, a public key or JWKS RS*/PS*/ES*/EdDSA)"
            )
        self._algorithms = frozenset(allowed)
        self.token_cache = token_cache if token_cache is not None else VerifiedTokenCache()
        self._cache_generation = 0
        self.verifications = 0

        # Only the subscribers' verifier (built without `keys`) carries the publisher one and the tickets.
        self.publishers: TokenVerifier = self
        self.tickets: TicketSigner | None = None
        if keys is None:
            publisher_config = KeyConfig.for_publishers(settings)
            if publisher_config != config:
                self.publishers = TokenVerifier(settings, publisher_config)
            self.tickets = TicketSigner.from_settings(settings)

    @property
    def jwks(self) -> JwksCache | None:
        """The JWKS cache, when keys come from a JWKS URL."""
        return self._jwks

    @property
    def retry_after_seconds(self) -> int:
        """When a client refused for lack of keys (AuthUnavailableError) may try again."""
        return max(1, math.ceil(self._jwks.refetch_interval)) if self._jwks else 1

    def _key(self, header: dict[str, Any]) -> tuple[object, str]:
        """The key and algorithm a token with this header must verify with (no I/O)."""
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise AuthError("the token's algorithm is not allowed")
        if alg in HMAC_ALGORITHMS:
            if self._secret is None:
                raise AuthError("the token's algorithm is not allowed")
            return self._secret, alg
        if self._public_key is not None:
            if alg not in self._public_algorithms:  # an invariant (PEM and JWKS exclude each other)
                raise AuthError("the token's algorithm is not allowed")
            return self._public_key, alg
        if self._jwks is None:
            raise AuthError("the token's algorithm is not allowed")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise AuthError("the token has no 'kid' header naming its signing key")
        jwk = self._jwks.key(kid)
        if jwk is None:
            raise _UnknownKidError("no signing key matches the token's 'kid'")
        if jwk.algorithm_name != alg or alg not in algorithms_for_key(jwk.key):
            raise AuthError("the token's algorithm does not fit its signing key")
        return jwk.key, alg

    def _decode(self, token: str, key: object, alg: str) -> Principal:
        c = self._config
        self.verifications += 1
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,  # type: ignore[arg-type]  # one of pyjwt's key types, chosen by _key
                algorithms=[alg],
                audience=c.audience,
                issuer=c.issuer,
                leeway=self._leeway,
                options={"require": ["exp", "sub"], "verify_aud": c.audience is not None},
            )
        except jwt.PyJWTError as exc:
            raise _decode_error(exc) from exc
        return Principal(sub=_check_subject(claims), exp=float(claims["exp"]), scopes=_scopes(claims))

    def _cached(self, digest: bytes) -> Principal | None:
        jwks = self._jwks
        if jwks is not None and jwks.generation != self._cache_generation:
            # The key set was refetched (perhaps a key was rotated out): verify every token anew.
            self.token_cache.clear()
            self._cache_generation = jwks.generation
        return self.token_cache.get(digest)

    def verify(self, token: str) -> Principal:
        """The token's principal, or AuthError saying what is wrong (never echoing the token). No I/O."""
        digest = token_digest(token)
        principal = self._cached(digest)
        if principal is None:
            key, alg = self._key(_header(token))
            principal = self._decode(token, key, alg)
            self.token_cache.put(digest, principal, self._leeway)
        return principal

    async def verify_async(self, token: str) -> Principal:
        """Like `verify`, but a `kid` missing from the JWKS cache triggers a (rate-limited) refetch."""
        digest = token_digest(token)
        jwks = self._jwks
        principal = self._cached(digest)
        if principal is not None:
            if jwks is not None and jwks.is_stale():
                jwks.refresh_in_background()
            return principal
        header = _header(token)
        try:
            key, alg = self._key(header)
        except _UnknownKidError:
            if jwks is None:
                raise
            if jwks.may_fetch():
                await jwks.refresh()
            if not jwks.loaded:
                raise AuthUnavailableError(
                    "the identity provider's signing keys could not be fetched; try again shortly"
                ) from None
            key, alg = self._key(header)
        if jwks is not None and jwks.is_stale():
            jwks.refresh_in_background()
        principal = self._decode(token, key, alg)
        self.token_cache.put(digest, principal, self._leeway)
        return principal

    async def prefetch(self) -> None:
        """Load the JWKS (subscribers' and publishers') before the first request needs it."""
        for verifier in {id(v): v for v in (self, self.publishers)}.values():
            if verifier._jwks is not None:
                await verifier._jwks.refresh()


def derive_ticket_key(secret: str) -> bytes:
    """The ticket signing key: HKDF-SHA256 of the secret, bound to the ticket purpose."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=TICKET_KEY_INFO).derive(secret.encode())


class TicketSigner:
    """Short-lived stream tickets (protocol §3): stateless, so any replica sharing the secret accepts them.

    A ticket is a JWT signed with a key derived from the secret, with its own `aud` and `typ` that only
    the stream accepts. Its `exp` is at most the ticket TTL away and never past the token it was issued
    for; `token_exp` carries that token's `exp`, which bounds the stream's life as the token itself would.
    """

    def __init__(self, secret: str, ttl_seconds: int) -> None:
        self._key = derive_ticket_key(secret)
        self._ttl = ttl_seconds

    @classmethod
    def from_settings(cls, settings: Settings) -> TicketSigner | None:
        """PGPUSH_TICKET_SECRET, else PGPUSH_JWT_SECRET; None when neither is set (tickets are off)."""
        secret = settings.ticket_secret or settings.jwt_secret
        if secret is None:
            return None
        return cls(secret.get_secret_value(), settings.ticket_ttl_seconds)

    def issue(self, user: Principal, *, now: float | None = None) -> tuple[str, int]:
        """A ticket for this user and its expiry (epoch seconds)."""
        issued = int(time.time() if now is None else now)
        expires = min(issued + self._ttl, int(user.exp))
        if expires <= issued:
            raise AuthError("the token has expired")
        claims = {
            "sub": user.sub,
            "aud": TICKET_AUDIENCE,
            "iat": issued,
            "exp": expires,
            "token_exp": user.exp,
        }
        ticket = jwt.encode(claims, self._key, algorithm=TICKET_ALGORITHM, headers={"typ": TICKET_TYPE})
        return ticket, expires

    def verify(self, ticket: str) -> Principal:
        """The ticket's user; AuthError when it is expired, tampered with, or not a ticket at all."""
        if _header(ticket).get("typ") != TICKET_TYPE:
            raise AuthError("the ticket is not a stream ticket")
        try:
            claims: dict[str, Any] = jwt.decode(
                ticket,
                self._key,
                algorithms=[TICKET_ALGORITHM],
                audience=TICKET_AUDIENCE,
                # No leeway: the 60 s are the whole point. `iat` is informational (replica clocks differ).
                leeway=0,
                options={"require": ["exp", "sub", "aud", "token_exp"], "verify_iat": False},
            )
        except jwt.PyJWTError as exc:
            raise _decode_error(exc, "ticket") from exc
        token_exp = claims["token_exp"]
        if not isinstance(token_exp, int | float) or isinstance(token_exp, bool):
            raise AuthError("the ticket is malformed")
        return Principal(sub=_check_subject(claims), exp=float(token_exp), scopes=frozenset())


def mint_token(
    secret: str, sub: str, *, ttl_seconds: int, scopes: tuple[str, ...] = (), algorithm: str = "HS256"
) -> str:
    """A signed token for `pgpush token` and the development mode."""
    now = int(time.time())
    claims: dict[str, object] = {"sub": sub, "iat": now, "exp": now + ttl_seconds}
    if scopes:
        claims["scope"] = " ".join(scopes)
    return jwt.encode(claims, secret, algorithm=algorithm)

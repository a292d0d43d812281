"""The service's settings: one frozen pydantic-settings class read from the environment (README)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MiB = 1024 * 1024
KiB = 1024


class Settings(BaseSettings):
    """Every knob of pgpush. Names and defaults are part of the public contract (README, "Settings")."""

    model_config = SettingsConfigDict(
        env_prefix="PGPUSH_", frozen=True, extra="ignore", populate_by_name=True
    )

    # Unset means "start an embedded Postgres under data_dir" (development mode).
    database_url: str | None = Field(default=None, validation_alias="DATABASE_URL")
    listen_database_url: str | None = None
    data_dir: Path = Path(".pgpush")

    jwt_secret: SecretStr | None = None
    jwt_public_key: str | None = None
    jwt_jwks_url: str | None = None
    jwt_algorithms: Annotated[tuple[str, ...], NoDecode] = ("HS256",)
    jwt_audience: str | None = None
    # A public key or JWKS belongs to an identity provider that signs tokens for every application it serves;
    # without an audience pgpush would accept all of them. `pgpush serve` refuses that unless this says so.
    jwt_audience_optional: bool = False
    jwt_issuer: str | None = None
    jwt_leeway_seconds: float = Field(default=30, ge=0)
    # A fetched JWKS is trusted this long, then refreshed in the background (the old keys serve meanwhile).
    jwt_jwks_cache_seconds: float = Field(default=300, gt=0)
    # At most one JWKS fetch per this interval, so tokens with made-up `kid`s cannot flood the provider.
    jwt_jwks_refetch_seconds: float = Field(default=30, ge=0)
    # Publishers may come from another issuer; each unset field falls back to the subscriber setting,
    # and setting any publisher key source replaces the subscriber key sources for publishers.
    publisher_jwt_secret: SecretStr | None = None
    publisher_jwt_public_key: str | None = None
    publisher_jwt_jwks_url: str | None = None
    publisher_jwt_audience: str | None = None
    publisher_jwt_issuer: str | None = None
    # Signs stream tickets (a key derived from it, never the secret itself); defaults to PGPUSH_JWT_SECRET.
    ticket_secret: SecretStr | None = None
    ticket_ttl_seconds: int = Field(default=60, ge=1)

    heartbeat_seconds: float = Field(default=15, gt=0)
    idle_timeout_seconds: float = Field(default=300, gt=0)
    retry_ms: int = Field(default=3000, ge=0)
    pause_retry_ms: int = Field(default=60000, ge=0)
    replay_limit: int = Field(default=1000, ge=1)
    max_streams_per_user: int = Field(default=10, ge=1)
    max_streams: int = Field(default=50000, ge=1)
    shutdown_jitter_ms: int = Field(default=5000, ge=0)
    # A stream ends (with a short random retry) after 80 to 100 % of this, so load rebalances over replicas.
    max_stream_seconds: float = Field(default=3600, gt=0)
    retention_days: float = Field(default=30, gt=0)
    retention_max_unread_per_user: int = Field(default=10000, ge=1)
    retention_interval_seconds: float = Field(default=600, gt=0)
    retention_batch_rows: int = Field(default=1000, ge=1)
    max_body_bytes: int = Field(default=MiB, ge=1)
    max_data_bytes: int = Field(default=64 * KiB, ge=1)
    # Bytes a stream may have queued and unsent before it is cut (the client resumes from the table).
    stream_buffer_bytes: int = Field(default=256 * KiB, ge=1024)

    # `pgpush serve` answers 408 to a request whose headers have not all arrived in this time (slowloris).
    header_timeout_seconds: float = Field(default=10, gt=0)
    # … and to one whose body has not all arrived in this time after its headers.
    body_timeout_seconds: float = Field(default=30, gt=0)
    # Request bodies read at once for requests without valid credentials (each up to max_body_bytes); more
    # are answered 503 before their body is read. Requests with a verified token are not counted.
    max_unauthenticated_bodies: int = Field(default=8, ge=1)
    migrate_on_start: bool = False
    cors_origins: Annotated[tuple[str, ...], NoDecode] = ()
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    serve_page: bool = True
    # Swagger UI at /docs loads its script from a CDN onto this origin: off unless asked for.
    api_docs: bool = False
    log_level: str = "info"

    # Listener health: a NOTIFY round trip every probe interval; a full catch-up read every safety interval.
    listener_probe_seconds: float = Field(default=10, gt=0)
    listener_probe_timeout_seconds: float = Field(default=5, gt=0)
    safety_net_seconds: float = Field(default=30, gt=0)
    reconnect_backoff_max_seconds: float = Field(default=2, gt=0)
    pool_max_size: int = Field(default=10, ge=1)
    # Above this many notifying statements per second, writers hand their notifications to one replica's
    # announcer, which sends one per batch (service/announcer.py). Off by default: it trades a few
    # milliseconds of delivery latency for write throughput, which only pays near the NOTIFY ceiling.
    notify_batch_above: float = Field(default=0, ge=0)
    notify_batch_interval_ms: int = Field(default=5, ge=1)

    @field_validator("jwt_algorithms", "cors_origins", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        """Accept a comma- or space-separated string from the environment."""
        if isinstance(value, str):
            return tuple(part for part in value.replace(",", " ").split() if part)
        return value

    @field_validator("jwt_algorithms")
    @classmethod
    def _no_none_algorithm(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one JWT algorithm is required")
        if any(alg.lower() == "none" for alg in value):
            raise ValueError('the "none" JWT algorithm can never be allowed')
        return value

    @field_validator("cors_origins")
    @classmethod
    def _no_wildcard_origin(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        # Credentials (the cookie form) are allowed, so a wildcard would let any site read streams.
        if "*" in value:
            raise ValueError("PGPUSH_CORS_ORIGINS must list origins explicitly; '*' is refused")
        return value

    @model_validator(mode="after")
    def _keys_outside_development(self) -> Settings:
        has_key = self.jwt_secret or self.jwt_public_key or self.jwt_jwks_url
        if self.database_url is not None and not has_key:
            raise ValueError(
                "DATABASE_URL is set but no JWT key is: set PGPUSH_JWT_SECRET, PGPUSH_JWT_PUBLIC_KEY "
                "or PGPUSH_JWT_JWKS_URL (only the embedded development mode makes its own secret)"
            )
        for name, secret in (
            ("PGPUSH_JWT_SECRET", self.jwt_secret),
            ("PGPUSH_PUBLISHER_JWT_SECRET", self.publisher_jwt_secret),
            ("PGPUSH_TICKET_SECRET", self.ticket_secret),
        ):
            if secret is not None and len(secret.get_secret_value()) < 32:
                raise ValueError(f"{name} must be at least 32 characters (RFC 7518 §3.2)")
        return self

    def missing_audience(self) -> str | None:
        """Why these settings would accept tokens minted for other applications, or None when they would not.

        A shared secret is this deployment's own, so whatever it signed was meant for pgpush. A public key or
        a JWKS is the identity provider's, which signs tokens for every application it serves: only an
        audience tells pgpush's tokens from theirs. `PGPUSH_JWT_AUDIENCE_OPTIONAL=true` accepts the risk.
        """
        if self.jwt_audience_optional:
            return None
        problems: list[str] = []
        if (self.jwt_public_key or self.jwt_jwks_url) and self.jwt_audience is None:
            problems.append("PGPUSH_JWT_AUDIENCE")
        own_publisher_keys = (
            self.publisher_jwt_secret or self.publisher_jwt_public_key or self.publisher_jwt_jwks_url
        )
        if own_publisher_keys:
            publisher_public = self.publisher_jwt_public_key or self.publisher_jwt_jwks_url
        else:
            publisher_public = self.jwt_public_key or self.jwt_jwks_url
        # Publishers fall back to PGPUSH_JWT_AUDIENCE: naming that one is enough when it is missing too.
        if publisher_public and (self.publisher_jwt_audience or self.jwt_audience) is None and not problems:
            problems.append("PGPUSH_PUBLISHER_JWT_AUDIENCE")
        if not problems:
            return None
        return (
            "a JWT public key or JWKS is configured without an audience, so tokens its identity provider "
            f"issued for any other application would be accepted: set {problems[0]} to the audience (`aud`) "
            "of pgpush's tokens, or PGPUSH_JWT_AUDIENCE_OPTIONAL=true to accept any audience"
        )

    @property
    def embedded(self) -> bool:
        """True when pgpush runs its own Postgres (no DATABASE_URL)."""
        return self.database_url is None

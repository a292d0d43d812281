"""pgpush: Postgres-backed per-user notifications over Server-Sent Events."""

__version__ = "0.4.0"

"""Alembic migrations of pgpush, installed as the package ``pgpush_migrations``."""

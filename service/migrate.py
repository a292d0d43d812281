"""Applying the alembic revisions (`pgpush migrate`); safe to run from several places at once."""

from __future__ import annotations

from importlib.resources import files

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(files("pgpush_migrations")))
    # "%" is alembic's interpolation character; a password may contain it.
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def migrate(database_url: str, revision: str = "head") -> str:
    """Upgrade the database to `revision`; env.py serialises concurrent runs with an advisory lock.

    Returns the revision the database is now at (the head's id when `revision` is "head").
    """
    config = alembic_config(database_url)
    command.upgrade(config, revision)
    return str(ScriptDirectory.from_config(config).get_revision(revision).revision)

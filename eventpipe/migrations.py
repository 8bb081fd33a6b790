"""Bringing a database to the schema of this version: create it if missing, then Alembic."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, create_engine, text
from sqlalchemy.engine import make_url


def scripts() -> Path:
    """The migration scripts: a checkout's top-level alembic/ (where `alembic upgrade head`
    finds them), else the copy an installed wheel carries as eventpipe/alembic."""
    here = Path(__file__).resolve().parent
    checkout = here.parent / "alembic"
    return checkout if (checkout / "env.py").is_file() else here / "alembic"


def alembic_config(url: str) -> Config:
    """The project's Alembic configuration, aimed at `url` (no alembic.ini needed)."""
    config = Config()
    config.set_main_option("script_location", str(scripts()))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["configure_logger"] = False
    return config


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


@cache
def _revisions() -> tuple[str, frozenset[str]]:
    """The head this version's code needs, and every revision it knows."""
    script = ScriptDirectory(str(scripts()))
    head = script.get_current_head()
    assert head is not None
    return head, frozenset(revision.revision for revision in script.walk_revisions())


SCHEMA_MISSING = "the database has no schema yet: run `eventpipe migrate`"


def schema_behind(conn: Connection) -> str | None:
    """Why the database's schema is older than this code needs, naming the fix; None when
    it is the head, or a revision this code does not know (a newer release migrated it, and
    its schema still serves this one while the release rolls out)."""
    current = MigrationContext.configure(conn).get_current_revision()
    head, known = _revisions()
    if current is None:
        return SCHEMA_MISSING
    if current != head and current in known:
        return f"the database's schema is at {current}, this code needs {head}: run " \
               "`eventpipe migrate`"
    return None


def create_database_if_missing(url: str) -> None:
    """SQL Server and PostgreSQL: create the URL's database through the server's default one.
    SQLite creates its file on first connection."""
    parsed = make_url(url)
    backend, name = parsed.get_backend_name(), parsed.database
    if backend == "sqlite" or not name:
        return
    if backend == "mssql":
        admin_url = parsed.set(database="master")
        exists = "SELECT 1 FROM sys.databases WHERE name = :name"
        create = f"CREATE DATABASE [{name.replace(']', ']]')}]"
    elif backend == "postgresql":
        admin_url = parsed.set(database="postgres")
        exists = "SELECT 1 FROM pg_database WHERE datname = :name"
        create = f'CREATE DATABASE "{name.replace(chr(34), chr(34) * 2)}"'
    else:
        return
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            if conn.execute(text(exists), {"name": name}).first() is None:
                conn.execute(text(create))
    finally:
        engine.dispose()

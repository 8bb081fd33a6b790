"""Bringing a database to the schema of this version: create it if missing, then Alembic."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, text
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

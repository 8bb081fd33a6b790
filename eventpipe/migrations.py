"""Bringing a database to the schema of this version: create it if missing, then Alembic."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect, text
from sqlalchemy.engine import make_url

from eventpipe.database import make_engine, redacted
from eventpipe.settings import Settings, SettingsError
from eventpipe.sqlite_file import in_a_file


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


class SchemaAhead(Exception):
    """The database is at a revision this release does not know: a newer one migrated it
    (and an older one's migration runs after a rollback)."""

    def __init__(self, found: str, head: str) -> None:
        super().__init__(f"is at revision {found}, newer than this release knows (its head "
                         f"is {head}): nothing to migrate; migrate it with the release that "
                         "made it")
        self.found = found
        self.head = head


def upgrade(url: str, revision: str = "head") -> None:
    """Raises `SchemaAhead` for a database a newer release migrated, rather than Alembic's
    "Can't locate revision", said with a traceback."""
    head, known = _revisions()
    ahead = [found for found in current_revisions(url) if found not in known]
    if ahead:
        raise SchemaAhead(", ".join(ahead), head)
    command.upgrade(alembic_config(url), revision)


def current_revisions(url: str) -> tuple[str, ...]:
    """The revisions the database's version table holds (none for a database without one),
    read through the same network timeouts as every engine, and without Alembic's context,
    which logs its set-up a second time."""
    engine = make_engine(Settings(database_url=url, database_statement_timeout_s=0),
                         writer=False)
    try:
        with engine.connect() as conn:
            return _versions(conn)
    finally:
        engine.dispose()


def _versions(conn: Connection) -> tuple[str, ...]:
    if not inspect(conn).has_table(VERSION_TABLE):
        return ()
    return tuple(conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars())


VERSION_TABLE = "alembic_version"  # Alembic's default, which alembic/env.py keeps


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
    versions = _versions(conn)  # as `current_revisions`: Alembic's context logs its set-up
    head, known = _revisions()
    if not versions:
        return SCHEMA_MISSING
    older = [version for version in versions if version != head and version in known]
    if older:
        return f"the database's schema is at {', '.join(older)}, this code needs {head}: " \
               "run `eventpipe migrate`"
    return None


def create_database_if_missing(url: str) -> None:
    """SQL Server and PostgreSQL: create the URL's database through the server's default one.
    SQLite creates its file on first connection, in a directory made here."""
    parsed = make_url(url)
    backend, name = parsed.get_backend_name(), parsed.database
    if backend == "sqlite":
        if in_a_file(name):
            _make_directory(Path(str(name)).parent, url)
        return
    if backend == "postgresql" and not name:
        # libpq's `dbname` parameter names it as well as the path does: taken out of the
        # server's default database's URL.
        given = parsed.query.get("dbname")
        name = given if isinstance(given, str) else None
        parsed = parsed.difference_update_query(["dbname"])
    if not name:
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
    # Through the same network timeouts as every engine, not the driver's own (130 s with
    # psycopg for a server that answers nothing); no statement timeout, as for Alembic.
    admin = Settings(database_url=admin_url.render_as_string(hide_password=False),
                     database_statement_timeout_s=0)
    engine = make_engine(admin, writer=False)
    try:
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT")  # CREATE DATABASE needs it
            if conn.execute(text(exists), {"name": name}).first() is None:
                conn.execute(text(create))
    finally:
        engine.dispose()


def _make_directory(directory: Path, url: str) -> None:
    """The directory of a SQLite file, made if missing: one that cannot be (a file of its name
    in the way, a read-only working directory) is DATABASE_URL's, said in one line."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SettingsError(f"DATABASE_URL={redacted(url)}: cannot create the directory "
                            f"{directory.absolute()}: {exc.strerror or exc}; run from a "
                            "writable directory or set DATABASE_URL") from None

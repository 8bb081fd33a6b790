"""Engines for the three supported databases, configured for how this pipeline uses them."""

from __future__ import annotations

import logging
import math
import re
import secrets
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import ExceptionContext, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError

from eventpipe import sqlite_turns
from eventpipe.errors import prepared_statement_failed, read_only, sqlstate
from eventpipe.settings import MAX_DATABASE_TIMEOUT_MS, Settings, SettingsError
from eventpipe.sqlite_file import in_a_file
from eventpipe.sqlite_turns import TakesTurns, begin_writing

log = logging.getLogger(__name__)

WAL_PAGES = 8_000  # SQLite's `wal_autocheckpoint` (see `_configure_sqlite`)
# Execution options of the statements PostgreSQL may plan once per connection (`_prepared`,
# unless DATABASE_PREPARED_STATEMENTS=off): those whose plan cannot depend on how large the
# tables are, as they read no table but through a unique key's conflict check (writes from
# arrays, `INSERT … SELECT * FROM unnest(…) ON CONFLICT …`). Planned at each execution, they
# cost PostgreSQL a quarter of its CPU for a batch of a few events. The rest are planned each
# time (`make_engine`).
PREPARED = {"prepared": True}
# psycopg's threshold while such a statement runs: it prepares a statement after this many
# executions, or when asked. Only when asked.
_ONLY_WHEN_ASKED = 2**62
_GAVE_UP = "eventpipe.prepared_statements_lost"  # set in a connection's `info`
# libpq's own defaults leave a connection to a server that answers nothing (packets dropped, no
# reset) waiting for as long as the kernel's TCP retries last, a quarter of an hour and more:
# here it fails within about a minute, an error `eventpipe.errors` calls transient. A query
# parameter of DATABASE_URL of the same name overrides each.
_PG_NETWORK = {"connect_timeout": 10, "keepalives": 1, "keepalives_idle": 30,
               "keepalives_interval": 10, "keepalives_count": 3, "tcp_user_timeout": 60_000}
# A `brief` engine's caller cannot wait that long (the bridge's loop): a statement, a lock or a
# silent network keep it at most about BRIEF_S. After a long silence, the kernel's next retry
# of a connection may come a minute later: one given up on makes way for a new one.
BRIEF_S = 5
_PG_BRIEF = {"connect_timeout": BRIEF_S, "keepalives": 1, "keepalives_idle": 2,
             "keepalives_interval": 1, "keepalives_count": 3, "tcp_user_timeout": BRIEF_S * 1000}


def require_database(settings: Settings) -> None:
    """A SQLite file `DATABASE_URL` names that does not exist is a `SettingsError`, rather than
    made empty: a program run from another directory than the pipeline's would read a
    relative path there, and find nothing of it."""
    url = make_url(settings.database_url)
    if url.get_backend_name() != "sqlite" or not in_a_file(url.database):
        return
    path = Path(str(url.database))
    if not path.exists():
        relative = "" if path.is_absolute() else \
            " (a relative path is read from the working directory)"
        raise SettingsError(
            f"DATABASE_URL={redacted(settings.database_url)} names no database here: "
            f"{path.absolute()} does not exist{relative}: run this where the pipeline "
            f"runs, or `eventpipe migrate` to make it")


def _milliseconds(seconds: float) -> int:
    """A timeout as the servers count it: 0 is none, so a positive one is at least 1 ms."""
    if seconds <= 0:
        return 0
    return min(max(1, math.ceil(round(seconds * 1000, 6))), MAX_DATABASE_TIMEOUT_MS)


def make_engine(settings: Settings, *, writer: bool = True, create: bool = True,
                synced: bool = True, brief: bool = False) -> Engine:
    """An engine for `settings.database_url`.

    `writer` engines on SQLite take their turn among the writers (`eventpipe.sqlite_turns`)
    and the write lock when a transaction begins, so the read-then-write of a batch never
    fails halfway on a lock upgrade; readers don't. Without `create`, a SQLite file that does
    not exist is a `SettingsError` (`require_database`). Without `synced`,
    a commit on SQLite or PostgreSQL returns before it is on disk (a crash may take back the
    last ones, never part of one): for writes that a crash may lose, as the bridge's positions.
    A `brief` engine gives up within about `BRIEF_S` on a statement, a lock or a database
    that answers nothing (PostgreSQL, SQL Server).
    """
    url = make_url(settings.database_url)
    options: dict[str, Any] = {"pool_pre_ping": True}
    backend = url.get_backend_name()
    statement_ms = _milliseconds(settings.database_statement_timeout_s)
    lock_ms = _milliseconds(settings.database_lock_timeout_s)
    if brief:
        statement_ms = min(statement_ms or BRIEF_S * 1000, BRIEF_S * 1000)
        lock_ms = min(lock_ms or BRIEF_S * 1000, BRIEF_S * 1000)
    if backend == "sqlite":
        options["connect_args"] = {"timeout": lock_ms / 1000 if lock_ms else 3600.0,
                                   "check_same_thread": False,
                                   # Compiled statements kept: a batch's writes use some
                                   # 120 texts (`upserts.sqlite_page`), the rest room.
                                   "cached_statements": 256}
        if in_a_file(url.database):
            path = Path(str(url.database))
            if not create:
                require_database(settings)
            path.parent.mkdir(parents=True, exist_ok=True)
            if writer:
                options["connect_args"]["factory"] = TakesTurns
    else:
        options.update(
            pool_size=settings.database_pool_size,
            max_overflow=settings.database_max_overflow,
            pool_timeout=settings.database_pool_timeout_s,
        )
    if backend == "postgresql":
        # Timeouts end as SQLSTATE 57014 / 55P03, which `eventpipe.errors` calls transient. A
        # transaction idle five times as long as a statement may run (5 minutes by default)
        # is one whose worker froze or lost its host: the server ends it, and the locks it
        # held, which held up the partition's next owner, go with it.
        # In UTC whatever the server's zone: psycopg gives times in the session's, and a time
        # the contract accepts (up to 9999-12-31T23:59:59Z) is past year 9999 east of it. In
        # ISO whatever the server's date style: psycopg reads times in no other.
        server = (f"-c statement_timeout={statement_ms} -c lock_timeout={lock_ms} "
                  "-c timezone=UTC -c datestyle=ISO")
        if not synced:
            server += " -c synchronous_commit=off"
        if statement_ms:
            idle_ms = min(statement_ms * 5, MAX_DATABASE_TIMEOUT_MS)
            server += f" -c idle_in_transaction_session_timeout={idle_ms}"
        options["connect_args"] = {"options": server,
                                   # Planned for the tables as they are at each execution:
                                   # a prepared statement's generic plan, made while a table
                                   # was small, kept scanning it whole as it grew. Only those
                                   # marked `PREPARED` are prepared (`_prepared`); with any
                                   # other threshold an `executemany` prepares what it runs.
                                   "prepare_threshold": None,
                                   # Any text the contract takes, whatever the database's
                                   # default (`ALTER DATABASE … SET client_encoding`).
                                   "client_encoding": "UTF8",
                                   **{name: value for name, value in
                                      (_PG_BRIEF if brief else _PG_NETWORK).items()
                                      if name not in url.query}}
    if backend == "mssql":
        # One round trip for a whole executemany instead of one per row.
        options["fast_executemany"] = True
    engine = create_engine(url, **options)
    event.listen(engine, "handle_error", _standby_means_new_connections)
    if backend == "sqlite":
        _configure_sqlite(engine, writer=writer, busy_ms=lock_ms or 3_600_000, synced=synced)
    elif backend == "postgresql" and settings.database_prepared_statements == "on":
        event.listen(engine, "connect", _names_of_its_own)
        event.listen(engine, "do_execute", _prepared)
    elif backend == "mssql":
        # Whole seconds there, 0 none: a limit under half a second was none at all.
        _configure_mssql(engine, statement_s=math.ceil(statement_ms / 1000),
                         lock_ms=lock_ms or -1)
    return engine


def _names_of_its_own(dbapi_connection: Any, record: Any) -> None:
    """Give the connection's prepared statements names no other connection uses. psycopg
    names them `_pg3_0`, `_pg3_1` … on every connection: behind a pooler in transaction mode
    that does not keep each client's statements apart, a server connection holding another
    client's `_pg3_0` ran it in place of this one's, or refused this one's as a duplicate. By
    names of its own, a connection's statement is the one it prepared or none (26000, and
    `_prepared` gives up). psycopg never names two statements of a connection alike. A psycopg
    whose record is not as this knows it gets no prepared statements."""
    manager: Any = getattr(dbapi_connection, "_prepared", None)  # what psycopg prepared
    if isinstance(getattr(manager, "_prepared_idx", None), int):
        manager._prepared_idx = secrets.randbits(60)
    else:
        record.info[_GAVE_UP] = True


def _prepared(cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
    """Execute a statement marked `PREPARED` as a prepared one (psycopg): parsed and planned
    once per connection rather than at every execution."""
    if not context.execution_options.get("prepared"):
        return False
    info = context.root_connection.info  # the DBAPI connection's, cleared when it is closed
    if info.get(_GAVE_UP):
        return False
    driver = cursor.connection
    driver.prepare_threshold = _ONLY_WHEN_ASKED
    try:
        cursor.execute(statement, parameters, prepare=True)
    except Exception as exc:
        if prepared_statement_failed(exc):
            # A pooler between that does not keep this connection's statements, or a
            # migration that changed what one returns (which a pooler keeping them would
            # go on answering from its own). The error is transient (`eventpipe.errors`):
            # the work is retried, on a connection that prepares nothing more.
            info[_GAVE_UP] = True
            state = sqlstate(exc)
            log.warning("PostgreSQL could not run a prepared statement of this connection "
                        "(SQLSTATE %s: %s); this connection prepares no more statements", state,
                        "a migration changed what it returns" if state == "0A000" else
                        "a connection pooler in transaction mode does not keep them")
        raise
    finally:
        driver.prepare_threshold = None
    return True


def _standby_means_new_connections(context: ExceptionContext) -> None:
    """A server that takes no writes (a standby, a secondary) is one a failover left the
    pool's connections on, or a name not moved yet: every connection to it fails the same way,
    and passes the pool's ping. Taken as a disconnect, the error makes the pool drop them all;
    new ones go where the database's name leads now."""
    if isinstance(context.sqlalchemy_exception, DBAPIError) \
            and read_only(context.original_exception):
        context.is_disconnect = True


def _configure_mssql(engine: Engine, *, statement_s: int, lock_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Query timeout (HYT00) and lock timeout (error 1222): both transient, retried.
        dbapi_connection.timeout = statement_s
        cursor = dbapi_connection.cursor()
        cursor.execute(f"SET LOCK_TIMEOUT {int(lock_ms)}")
        cursor.close()


def _configure_sqlite(engine: Engine, *, writer: bool, busy_ms: int, synced: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event emit BEGIN instead of pysqlite's implicit one.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # synchronous=FULL: a commit is on disk before it returns. With NORMAL a power loss
        # can roll back a commit whose offsets Kafka has already passed: events lost.
        # wal_autocheckpoint: the commit that finds this many pages (4 KiB each) in the WAL
        # copies them into the database, within its writer's turn. At SQLite's 1,000, pages
        # the batches write again and again (the stock rows, the indexes' upper levels, the
        # reconciler's queue) were copied and the database synced every few batches: at 8,000
        # the shipped SQLite run went up in each of nine interleaved pairs, the workers' CPU
        # per message down; the WAL peaked at 42–46 MiB in its runs, however long
        # (docs/performance.md).
        for pragma in ("journal_mode=WAL", f"synchronous={'FULL' if synced else 'NORMAL'}",
                       "foreign_keys=ON",
                       f"busy_timeout={int(busy_ms)}", f"wal_autocheckpoint={WAL_PAGES}"):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        options = conn.get_execution_options()
        if (writer and not options.get(_READ_ONLY)) or options.get(_WRITES):
            begin_writing(conn)
        else:
            conn.exec_driver_sql("BEGIN")


# Connection options: its transactions only read (`reading`), or write too (`writes`).
_READ_ONLY = "eventpipe_read_only"
_WRITES = "eventpipe_writes"


def writes(engine: Engine) -> Engine:
    """`engine`'s pool, for transactions that read then write. A reader's transaction on
    SQLite begins without the write lock, and once another connection has committed since it
    read, SQLite refuses it the lock at once (whatever the busy timeout): these take the
    lock as they begin, waiting for it, as a writer's do. Other databases are unchanged."""
    return engine.execution_options(**{_WRITES: True})


@contextmanager
def reading(engine: Engine) -> Iterator[Connection]:
    """A transaction that only reads. A writer's engine on SQLite then takes neither its turn
    among the writers nor the write lock (the writers go on meanwhile, as WAL lets them), and
    the transaction reads one snapshot."""
    with engine.connect() as conn:
        conn.execution_options(**{_READ_ONLY: True})
        with conn.begin():
            yield conn


def alone(engine: Engine, name: str) -> AbstractContextManager[bool]:
    """Whether the block runs alone among those named `name` on this database, for work that
    spans transactions: on a SQLite file, a file lock beside it (`<database>-<name>`) taken at
    once or not at all; elsewhere always True (callers lock within each transaction)."""
    database = engine.url.database
    if engine.dialect.name == "sqlite" and in_a_file(database):
        return sqlite_turns.alone(f"{database}-{name}")
    return nullcontext(True)


# The query parameters that are a password (libpq's, redis-py's), and an ODBC string's
# attribute that is one (`odbc_connect`: `PWD=secret` or `PWD={se;cret}`), case aside.
_SECRET_PARAMETERS = frozenset({"password", "passwd", "pwd"})
_ODBC_SECRET = re.compile(r"(?i)((?:^|;)\s*(?:pwd|password)\s*=\s*)(?:\{(?:[^}]|\}\})*\}|[^;]*)")


def redacted(url: str) -> str:
    """A service URL fit for logs and messages: the password masked, in the user part and in
    the query (`?password=…`, an `odbc_connect` string's `PWD=…`); the rest as it was."""
    try:
        shown = make_url(url).render_as_string(hide_password=True)
    except ArgumentError:  # not SQLAlchemy's form (a Redis URL of an odd shape)
        shown = url
    head, mark, query = shown.partition("?")
    if not mark:
        return shown
    return f"{head}?{'&'.join(_masked(parameter) for parameter in query.split('&'))}"


def _masked(parameter: str) -> str:
    name, equals, value = parameter.partition("=")
    key = unquote_plus(name).lower()
    if equals and key in _SECRET_PARAMETERS:
        return f"{name}=***"
    if equals and key == "odbc_connect":  # shown decoded: an ODBC string reads so
        return f"{name}=" + _ODBC_SECRET.sub(r"\1***", unquote_plus(value))
    return parameter

"""Engines for the three supported databases, configured for how this pipeline uses them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

from eventpipe.settings import Settings


def make_engine(settings: Settings, *, writer: bool = True) -> Engine:
    """An engine for `settings.database_url`.

    `writer` engines on SQLite take the write lock when a transaction begins, so the
    read-then-write of a batch never fails halfway on a lock upgrade; readers don't.
    """
    url = make_url(settings.database_url)
    options: dict[str, Any] = {"pool_pre_ping": True}
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        options["connect_args"] = {"timeout": 30, "check_same_thread": False}
    else:
        options.update(
            pool_size=settings.database_pool_size,
            max_overflow=settings.database_max_overflow,
            pool_timeout=settings.database_pool_timeout_s,
        )
    if url.get_backend_name() == "mssql":
        # One round trip for a whole executemany instead of one per row.
        options["fast_executemany"] = True
    engine = create_engine(url, **options)
    if url.get_backend_name() == "sqlite":
        _configure_sqlite(engine, writer=writer)
    return engine


def _configure_sqlite(engine: Engine, *, writer: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event emit BEGIN instead of pysqlite's implicit one.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON",
                       "busy_timeout=30000"):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if writer else "BEGIN")

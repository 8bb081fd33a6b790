"""Throwaway PostgreSQL databases: created empty on the test server, dropped afterwards."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.support.services import require_postgres


def new_database(prefix: str = "eventpipe_test", *, icu_locale: str | None = None) -> str:
    """A fresh, empty PostgreSQL database; its URL. Drop it with `drop_database`.
    `icu_locale`: its default collation a language's (`en-US`), not the server's."""
    admin_url = require_postgres()
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    collated = (f" TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE '{icu_locale}'"
                if icu_locale else "")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"{collated}'))
    finally:
        admin.dispose()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def drop_database(url: str) -> None:
    admin = create_engine(require_postgres(), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)'))
    finally:
        admin.dispose()


@contextmanager
def postgres_database(prefix: str = "eventpipe_test", *,
                      icu_locale: str | None = None) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for the duration of the block; yields its URL."""
    url = new_database(prefix, icu_locale=icu_locale)
    try:
        yield url
    finally:
        drop_database(url)

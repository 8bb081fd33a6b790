"""Shared fixtures. Integration tests use the machine's real services; a missing one fails."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import Engine

from eventpipe.database import make_engine
from eventpipe.settings import Settings
from eventpipe.tables import metadata
from tests.support.databases import postgres_database
from tests.support.services import REDIS_URL, migrate, unavailable

ROOT = Path(__file__).resolve().parent.parent
# A developer's own `.env` must not change what the tests see: point at a file that is not.
os.environ.setdefault("EVENTPIPE_ENV_FILE", str(ROOT / "tests" / "no-such.env"))


@pytest.fixture(scope="session")
def postgresql_url() -> Iterator[str]:
    """A fresh PostgreSQL database, migrated to head, dropped after the session."""
    with postgres_database() as url:
        migrate(url, "head")
        yield url


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'eventpipe.db'}"
    migrate(url, "head")
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    """Each test that uses it runs once per database the project supports live."""
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(Settings(database_url=database_url))
    _truncate(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    """The machine's Redis; tests keep apart by the key names they use."""
    connection = redis.Redis.from_url(REDIS_URL)
    try:
        connection.ping()
    except redis.RedisError as exc:
        unavailable("Redis", REDIS_URL, exc)
    yield connection
    connection.close()


def _truncate(engine: Engine) -> None:
    with engine.begin() as conn:
        for table in reversed(metadata.sorted_tables):
            conn.execute(table.delete())


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Anything under tests/integration talks to real services and is marked so.
    for item in items:
        if "integration" in Path(str(item.fspath)).parts:
            item.add_marker(pytest.mark.integration)


"""Reaching the real services the integration tests need, and failing loudly when one is missing.

A missing service fails the test that needs it (never a skip), naming the service, where it
was looked for and the `TEST_*` variable that points elsewhere.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest
from sqlalchemy import create_engine, text

from eventpipe.migrations import upgrade

POSTGRES_ADMIN_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379")


def unavailable(service: str, target: str, exc: BaseException) -> NoReturn:
    pytest.fail(
        f"{service} is not reachable at {target} ({exc.__class__.__name__}: {exc}). "
        f"Integration tests need it: start it, or point the TEST_* variable at one.",
        pytrace=False,
    )


def require_postgres() -> str:
    try:
        engine = create_engine(POSTGRES_ADMIN_URL)
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
    except Exception as exc:
        unavailable("PostgreSQL", POSTGRES_ADMIN_URL, exc)
    return POSTGRES_ADMIN_URL


def migrate(url: str, revision: str = "head") -> None:
    upgrade(url, revision)

"""Reaching the real services the integration tests need, and failing loudly when one is missing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parent.parent
POSTGRES_ADMIN_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379")


def unavailable(service: str, target: str, exc: BaseException) -> None:
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


def alembic_config(url: str | None = None) -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "alembic"))
    config.attributes["configure_logger"] = False
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def migrate(url: str, revision: str) -> None:
    command.upgrade(alembic_config(url), revision)

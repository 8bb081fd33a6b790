"""Events per second through `apply_batch`, by database and batch size."""

from __future__ import annotations

import tempfile
import time
import uuid
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from eventpipe.apply import apply_batch
from eventpipe.database import make_engine
from eventpipe.effects import Position, Received
from eventpipe.events import parse_event
from eventpipe.positions import Done
from eventpipe.samples import Story, encode
from eventpipe.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
POSTGRES_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def _migrate(url: str) -> None:
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["configure_logger"] = False
    config.set_main_option("sqlalchemy.url", url)
    command.upgrade(config, "head")


def _measure(url: str, label: str, count: int, batch_size: int) -> None:
    _migrate(url)
    story = Story(seed=batch_size)
    events = [
        Received.of(parse_event(encode(doc), key), Position("bench", 0, offset))
        for offset, (key, doc) in enumerate(story.next() for _ in range(count))
    ]
    engine = make_engine(Settings(database_url=url))
    started = time.perf_counter()
    for start in range(0, count, batch_size):
        batch = events[start : start + batch_size]
        # As a worker does: the batch's offsets recorded with its fates.
        apply_batch(engine, batch, done=Done("bench", "", 0, range(start, start + len(batch))))
    elapsed = time.perf_counter() - started
    engine.dispose()
    print(f"apply: {label:10s} batch {batch_size:4d}: {count / elapsed:8,.0f} events/s")


def run(count: int = 20_000) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for batch_size in (1, 100, 500):
            n = count // 10 if batch_size == 1 else count
            _measure(f"sqlite:///{tmp}/bench-{batch_size}.db", "sqlite", n, batch_size)
    admin = create_engine(POSTGRES_ADMIN, isolation_level="AUTOCOMMIT")
    for batch_size in (1, 100, 500):
        name = f"eventpipe_bench_{uuid.uuid4().hex[:8]}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            url = make_url(POSTGRES_ADMIN).set(database=name).render_as_string(False)
            n = count // 10 if batch_size == 1 else count
            _measure(url, "postgresql", n, batch_size)
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    admin.dispose()

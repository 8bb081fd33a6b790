"""How PostgreSQL runs a batch's statements: each key's rows reached through an index, never by
reading a whole table, whatever the tables' statistics say. A batch's cost must not grow with
the tables: a backfill into a fresh database (no statistics yet: autovacuum analyses a table
a minute at the earliest) would otherwise read every table once more per batch, each batch
slower than the last."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from eventpipe.apply import apply_batch, apply_in
from eventpipe.database import make_engine
from eventpipe.effects import Fate
from eventpipe.events import EventType
from eventpipe.samples import Document, Story, order_placed, user_created
from eventpipe.settings import Settings
from tests.support.databases import postgres_database
from tests.support.factories import received
from tests.support.services import migrate

EARLIER = 4000  # events applied before the batch observed
BATCH = 500  # the shipped batch size
# The tables every event makes grow. The dead letters grow with failures only: empty here,
# where reading the whole of it is the cheapest plan.
GROWING = {"applied_events", "users", "orders", "order_items", "payments", "inventory"}


def older_users(earlier: list[tuple[str, Document]], count: int) -> list[tuple[str, Document]]:
    """Versions of users created earlier, older than theirs (each to be found stale)."""
    created = [doc for _, doc in earlier if doc["eventType"] == EventType.USER_CREATED]
    return [user_created(doc["data"]["userId"], email=doc["data"]["email"],
                         occurred_at=datetime.fromisoformat(doc["occurredAt"]) - timedelta(days=1))
            for doc in random.Random(4).sample(created, count)]


def newer_orders(earlier: list[tuple[str, Document]], count: int) -> list[tuple[str, Document]]:
    """New versions of orders placed earlier, with one line each (the others to be deleted)."""
    placed = [doc["data"] for _, doc in earlier if doc["eventType"] == EventType.ORDER_PLACED]
    now = datetime.now(UTC)
    return [order_placed(data["orderId"], data["userId"], currency=data["currency"],
                         items=[("SKU-NEW", 1, "1.00")], occurred_at=now)
            for data in random.Random(3).sample(placed, count)]


@pytest.mark.parametrize("analysed", [False, True], ids=["no-statistics", "analysed"])
def test_a_batch_reaches_the_rows_of_its_keys_by_index(analysed: bool) -> None:
    with postgres_database() as url:
        migrate(url, "head")
        story = Story(seed=11)
        earlier = [story.next() for _ in range(EARLIER)]
        engine = make_engine(Settings(database_url=url))
        try:
            if not analysed:  # however long the run, no statistics come in the middle of it
                with engine.begin() as conn:
                    for table in GROWING:
                        conn.execute(text(f"ALTER TABLE {table} SET (autovacuum_enabled = off)"))
            for start in range(0, EARLIER, BATCH):
                apply_batch(engine, received(*earlier[start:start + BATCH]))
            if analysed:
                with engine.connect() as conn:
                    conn.execute(text("COMMIT"))
                    conn.execute(text("ANALYZE"))
        finally:
            engine.dispose()
        # A connection of its own: a backend's counts of earlier transactions may be unsent.
        engine = make_engine(Settings(database_url=url))
        try:
            rewritten, stale = newer_orders(earlier, 40), older_users(earlier, 50)
            fresh = [story.next() for _ in range(BATCH - 40 - 50 - 50)]
            batch = received(*fresh, *rewritten, *stale, *earlier[::EARLIER // 50])
            with engine.begin() as conn:
                fates = apply_in(conn, batch, [], worker="test", applied_at=datetime.now(UTC)
                                 ).fates
                scans: dict[str, int] = dict(conn.execute(text(
                    "SELECT relname, seq_scan FROM pg_stat_xact_user_tables")).all())
                lines = conn.execute(text(
                    "SELECT count(*) FROM order_items WHERE order_id = ANY(:ids)"),
                    {"ids": [key for key, _ in rewritten]}).scalar_one()
                outcomes = conn.execute(text(
                    "SELECT outcome FROM applied_events WHERE event_id = ANY(:ids)"),
                    {"ids": [doc["eventId"] for _, doc in stale]}).scalars().all()
        finally:
            engine.dispose()
    assert fates.count(Fate.DUPLICATE) == 50 and fates.count(Fate.STALE) == 50
    assert lines == 40 and outcomes == [Fate.STALE.value] * 50
    assert {table: scans[table] for table in GROWING if scans[table]} == {}

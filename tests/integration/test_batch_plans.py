"""How PostgreSQL runs a batch's statements: each key's rows reached through an index, never by
reading a whole table, whatever the tables' statistics say. A batch's cost must not grow with
the tables: a backfill into a fresh database (no statistics yet: autovacuum analyses a table
a minute at the earliest) would otherwise read every table once more per batch, each batch
slower than the last."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Connection, Engine, text

from eventpipe.apply import apply_batch, apply_in
from eventpipe.database import make_engine
from eventpipe.effects import Fate
from eventpipe.events import EventType
from eventpipe.samples import (
    Document,
    Story,
    inventory_adjusted,
    order_placed,
    payment_settled,
    user_created,
)
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
                _without_statistics(engine)
            _apply(engine, earlier)
            if analysed:
                with engine.connect() as conn:
                    conn.execute(text("COMMIT"))
                    conn.execute(text("ANALYZE"))
            _observe(engine, story, earlier)
        finally:
            engine.dispose()


def test_statements_prepared_while_the_tables_were_empty_still_reach_rows_by_index() -> None:
    """The writes PostgreSQL plans once per connection (`eventpipe.database.PREPARED`), run
    here on the one connection every batch takes, more often on the empty tables than the
    five custom plans PostgreSQL makes before it weighs a generic one: the batch that comes
    after thousands of events, run with the generic plans made then, still reaches each row
    through its key."""
    with postgres_database() as url:
        migrate(url, "head")
        story = Story(seed=11)
        earlier = [story.next() for _ in range(EARLIER)]
        engine = make_engine(Settings(database_url=url, database_pool_size=1,
                                      database_max_overflow=0))
        try:
            _without_statistics(engine)
            for number in range(8):  # every table a batch writes, in each batch
                user, order, payment = (f"early-{kind}-{number}" for kind in "uop")
                apply_batch(engine, received(
                    user_created(user), order_placed(order, user),
                    payment_settled(payment, order, "10.00"),
                    inventory_adjusted(f"SKU-EARLY-{number}", 3)))
            with engine.begin() as conn:
                planned_early = _prepared(conn)
            _apply(engine, earlier)
            used = _observe(engine, story, earlier)
        finally:
            engine.dispose()
    assert used and used.items() <= planned_early.items()


def _without_statistics(engine: Engine) -> None:
    with engine.begin() as conn:
        for table in GROWING:
            conn.execute(text(f"ALTER TABLE {table} SET (autovacuum_enabled = off)"))


def _apply(engine: Engine, events: list[tuple[str, Document]]) -> None:
    for start in range(0, len(events), BATCH):
        apply_batch(engine, received(*events[start:start + BATCH]))


def _observe(engine: Engine, story: Story, earlier: list[tuple[str, Document]]
             ) -> dict[str, datetime]:
    """A batch of new events, new versions, stale ones and duplicates of `earlier`: each of
    its keys' rows reached through an index, none of the growing tables read whole. The
    prepared statements it ran with their generic plan, and when each was prepared."""
    rewritten, stale = newer_orders(earlier, 40), older_users(earlier, 50)
    fresh = [story.next() for _ in range(BATCH - 40 - 50 - 50)]
    batch = received(*fresh, *rewritten, *stale, *earlier[::len(earlier) // 50][:50])
    with engine.begin() as conn:
        # The counts of the backend's earlier transactions may be unsent, and show here too.
        before, generic = _table_scans(conn), _generic_plans(conn)
        fates = apply_in(conn, batch, [], worker="test", applied_at=datetime.now(UTC)).fates
        scans = {table: count - before.get(table, 0)
                 for table, count in _table_scans(conn).items()}
        ran_generic = {statement for statement, count in _generic_plans(conn).items()
                       if count > generic.get(statement, 0)}
        prepared = {statement: at for statement, at in _prepared(conn).items()
                    if statement in ran_generic}
        lines = conn.execute(text(
            "SELECT count(*) FROM order_items WHERE order_id = ANY(:ids)"),
            {"ids": [key for key, _ in rewritten]}).scalar_one()
        outcomes = conn.execute(text(
            "SELECT outcome FROM applied_events WHERE event_id = ANY(:ids)"),
            {"ids": [doc["eventId"] for _, doc in stale]}).scalars().all()
    assert fates.count(Fate.DUPLICATE) == 50 and fates.count(Fate.STALE) == 50
    assert lines == 40 and outcomes == [Fate.STALE.value] * 50
    assert {table: scans[table] for table in GROWING if scans[table]} == {}
    return prepared


def _prepared(conn: Connection) -> dict[str, datetime]:
    """The statements the connection holds prepared, and when each was."""
    rows = conn.execute(text("SELECT statement, prepare_time FROM pg_prepared_statements"))
    return {row.statement: row.prepare_time for row in rows}


def _generic_plans(conn: Connection) -> dict[str, int]:
    """How many times the connection ran each of its prepared statements with a generic
    plan."""
    rows = conn.execute(text("SELECT statement, generic_plans FROM pg_prepared_statements"))
    return {row.statement: row.generic_plans for row in rows}


def _table_scans(conn: Connection) -> dict[str, int]:
    """Sequential scans of each table this transaction made."""
    rows = conn.execute(text("SELECT relname, seq_scan FROM pg_stat_xact_user_tables"))
    return {row.relname: row.seq_scan for row in rows}

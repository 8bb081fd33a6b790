"""SQLite's batch writes convert their values themselves (`eventpipe.upserts.sqlite_values`):
what they hand the driver must be what SQLAlchemy's column types hand it, value and type, or
the version guard (times compared as text) and every reader would see two spellings of one
value. `tests/integration/test_apply.py` writes through them on a real database."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import Table
from sqlalchemy.dialects import sqlite

from eventpipe.tables import applied_events, inventory, order_items, orders, payments, users
from eventpipe.upserts import _SQLITE_CONVERT, sqlite_insert, sqlite_page, sqlite_values

DIALECT = sqlite.dialect()

zones = st.builds(lambda minutes: timezone(timedelta(minutes=minutes)),
                  st.integers(min_value=-23 * 60 - 59, max_value=23 * 60 + 59))
times = st.datetimes(min_value=datetime(2, 1, 1), max_value=datetime(9998, 12, 31),
                     timezones=st.just(UTC) | zones)
money = st.decimals(min_value=0, max_value=Decimal("99999999999999.9999"), places=4)


def as_sqlalchemy_stores(table: Table, row: Mapping[str, object]) -> tuple[object, ...]:
    values = []
    for column in table.columns:
        process = column.type.dialect_impl(DIALECT).bind_processor(DIALECT)
        value = row[column.name]
        values.append(value if process is None else process(value))
    return tuple(values)


def typed(values: tuple[object, ...]) -> list[tuple[type, object]]:
    """`1`, `1.0` and `True` compare equal: the driver stores them differently."""
    return [(type(value), value) for value in values]


@pytest.mark.parametrize("table", [applied_events, users, orders, payments, order_items,
                                   inventory],
                         ids=lambda table: table.name)
def test_every_column_sqlalchemy_would_convert_is_converted(table: Table) -> None:
    unconverted = [column.name for column in table.columns
                   if column.type.dialect_impl(DIALECT).bind_processor(DIALECT) is not None
                   and type(column.type) not in _SQLITE_CONVERT]
    assert unconverted == []


@given(times, times, st.text(min_size=1, max_size=20))
def test_times_are_stored_as_sqlalchemy_stores_them(occurred: datetime, applied: datetime,
                                                     event_id: str) -> None:
    row = {"event_id": event_id, "event_type": "UserCreated", "outcome": "applied",
           "fingerprint": None, "kafka_topic": "events", "kafka_partition": 3,
           "kafka_offset": 2**40, "occurred_at": occurred, "applied_at": applied,
           "worker": None}
    assert typed(sqlite_values(applied_events, [row])) == typed(
        as_sqlalchemy_stores(applied_events, row))


@given(money, times)
def test_money_is_stored_as_sqlalchemy_stores_it(total: Decimal, placed: datetime) -> None:
    row = {"order_id": "o1", "user_id": "u1", "total_amount": total, "currency": "EUR",
           "placed_at": placed, "version_at": placed, "version_event_id": "e1",
           "updated_at": placed}
    assert typed(sqlite_values(orders, [row])) == typed(as_sqlalchemy_stores(orders, row))


def test_a_naive_time_is_refused_as_sqlalchemy_refuses_it() -> None:
    row = {"user_id": "u1", "email": "a@b.c", "name": "A", "created_at": datetime(2026, 1, 1),
           "version_at": datetime(2026, 1, 1, tzinfo=UTC), "version_event_id": "e1",
           "updated_at": datetime(2026, 1, 1, tzinfo=UTC)}
    with pytest.raises(ValueError, match="naive datetime"):
        sqlite_values(users, [row])
    with pytest.raises(ValueError, match="naive datetime"):
        as_sqlalchemy_stores(users, row)


def test_the_rows_follow_each_other_in_column_order() -> None:
    lines = [{"order_id": "o1", "line_no": n, "sku": f"S{n}", "quantity": n,
              "unit_price": Decimal("1.5")} for n in (1, 2)]
    assert sqlite_values(order_items, lines) == ("o1", 1, "S1", 1, "1.5", "o1", 2, "S2", 2, "1.5")
    sql = sqlite_insert(order_items, "", False, 2)
    assert sql.count("?") == 10 and sql.startswith(
        "INSERT INTO order_items (order_id, line_no, sku, quantity, unit_price) VALUES (?, ")


@given(st.lists(st.tuples(st.sampled_from([Decimal("1.5"), Decimal("1.50"), Decimal("1.500")]),
                          st.sampled_from([0, 1])), min_size=1, max_size=12), times)
def test_rows_sharing_values_are_each_stored_as_alone(picks: list[tuple[Decimal, int]],
                                                      applied: datetime) -> None:
    """A value converted once for the rows that hold the same object (the time a batch is
    applied at); an equal value of another object is stored as written (`1.50`, not `1.5`)."""
    shared = [applied, applied.astimezone(timezone(timedelta(hours=5)))]  # equal, two objects
    rows = [{"order_id": f"o{n}", "user_id": "u1", "total_amount": Decimal(str(total)),
             "currency": "EUR", "placed_at": shared[which], "version_at": applied,
             "version_event_id": "e1", "updated_at": shared[1 - which]}
            for n, (total, which) in enumerate(picks)]
    alone = [value for row in rows for value in as_sqlalchemy_stores(orders, row)]
    assert typed(sqlite_values(orders, rows)) == typed(tuple(alone))


@given(st.integers(min_value=1, max_value=5000), st.integers(min_value=1, max_value=1000))
def test_a_batch_s_rows_go_in_pages_of_a_few_sizes(rows: int, largest: int) -> None:
    """Every row once, in order, no page larger than a statement takes, and each page of at
    most 16 rows or a power of two: a table's statements have a few texts, which SQLite
    compiles once per connection."""
    pages: list[int] = []
    while (left := rows - sum(pages)) > 0:
        pages.append(sqlite_page(left, largest))
    assert sum(pages) == rows
    assert all(1 <= page <= largest and (page <= 16 or page & (page - 1) == 0) for page in pages)

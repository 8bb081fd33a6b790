"""The database ceiling: the rows a stream leaves in the database, written by the fastest
statements each database has, with no pipeline around them.

The rows are those the pipeline ends with — one `applied_events` row per distinct event, each
entity at its newest version, the items of the orders, the stock per sku — computed in
memory first (that time is not counted), then written in transactions of `CHUNK` rows per
table: COPY on PostgreSQL, executemany INSERT on SQLite. Events per second are the stream's
messages over the write time, so the figure compares with the pipeline's on the same stream.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, Table, insert

from eventpipe.apply import applied_row, item_rows, order_row, payment_row, user_row
from eventpipe.effects import Fate, Position, Received, entity_of, sum_deltas
from eventpipe.errors import InvalidEvent
from eventpipe.events import Event, EventType, parse_event
from eventpipe.tables import applied_events, inventory, order_items, orders, payments, users

CHUNK = 5_000
Rows = dict[Table, list[dict[str, Any]]]


def final_rows(messages: Iterable[tuple[bytes | None, bytes]]) -> Rows:
    """What the stream leaves in each table (invalid messages leave nothing here)."""
    now = datetime.now(UTC)
    seen: dict[str, Received] = {}
    for offset, (key, value) in enumerate(messages):
        try:
            event = parse_event(value, key)
        except InvalidEvent:
            continue
        seen.setdefault(event.event_id, Received.of(event, Position("bench", 0, offset)))
    newest: dict[tuple[str, str], Event] = {}
    deltas: list[Event] = []
    for received in seen.values():
        event = received.event
        entity = entity_of(event)
        if entity is None:
            deltas.append(event)
        elif entity not in newest or newest[entity].version < event.version:
            newest[entity] = event
    chosen = list(newest.values())
    return {
        applied_events: [applied_row(r, Fate.APPLIED, now, "ceiling") for r in seen.values()],
        users: [user_row(e, now) for e in chosen if e.event_type is EventType.USER_CREATED],
        orders: [order_row(e, now) for e in chosen if e.event_type is EventType.ORDER_PLACED],
        order_items: [item for e in chosen if e.event_type is EventType.ORDER_PLACED
                      for item in item_rows(e)],
        payments: [payment_row(e, now) for e in chosen
                   if e.event_type is EventType.PAYMENT_SETTLED],
        inventory: [{"sku": sku, "quantity": change.delta, "updated_at": change.adjusted_at}
                    for sku, change in sum_deltas(deltas).items()],
    }


def write(engine: Engine, rows: Rows) -> float:
    """Seconds to write `rows`, a transaction per chunk of each table."""
    started = time.perf_counter()
    for table, table_rows in rows.items():
        for start in range(0, len(table_rows), CHUNK):
            chunk = table_rows[start:start + CHUNK]
            with engine.begin() as conn:
                if conn.dialect.name == "postgresql":
                    _copy(conn.connection.driver_connection, table, chunk)
                else:
                    conn.execute(insert(table), chunk)
    return time.perf_counter() - started


def _copy(driver: Any, table: Table, rows: Sequence[dict[str, Any]]) -> None:
    columns = [column.name for column in table.columns]
    with driver.cursor() as cursor, cursor.copy(
            f"COPY {table.name} ({', '.join(columns)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row([row[name] for name in columns])

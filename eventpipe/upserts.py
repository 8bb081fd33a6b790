"""The write statements of a batch, per dialect: each table written by one statement per batch.

- Entities: insert the row, or overwrite the stored one only when the new version is newer —
  the guard sits in the statement itself, so two processes racing on one entity can never move
  it backwards — and return the keys actually written, which drive the order items (an
  order's items are replaced only when the order row itself was) and the applied/stale fate.
- Applied events: the claim. Inserted unless the id is already there, returning the ids this
  transaction claimed and the fingerprints of the ids recorded before (a duplicate, or an id
  reused for another payload); only the claimed events' inventory deltas are added, so a
  delta applies once even when two writers hold the same event.
- PostgreSQL: `INSERT … SELECT * FROM unnest(<one array per column>) ON CONFLICT … DO UPDATE
  … WHERE <newer> RETURNING key`, with one parameter per column whatever the batch size
  (multi-row VALUES would be new SQL text, and thousands of parameters, for every batch
  size). The entity tables are written by one statement, each a `WITH` part of it, and the
  items of the orders written by one more: two round trips where there were five. The claim
  and the reading of the fingerprints recorded before are one statement too.
- SQLite: the same `INSERT … ON CONFLICT … RETURNING key`, the rows as one multi-row `VALUES`
  per page of parameters, converted here rather than by SQLAlchemy (see the SQLite section).
- SQL Server: the rows go to a `#staging` table (fast_executemany), then one
  `MERGE … WITH (HOLDLOCK) … OUTPUT inserted.key` — HOLDLOCK makes MERGE safe against a
  concurrent insert of the same key.
Rows are sorted by key before every write, so writers touching the same keys lock them in the
same order (fewer deadlocks).
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import UTC, datetime
from functools import cache, lru_cache
from operator import itemgetter
from typing import Any, NamedTuple

from sqlalchemy import (
    Column,
    Connection,
    MetaData,
    Table,
    bindparam,
    delete,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.schema import CreateTable

from eventpipe.database import PREPARED
from eventpipe.keysets import Keyed
from eventpipe.pg_arrays import pg_array_text
from eventpipe.sqltypes import Money, UtcDateTime, code_point_tsql
from eventpipe.tables import applied_events, inventory, order_items, orders, reconcile_queue

Rows = Sequence[dict[str, Any]]


def _key(table: Table) -> str:
    [column] = table.primary_key.columns
    return column.name


def _sorted(table: Table, rows: Rows) -> list[dict[str, Any]]:
    key = _key(table)
    return sorted(rows, key=lambda row: row[key])


# The conflict clauses PostgreSQL and SQLite share. The guard: the new version is above the
# stored one (SQLite compares the times as text, stored fixed-width, so in order).
_GUARD = ("{t}.version_at < excluded.version_at OR ({t}.version_at = excluded.version_at "
          "AND {t}.version_event_id < excluded.version_event_id)")


@cache
def entity_conflict(table: Table) -> str:
    """An entity's upsert: overwrite the stored row only with a newer version."""
    key = _key(table)
    values = ", ".join(f"{c.name} = excluded.{c.name}" for c in table.columns if c.name != key)
    return (f"ON CONFLICT ({key}) DO UPDATE SET {values} "
            f"WHERE {_GUARD.format(t=table.name)}")


CLAIM_CONFLICT = "ON CONFLICT (event_id) DO NOTHING"
# Stock: a delta added, the latest time kept (`GREATEST` on PostgreSQL, `max` on SQLite).
_INVENTORY_CONFLICT = ("ON CONFLICT (sku) DO UPDATE SET quantity = inventory.quantity + "
                       "excluded.quantity, updated_at = {latest}(inventory.updated_at, "
                       "excluded.updated_at)")

# The same guard in SQL Server's MERGE, the ids compared by code point as elsewhere.
_GUARD_TSQL = ("target.version_at < source.version_at OR (target.version_at = source.version_at "
               f"AND {code_point_tsql('target.version_event_id')} < "
               f"{code_point_tsql('source.version_event_id')})")


# The items of a batch's orders, replaced (`_replace_items`) on SQLite and SQL Server.
DELETE_ITEMS = Keyed(delete(order_items), order_items.c.order_id)


# -- SQL Server -------------------------------------------------------------------------------


def staging_table(table: Table) -> Table:
    """A session-local `#staging_<table>` with the table's columns, no constraints."""
    return Table(f"#staging_{table.name}", MetaData(),
                 *(Column(c.name, c.type, nullable=True) for c in table.columns))


def _merge_tsql(table: Table, matched: str | None, update_set: str | None,
                output: bool) -> str:
    key = _key(table)
    columns = [c.name for c in table.columns]
    when_matched = ""
    if update_set is not None:
        condition = f" AND ({matched})" if matched else ""
        when_matched = f"WHEN MATCHED{condition} THEN UPDATE SET {update_set} "
    returning = f" OUTPUT inserted.{key}" if output else ""
    return (
        f"MERGE INTO {table.name} WITH (HOLDLOCK) AS target "
        f"USING #staging_{table.name} AS source ON target.{key} = source.{key} "
        f"{when_matched}"
        f"WHEN NOT MATCHED THEN INSERT ({', '.join(columns)}) "
        f"VALUES ({', '.join(f'source.{c}' for c in columns)}){returning};"
    )


@cache
def entity_merge(table: Table) -> str:
    key = _key(table)
    update_set = ", ".join(f"{c.name} = source.{c.name}" for c in table.columns if c.name != key)
    return _merge_tsql(table, _GUARD_TSQL, update_set, output=True)


@cache
def claim_merge() -> str:
    return _merge_tsql(applied_events, None, None, output=True)


@cache
def inventory_merge() -> str:
    return _merge_tsql(
        inventory, None,
        "quantity = target.quantity + source.quantity, updated_at = CASE WHEN "
        "source.updated_at > target.updated_at THEN source.updated_at "
        "ELSE target.updated_at END",
        output=False)


def _merge_staged(conn: Connection, table: Table, rows: Rows, merge: str,
                  returning: bool = True) -> set[Any]:
    staging = staging_table(table)
    conn.execute(CreateTable(staging))
    try:
        conn.execute(insert(staging), rows)
        result = conn.execute(text(merge))
        return {row[0] for row in result} if returning else set()
    finally:
        conn.exec_driver_sql(f"DROP TABLE {staging.name}")


# -- PostgreSQL --------------------------------------------------------------------------------

# A batch looks up the rows of its keys key by key, `unnest(keys) CROSS JOIN LATERAL (…
# WHERE key = batch.key LIMIT 1)`, rather than with `key = ANY(keys)`. PostgreSQL's default
# costs price an index probe as a read from disk: for a batch's few hundred keys they planned
# `= ANY`, and a `DELETE … USING` the keys, as a scan of the whole table once it held tens of
# thousands of rows (43,000 events, analysed or not), so each batch cost more than the one
# before. The `LIMIT` (or `OFFSET 0`) keeps the lookup from being merged into a join, so it
# stays one index probe per key whatever the table's statistics (below a thousand rows or so
# the planner may read the table instead, which at that size costs about as much).

_PG_ARRAY_TYPES = {"DateTime": "timestamptz", "Numeric": "numeric", "Integer": "int",
                   "BigInteger": "bigint", "Boolean": "boolean"}


def _pg_array_type(column: Column[Any]) -> str:
    impl = getattr(column.type, "impl", column.type)
    return _PG_ARRAY_TYPES.get(type(impl).__name__, "text")


def _as_text(column: Column[Any]) -> bool:
    """Whether the column's array goes in PostgreSQL's text form, built by `pg_array_text`
    (`%s`), or as psycopg dumps it (`%b`): times, whose text would cost more to spell than
    their binary form to dump."""
    return _pg_array_type(column) != "timestamptz"


@cache
def _pg_columns(table: Table) -> tuple[tuple[str, bool], ...]:
    """Each column's name, and whether its array goes as text."""
    return tuple((c.name, _as_text(c)) for c in table.columns)


@cache
def pg_unnest_insert(table: Table, conflict: str, returning: bool) -> str:
    """`INSERT … SELECT * FROM unnest(%s::type[], …) <conflict> [RETURNING key]` (`%b` for
    the times, which psycopg dumps)."""
    columns = list(table.columns)
    arrays = ", ".join(f"{'%s' if _as_text(c) else '%b'}::{_pg_array_type(c)}[]"
                       for c in columns)
    sql = (f"INSERT INTO {table.name} ({', '.join(c.name for c in columns)}) "
           f"SELECT * FROM unnest({arrays}) {conflict}")
    return sql + (f" RETURNING {_key(table)}" if returning else "")


@cache
def pg_write_entities(tables: tuple[Table, ...]) -> str:
    """One statement writing the rows of these entity tables (one array per column, table by
    table), each table a `WITH` part with the version guard, and queueing the keys written
    for the reconciler (the last parameter is the queue row's time); `(table, key)` of every
    row written."""
    parts = [f"w{number} AS ({pg_unnest_insert(table, entity_conflict(table), True)})"
             for number, table in enumerate(tables)]
    keys = ", ".join(f"'{table.name}', (SELECT coalesce(json_agg({_key(table)} ORDER BY "
                     f"{_key(table)}), '[]') FROM w{number})"
                     for number, table in enumerate(tables))
    any_written = " OR ".join(f"EXISTS (SELECT FROM w{number})" for number in range(len(tables)))
    queued = (f"queued AS (INSERT INTO reconcile_queue (keys, created_at) "
              f"SELECT json_build_object({keys})::text, %b::timestamptz WHERE {any_written})")
    written = [f"SELECT '{table.name}', {_key(table)} FROM w{number}"
               for number, table in enumerate(tables)]
    return f"WITH {', '.join([*parts, queued])} {' UNION ALL '.join(written)}"


@cache
def pg_claim() -> str:
    """The claim (one array per `applied_events` column, then the event ids again, each
    once), returning `(event_id, NULL, true)` for every id recorded now and `(event_id,
    fingerprint, false)` for those recorded before. The `WITH` part and the final `SELECT`
    share one snapshot: the `SELECT` sees the rows recorded before, not those the `INSERT`
    adds. It looks the ids up one by one (see above)."""
    return (f"WITH claimed AS ({pg_unnest_insert(applied_events, CLAIM_CONFLICT, True)}) "
            "SELECT event_id, NULL, true FROM claimed UNION ALL "
            "SELECT recorded.event_id, recorded.fingerprint, false "
            "FROM unnest(%s::text[]) AS batch(event_id) CROSS JOIN LATERAL ("
            "SELECT event_id, fingerprint FROM applied_events "
            "WHERE applied_events.event_id = batch.event_id LIMIT 1) AS recorded")


@cache
def pg_replace_items() -> str:
    """The items of the orders written, in one statement: `unnest(order ids, line counts)`,
    then one array per item column. Lines beyond an order's new count are deleted, the others
    upserted: the two parts never touch the same row, so neither needs to see the other. The
    lines to delete are looked up order by order (see above), then deleted by row address
    (`ctid`). No other writer can move them meanwhile: every writer of an order's lines (this
    statement, `_replace_items`) first writes the order's row, which this transaction holds;
    a line moved by anyone else would be left, as its new version has another address."""
    columns = [c.name for c in order_items.columns]
    upsert = ", ".join(f"{name} = excluded.{name}" for name in columns
                       if name not in ("order_id", "line_no"))
    return ("WITH counts AS (SELECT * FROM unnest(%s::text[], %s::int[]) AS c(order_id, lines)),"
            " gone AS (DELETE FROM order_items WHERE ctid = ANY(ARRAY("
            "SELECT line.ctid FROM counts CROSS JOIN LATERAL (SELECT ctid FROM order_items "
            "WHERE order_items.order_id = counts.order_id AND order_items.line_no > counts.lines "
            "OFFSET 0) AS line))) "
            + pg_unnest_insert(order_items, "ON CONFLICT (order_id, line_no) DO UPDATE SET "
                                            f"{upsert}", returning=False))


@cache
def pg_set_outcome() -> str:
    """The outcome (first parameter) of the events of these ids (each once), found one by one
    (see above) and updated by row address (`ctid`): rows this transaction's claim inserted,
    which no other writer can see until it commits."""
    return ("UPDATE applied_events SET outcome = %s WHERE ctid = ANY(ARRAY("
            "SELECT found.ctid FROM unnest(%s::text[]) AS batch(event_id) CROSS JOIN LATERAL ("
            "SELECT ctid FROM applied_events WHERE applied_events.event_id = batch.event_id "
            "LIMIT 1) AS found))")


def _pg_arrays(table: Table, rows: Rows) -> list[Any]:
    """The rows as one array per column of `table`, the parameters of an `unnest` write."""
    return [pg_array_text([row[name] for row in rows]) if as_text else [row[name] for row in rows]
            for name, as_text in _pg_columns(table)]


def _pg_write(conn: Connection, table: Table, rows: Rows, conflict: str) -> None:
    conn.exec_driver_sql(pg_unnest_insert(table, conflict, returning=False),
                         tuple(_pg_arrays(table, rows)), execution_options=PREPARED)


# -- SQLite -----------------------------------------------------------------------------------

# SQLite's statements are PostgreSQL's conflict clauses on a multi-row `VALUES`, a page of rows
# each (as many as the build takes parameters), with the values converted here. Through
# SQLAlchemy's executemany every value went through its type's bind processing (a time
# through two conversions): that cost a batch more than SQLite's own work.


def _sqlite_time(value: datetime) -> str:
    """A time as `UtcDateTime` stores it on SQLite: UTC, no offset, to the microsecond."""
    if value.tzinfo is not UTC:  # parsed times are in UTC already
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: times must be aware")
        value = value.astimezone(UTC)
    return value.isoformat(" ", "microseconds").removesuffix("+00:00")


_SQLITE_CONVERT: dict[type, Callable[[Any], Any]] = {UtcDateTime: _sqlite_time, Money: str}


@cache
def _sqlite_columns(table: Table) -> tuple[Callable[[Mapping[str, Any]], tuple[Any, ...]],
                                           tuple[tuple[int, Callable[[Any], Any]], ...]]:
    """A row's values in column order, and the converter of each column that needs one."""
    converters = tuple((index, convert) for index, column in enumerate(table.columns)
                       if (convert := _SQLITE_CONVERT.get(type(column.type))) is not None)
    return itemgetter(*(column.name for column in table.columns)), converters


def sqlite_values(table: Table, rows: Rows) -> tuple[Any, ...]:
    """The rows' values (each row names every column), row after row in column order, as
    SQLite stores them."""
    values_of, converters = _sqlite_columns(table)
    flat: list[Any] = []
    # Each column's last value and what it became: the time a batch is applied at is one
    # object in all its rows, converted once (the same object, not an equal value: `1.50`
    # equals `1.5` and must stay as written).
    last: dict[int, tuple[Any, Any]] = {}
    for row in rows:
        values = list(values_of(row))
        for index, convert in converters:
            value = values[index]
            if value is None:
                continue
            seen = last.get(index)
            if seen is not None and seen[0] is value:
                values[index] = seen[1]
            else:
                values[index] = stored = convert(value)
                last[index] = (value, stored)
        flat += values
    return tuple(flat)


@lru_cache(maxsize=256)
def sqlite_insert(table: Table, conflict: str, returning: bool, rows: int) -> str:
    """`INSERT … VALUES (?, …), … <conflict> [RETURNING key]` for `rows` rows."""
    row = f"({', '.join('?' * len(table.columns))})"
    sql = (f"INSERT INTO {table.name} ({', '.join(c.name for c in table.columns)}) "
           f"VALUES {', '.join([row] * rows)} {conflict}")
    return sql + (f" RETURNING {_key(table)}" if returning else "")


def _sqlite_write(conn: Connection, table: Table, rows: Rows, conflict: str = "", *,
                  returning: bool = False) -> set[Any]:
    """Insert `rows` with `conflict`, a page at a time; the keys returned."""
    driver: Any = conn.connection.driver_connection
    limit = driver.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    largest = max(1, min(1000, limit // len(table.columns)))
    written: set[Any] = set()
    start = 0
    while start < len(rows):
        part = rows[start:start + sqlite_page(len(rows) - start, largest)]
        result = conn.exec_driver_sql(sqlite_insert(table, conflict, returning, len(part)),
                                      sqlite_values(table, part))
        if returning:
            written.update(result.scalars().all())
        start += len(part)
    return written


def sqlite_page(left: int, largest: int) -> int:
    """How many of the `left` rows the next statement writes: all of them up to 16, else the
    largest power of two of them the statement takes (`largest` rows: as many as this SQLite
    takes parameters in a statement, a thousand at most). A table's statements thus have at
    most 21 texts whatever the batches' sizes, which SQLite compiles once per connection and
    the driver keeps (`eventpipe.database`): compiled for each count of rows, a statement of 500
    rows took as long to compile as to run."""
    if left <= 16:
        return min(left, largest)
    return min(1 << (left.bit_length() - 1), 1 << (largest.bit_length() - 1))


# -- what a batch calls ----------------------------------------------------------------------


def write_entities(conn: Connection, rows: Mapping[Table, Rows], items: Rows,
                   queued_at: datetime) -> dict[str, set[str]]:
    """Write each entity table's rows whose version is newer than the stored one, replace
    the items of the orders written (an order event carries them all), and queue the keys
    written for the reconciler; the keys written, by table name. On PostgreSQL one statement
    for the entities and the queue, and one for the items; one per table on the others."""
    chosen = {table: _sorted(table, table_rows) for table, table_rows in rows.items()
              if table_rows}
    written: dict[str, set[str]] = {table.name: set() for table in rows}
    if not chosen:
        return written
    if conn.dialect.name == "postgresql":
        return {**written, **_pg_write_entities(conn, chosen, items, queued_at)}
    for table, ordered in chosen.items():
        if conn.dialect.name == "mssql":
            written[table.name] = _merge_staged(conn, table, ordered, entity_merge(table))
        else:
            written[table.name] = _sqlite_write(conn, table, ordered, entity_conflict(table),
                                                returning=True)
    _replace_items(conn, written.get(orders.name, set()), items)
    queue_keys(conn, written, queued_at)
    return written


_QUEUE_KEYS = reconcile_queue.insert()  # built once: SQLAlchemy's cache key is then kept


def queue_keys(conn: Connection, keys: Mapping[str, Collection[str]], queued_at: datetime) -> None:
    """Queue these keys, by table name, for the reconciler (nothing when there are none)."""
    if any(keys.values()):
        conn.execute(_QUEUE_KEYS, {
            "keys": json.dumps({name: sorted(chosen) for name, chosen in keys.items() if chosen}),
            "created_at": queued_at})


def _pg_write_entities(conn: Connection, chosen: Mapping[Table, list[dict[str, Any]]],
                       items: Rows, queued_at: datetime) -> dict[str, set[str]]:
    written: dict[str, set[str]] = {table.name: set() for table in chosen}
    arrays = [array for table, ordered in chosen.items() for array in _pg_arrays(table, ordered)]
    for table_name, key in conn.exec_driver_sql(pg_write_entities(tuple(chosen)),
                                                (*arrays, queued_at),
                                                execution_options=PREPARED).all():
        written[table_name].add(key)
    order_ids = written.get(orders.name, set())
    if order_ids:
        # A statement of its own, after the order rows are written and locked: it reads the
        # lines a concurrent writer of the same orders committed while this one waited for
        # their rows (within the statement above, only those there when it began).
        ordered = sorted(order_ids)
        lines = Counter(item["order_id"] for item in items)
        conn.exec_driver_sql(pg_replace_items(), (
            pg_array_text(ordered), pg_array_text([lines[order_id] for order_id in ordered]),
            *_pg_arrays(order_items, _items_of(order_ids, items))))
    return written


def _items_of(order_ids: set[str], items: Rows) -> list[dict[str, Any]]:
    """The items of these orders, in key order (the order their rows are locked in)."""
    return sorted((item for item in items if item["order_id"] in order_ids),
                  key=lambda item: (item["order_id"], item["line_no"]))


class Claim(NamedTuple):
    claimed: set[str]  # the ids this transaction recorded
    recorded: dict[str, str | None]  # ids recorded before it → their fingerprint (None: unknown)


def claim_events(conn: Connection, rows: Rows) -> Claim:
    """Record the events whose id is not recorded yet: the ids recorded now, and the
    fingerprints of those recorded before. On PostgreSQL one statement, whose reading is of
    the rows committed when it began: an id a concurrent writer recorded since is in neither."""
    if not rows:
        return Claim(set(), {})
    ordered = _sorted(applied_events, rows)
    if conn.dialect.name == "postgresql":
        found = Claim(set(), {})
        arrays = _pg_arrays(applied_events, ordered)
        ids = arrays[0]
        # `.all()`: one fetch of every row, where iterating the result fetches one at a time.
        for event_id, fingerprint, claimed in conn.exec_driver_sql(pg_claim(),
                                                                   (*arrays, ids)).all():
            if claimed:
                found.claimed.add(event_id)
            else:
                found.recorded[event_id] = fingerprint
        return found
    if conn.dialect.name == "mssql":
        claimed = _merge_staged(conn, applied_events, ordered, claim_merge())
    else:
        claimed = _sqlite_write(conn, applied_events, ordered, CLAIM_CONFLICT, returning=True)
    return Claim(claimed, recorded(conn, {row["event_id"] for row in rows} - claimed))


_SET_OUTCOME = Keyed(update(applied_events).values(outcome=bindparam("fate")),
                     applied_events.c.event_id)


def set_outcome(conn: Connection, outcome: str, event_ids: Collection[str]) -> None:
    """Record `outcome` as the fate of the events of these ids, claimed by this transaction."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(pg_set_outcome(), (outcome, pg_array_text(sorted(event_ids))))
        return
    _SET_OUTCOME.execute(conn, event_ids, fate=outcome)


_RECORDED = Keyed(select(applied_events.c.event_id, applied_events.c.fingerprint),
                  applied_events.c.event_id)


def recorded(conn: Connection, event_ids: Collection[str]) -> dict[str, str | None]:
    """The fingerprints recorded for those of these ids that are recorded."""
    return {row.event_id: row.fingerprint for row in _RECORDED.rows(conn, event_ids)}


def add_deltas(conn: Connection, rows: Rows) -> None:
    if not rows:
        return
    ordered = _sorted(inventory, rows)
    if conn.dialect.name == "mssql":
        _merge_staged(conn, inventory, ordered, inventory_merge(), returning=False)
        return
    if conn.dialect.name == "postgresql":
        _pg_write(conn, inventory, ordered, _INVENTORY_CONFLICT.format(latest="GREATEST"))
        return
    _sqlite_write(conn, inventory, ordered, _INVENTORY_CONFLICT.format(latest="max"))


def _replace_items(conn: Connection, order_ids: set[str], rows: Rows) -> None:
    """SQLite and SQL Server: the items of the orders written, deleted then inserted."""
    if not order_ids:
        return
    chosen = _items_of(order_ids, rows)
    # On SQLite one text whatever the count of orders, which the driver keeps compiled.
    DELETE_ITEMS.execute(conn, order_ids)
    if chosen and conn.dialect.name == "sqlite":
        _sqlite_write(conn, order_items, chosen)
    elif chosen:
        conn.execute(insert(order_items), chosen)

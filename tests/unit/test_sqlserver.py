"""No SQL Server runs here: its statements are compiled for `mssql+pyodbc`, parsed as T-SQL."""

from __future__ import annotations

import io
import re
from datetime import UTC, datetime
from typing import Any, cast

import pytest
import sqlglot
from alembic import command
from sqlalchemy import Connection, Table
from sqlalchemy.dialects.mssql import pyodbc
from sqlalchemy.schema import CreateTable

from eventpipe import positions, readmodel, upserts
from eventpipe.dlq import records
from eventpipe.migrations import alembic_config
from eventpipe.tables import (
    applied_events,
    dead_letters,
    inventory,
    kafka_done_ranges,
    order_items,
    orders,
    payments,
    users,
)

DIALECT = pyodbc.dialect(paramstyle="qmark")  # type: ignore[no-untyped-call]
MSSQL_URL = "mssql+pyodbc://sa:secret@sqlserver:1433/eventpipe?driver=ODBC+Driver+18+for+SQL+Server"


def tsql(statement: Any) -> str:
    return str(statement.compile(dialect=DIALECT))


def parses_as_tsql(sql: str) -> None:
    expressions = sqlglot.parse(sql, read="tsql", error_level=sqlglot.ErrorLevel.RAISE)
    assert expressions and all(e is not None for e in expressions)


@pytest.mark.parametrize("table", [users, orders, payments], ids=lambda t: t.name)
def test_entity_writes_are_version_guarded_merges_that_return_the_keys_written(
    table: Table,
) -> None:
    sql = upserts.entity_merge(table)
    parses_as_tsql(sql)
    key = next(iter(table.primary_key.columns)).name
    assert sql.startswith(f"MERGE INTO {table.name} WITH (HOLDLOCK) AS target "
                          f"USING #staging_{table.name} AS source")
    assert "WHEN MATCHED AND (target.version_at < source.version_at OR" in sql
    assert sql.endswith(f"OUTPUT inserted.{key};")


def test_the_claim_inserts_only_new_ids_and_returns_them() -> None:
    sql = upserts.claim_merge()
    parses_as_tsql(sql)
    assert "WHEN MATCHED" not in sql and sql.endswith("OUTPUT inserted.event_id;")


def test_inventory_merge_adds_the_delta() -> None:
    sql = upserts.inventory_merge()
    parses_as_tsql(sql)
    assert "quantity = target.quantity + source.quantity" in sql and "OUTPUT" not in sql


@pytest.mark.parametrize("table", [users, orders, payments, applied_events, inventory],
                         ids=lambda t: t.name)
def test_staging_tables_are_session_temporary_tables(table: Table) -> None:
    sql = tsql(CreateTable(upserts.staging_table(table)))
    parses_as_tsql(sql)
    assert sql.strip().startswith(f"CREATE TABLE [#staging_{table.name}]")


def test_item_replacement_parses() -> None:
    sql = str(upserts.DELETE_ITEMS.built("mssql", as_one=False).compile(dialect=DIALECT))
    # An expanding IN list is rendered at execution, by its size: give it two values.
    sql = sql.replace("(__[POSTCOMPILE_keyset])", "(?, ?)")
    parses_as_tsql(sql)
    assert sql.endswith("order_items.order_id IN (?, ?)")


def test_sql_server_takes_no_set_of_keys_as_one_parameter() -> None:
    with pytest.raises(ValueError, match="mssql"):
        upserts.DELETE_ITEMS.built("mssql", as_one=True)


def test_a_fate_is_corrected_by_an_update_of_only_the_outcome() -> None:
    """The keys go as IN lists, in chunks; the fate as its own parameter, which only the
    outcome column takes."""
    conn = _Recording()
    upserts.set_outcome(cast(Connection, conn), "stale", [f"e{number}" for number in range(501)])
    assert len(conn.statements) == 2  # under SQL Server's 2,100 parameters a statement
    for sql in conn.statements:
        parses_as_tsql(sql)
        assert sql.startswith("UPDATE applied_events SET outcome=? WHERE "
                              "applied_events.event_id IN (?"), sql


def offline_tsql(revisions: str) -> str:
    """What `alembic upgrade <revisions> --sql` prints for SQL Server, each batch parsed."""
    buffer = io.StringIO()
    config = alembic_config(MSSQL_URL)
    config.output_buffer = buffer
    command.upgrade(config, revisions, sql=True)
    script = buffer.getvalue()
    batches = [b.strip() for b in re.split(r"^GO\s*$", script, flags=re.M) if b.strip()]
    assert len(batches) > 5
    for batch in batches:
        parses_as_tsql(batch)
    return script


def test_alembic_emits_tsql_for_the_whole_schema() -> None:
    script = offline_tsql("head")
    for table in ("users", "orders", "order_items", "payments", "inventory", "applied_events"):
        assert f"CREATE TABLE {table}" in script
    assert "DATETIME2(6)" in script and "NUMERIC(18, 4)" in script
    assert "COLLATE Latin1_General_BIN2" in script
    assert "NVARCHAR(200)" in script  # names are Unicode
    assert "ON DELETE CASCADE" in script


def test_every_key_column_compares_by_code_point() -> None:
    """Issue 9, item 9: on SQL Server's default collation `SKU-1` and `sku-1` share a row."""
    for table in (users, orders, payments, inventory, applied_events, order_items, dead_letters):
        ddl = tsql(CreateTable(table))
        for column in ("user_id", "order_id", "payment_id", "sku", "event_id", "email",
                       "entity_key", "parent_key", "version_event_id"):
            if column in table.c:
                assert re.search(rf"{column} NVARCHAR\(\d+\) COLLATE Latin1_General_BIN2",
                                 ddl), (table.name, column, ddl)


def test_event_ids_and_user_ids_are_ordered_by_code_point_as_utf8() -> None:
    """SQL Server's binary collations compare NVARCHAR by UTF-16 code unit, which orders a
    character above U+FFFF before one of U+E000–U+FFFF, unlike Python, PostgreSQL and
    SQLite: the version guard and an email's earliest claimant compare the text as UTF-8,
    whose bytes are in code point order."""
    ids = ["\U0001f600", "\ue000", "a", "\uffff", "z\U00010000", "z"]
    assert sorted(ids, key=lambda text: text.encode("utf-16-be")) != sorted(ids)
    assert sorted(ids, key=lambda text: text.encode("utf-8")) == sorted(ids)
    guard = upserts.entity_merge(users)
    owner = str(readmodel.users_query().compile(
        dialect=DIALECT, compile_kwargs={"render_postcompile": True}))
    for sql in (guard, owner):
        parses_as_tsql(sql)
    utf8 = "CONVERT(VARCHAR(256), {} COLLATE Latin1_General_100_BIN2_UTF8)"
    assert (f"target.version_at = source.version_at AND "
            f"{utf8.format('target.version_event_id')} < "
            f"{utf8.format('source.version_event_id')})") in guard
    assert (f"ORDER BY claimant.version_at, {utf8.format('claimant.version_event_id')}, "
            f"{utf8.format('claimant.user_id')})") in owner


def test_the_collation_revision_rebuilds_keys_around_the_change() -> None:
    script = offline_tsql("0003:0004")
    assert "ALTER TABLE inventory DROP CONSTRAINT pk_inventory" in script
    assert "ALTER TABLE inventory ALTER COLUMN sku NVARCHAR(64) COLLATE Latin1_General_BIN2 " \
           "NOT NULL" in script
    assert script.index("DROP CONSTRAINT pk_inventory") < script.index(
        "ALTER COLUMN sku NVARCHAR(64) COLLATE") < script.index(
        "ADD CONSTRAINT pk_inventory PRIMARY KEY (sku)")
    assert "ADD CONSTRAINT fk_order_items_order_id_orders FOREIGN KEY" in script


class _Recording:
    """A connection to SQL Server that keeps the statements it is given and finds no rows."""

    def __init__(self) -> None:
        self.dialect = DIALECT
        self.statements: list[str] = []

    def execute(self, statement: Any, parameters: Any = None) -> Any:
        # As the driver gets it: the IN lists rendered for the values given.
        compiled = statement.compile(dialect=DIALECT)
        self.statements.append(compiled.construct_expanded_state(parameters or {}).statement)
        return self

    def all(self) -> list[Any]:
        return []

    def scalars(self) -> list[Any]:
        return []

    def scalar_one(self) -> int:
        return 0

    def __iter__(self) -> Any:
        return iter(())


def test_the_dead_letters_queries_are_tsql() -> None:
    """T-SQL has no boolean values: `IS` takes only NULL, and `in_stream IS 0` is a syntax
    error there (which sqlglot lets pass), so a flag is compared with `=`."""
    conn = _Recording()
    records.unprojected(cast(Connection, conn), 10)
    records.shown(cast(Connection, conn))
    records.claimed(cast(Connection, conn))
    records.count_shown(cast(Connection, conn))
    records.count_unprojected(cast(Connection, conn))
    records.due(cast(Connection, conn), datetime(2026, 11, 24, tzinfo=UTC), 10)
    assert len(conn.statements) == 6
    for sql in conn.statements:
        parses_as_tsql(sql)
        assert re.search(r"\bIS (NOT )?(0|1|true|false)\b", sql, flags=re.IGNORECASE) is None, sql


def test_dead_letters_are_read_for_a_change_under_locks_that_hold_keys_with_no_row() -> None:
    """SQL Server renders no FOR UPDATE: without the hint two writers read a letter unlocked
    and one's change is lost, and two writers of a new letter both insert it."""
    conn = _Recording()
    records.load(cast(Connection, conn), ["e:1", "m:2"], lock=True)
    records.by_entity(cast(Connection, conn), "orders", ["o1"])
    assert len(conn.statements) == 2
    for sql in conn.statements:
        parses_as_tsql(sql)
        assert "FROM dead_letters WITH (UPDLOCK, HOLDLOCK, ROWLOCK)" in sql, sql
        assert sql.endswith("ORDER BY dead_letters.dlq_key"), sql


def test_a_position_is_recorded_by_a_merge_that_moves_it_only_forward() -> None:
    sql = tsql(positions.saving("mssql"))
    parses_as_tsql(sql)
    assert sql.startswith("MERGE INTO kafka_positions WITH (HOLDLOCK) AS target ")
    assert "THEN UPDATE SET next_offset = CASE WHEN target.topic_id = source.topic_id AND " \
        "target.next_offset > source.next_offset THEN target.next_offset ELSE " \
        "source.next_offset END" in sql


def test_a_bridge_reads_the_positions_it_will_write_under_an_update_lock() -> None:
    sql = str(positions.reading_query("events", [3, 1], lock=True).compile(
        dialect=DIALECT, compile_kwargs={"render_postcompile": True}))
    parses_as_tsql(sql)
    assert "FROM kafka_positions WITH (UPDLOCK, HOLDLOCK, ROWLOCK)" in sql
    assert sql.endswith("ORDER BY kafka_positions.kafka_partition")


def test_the_ranges_of_offsets_done_are_read_and_pruned_in_t_sql() -> None:
    written = tsql(kafka_done_ranges.insert())
    read = str(positions.ranges_query("events", "id-1", {3: 10, 1: 0}).compile(
        dialect=DIALECT, compile_kwargs={"render_postcompile": True}))
    pruned = tsql(positions.pruning())
    backlog = tsql(positions.pruning_backlog("mssql"))
    for sql in (written, read, pruned, backlog):
        parses_as_tsql(sql)
    assert "kafka_done_ranges.kafka_partition = ? AND kafka_done_ranges.last_offset >= ?" in read
    assert pruned.endswith("kafka_done_ranges.last_offset >= ? AND "
                           "kafka_done_ranges.last_offset < ?")
    assert backlog.startswith(f"DELETE TOP ({positions.PRUNE_BACKLOG_ROWS}) FROM "
                              "kafka_done_ranges WHERE ")


def test_the_prunes_run_with_rows_of_parameters() -> None:
    """A review's finding: a `LIMIT` SQLAlchemy binds is rendered into SQL Server's `TOP` as
    the statement runs, which it refuses for a statement run with rows of parameters: every
    commit of a bridge with two partitions or more failed there."""
    for statement in (positions.pruning(), positions.pruning_backlog("mssql")):
        compiled = statement.compile(dialect=DIALECT)
        assert not compiled.literal_execute_params
        assert not compiled.post_compile_params

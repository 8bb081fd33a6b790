"""No SQL Server runs here: its statements are compiled for `mssql+pyodbc`, parsed as T-SQL."""

from __future__ import annotations

import io
import re
from typing import Any

import pytest
import sqlglot
from alembic import command
from sqlalchemy import Table
from sqlalchemy.dialects.mssql import pyodbc

from eventpipe import upserts
from eventpipe.tables import orders, payments, users
from tests.services import alembic_config

DIALECT = pyodbc.dialect(paramstyle="qmark")  # type: ignore[no-untyped-call]
MSSQL_URL = "mssql+pyodbc://sa:secret@sqlserver:1433/eventpipe?driver=ODBC+Driver+18+for+SQL+Server"


def tsql(statement: Any) -> str:
    return str(statement.compile(dialect=DIALECT))


def parses_as_tsql(sql: str) -> None:
    expressions = sqlglot.parse(sql, read="tsql", error_level=sqlglot.ErrorLevel.RAISE)
    assert expressions and all(e is not None for e in expressions)


@pytest.mark.parametrize("table", [users, orders, payments], ids=lambda t: t.name)
def test_entity_upserts_are_version_guarded_merges(table: Table) -> None:
    sql = tsql(upserts.entity_upsert("mssql", table))
    parses_as_tsql(sql)
    assert sql.startswith(f"MERGE INTO {table.name} WITH (HOLDLOCK) AS target")
    assert "WHEN MATCHED AND (target.version_at < source.version_at OR" in sql
    assert "?" in sql and ":" not in sql.replace("::", "")


def test_inventory_merge_adds_the_delta() -> None:
    sql = tsql(upserts.inventory_upsert("mssql"))
    parses_as_tsql(sql)
    assert "quantity = target.quantity + source.quantity" in sql


def test_item_replacement_and_ledger_parse() -> None:
    delete_items, insert_items = upserts.replace_items()
    for statement in (delete_items, insert_items, upserts.record_applied()):
        parses_as_tsql(tsql(statement))


def test_alembic_emits_tsql_for_the_whole_schema() -> None:
    buffer = io.StringIO()
    config = alembic_config(MSSQL_URL)
    config.output_buffer = buffer
    command.upgrade(config, "head", sql=True)
    script = buffer.getvalue()
    batches = [b.strip() for b in re.split(r"^GO\s*$", script, flags=re.M) if b.strip()]
    assert len(batches) > 5
    for batch in batches:
        parses_as_tsql(batch)
    for table in ("users", "orders", "order_items", "payments", "inventory", "applied_events"):
        assert f"CREATE TABLE {table}" in script
    assert "DATETIME2(6)" in script and "NUMERIC(18, 4)" in script
    assert "COLLATE Latin1_General_BIN2" in script
    assert "NVARCHAR(200)" in script  # names are Unicode
    assert "ON DELETE CASCADE" in script

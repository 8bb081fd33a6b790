"""The write statements, one compiled statement per table and dialect, run with many rows.

PostgreSQL and SQLite use `INSERT … ON CONFLICT DO UPDATE … WHERE <newer>`; SQL Server uses
`MERGE … WITH (HOLDLOCK)`, the lock hint that makes MERGE safe against a concurrent insert of
the same key. The version guard sits in the statement itself, so even two processes racing
on one entity can never move it backwards. Each statement is executed with a list of
parameter sets (executemany), never rebuilt per batch.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Executable,
    Table,
    and_,
    bindparam,
    case,
    delete,
    insert,
    or_,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite

from eventpipe.tables import applied_events, inventory, order_items


def _insert(dialect: str, table: Table) -> postgresql.Insert | sqlite.Insert:
    """An INSERT that supports ON CONFLICT (PostgreSQL and SQLite share the syntax)."""
    return postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)


def _newer(stored: Table, new: Any) -> ColumnElement[bool]:
    """`new`'s version (the row being written, e.g. `excluded`) is above the stored one."""
    return or_(
        stored.c.version_at < new.version_at,
        and_(
            stored.c.version_at == new.version_at,
            stored.c.version_event_id < new.version_event_id,
        ),
    )


@cache
def entity_upsert(dialect: str, table: Table) -> Executable:
    """Insert the row, or overwrite the stored one only if the new version is newer."""
    keys = [c.name for c in table.primary_key.columns]
    values = [c.name for c in table.columns if c.name not in keys]
    if dialect == "mssql":
        guard = (
            "target.version_at < source.version_at OR (target.version_at = source.version_at "
            "AND target.version_event_id < source.version_event_id)"
        )
        return _merge(table, keys, values, guard, ", ".join(f"{v} = source.{v}" for v in values))
    stmt = _insert(dialect, table)
    return stmt.on_conflict_do_update(
        index_elements=keys,
        set_={name: stmt.excluded[name] for name in values},
        where=_newer(table, stmt.excluded),
    )


@cache
def inventory_upsert(dialect: str) -> Executable:
    """Add a delta to a SKU's quantity (creating it at the delta), keeping the latest time."""
    if dialect == "mssql":
        return _merge(
            inventory, ["sku"], ["quantity", "updated_at"], None,
            "quantity = target.quantity + source.quantity, updated_at = CASE WHEN "
            "source.updated_at > target.updated_at THEN source.updated_at "
            "ELSE target.updated_at END",
        )
    stmt = _insert(dialect, inventory)
    return stmt.on_conflict_do_update(
        index_elements=["sku"],
        set_={
            "quantity": inventory.c.quantity + stmt.excluded.quantity,
            "updated_at": case(
                (stmt.excluded.updated_at > inventory.c.updated_at, stmt.excluded.updated_at),
                else_=inventory.c.updated_at,
            ),
        },
    )


def _merge(
    table: Table, keys: list[str], values: list[str], guard: str | None, update_set: str
) -> Executable:
    columns = keys + values
    matched = f"WHEN MATCHED AND ({guard}) THEN" if guard else "WHEN MATCHED THEN"
    sql = (
        f"MERGE INTO {table.name} WITH (HOLDLOCK) AS target "
        f"USING (SELECT {', '.join(f':{c} AS {c}' for c in columns)}) AS source "
        f"ON {' AND '.join(f'target.{k} = source.{k}' for k in keys)} "
        f"{matched} UPDATE SET {update_set} "
        f"WHEN NOT MATCHED THEN INSERT ({', '.join(columns)}) "
        f"VALUES ({', '.join(f'source.{c}' for c in columns)});"
    )
    # Typed bind parameters, so times and money go through the same conversions as Core.
    return text(sql).bindparams(*(bindparam(c, type_=table.c[c].type) for c in columns))


@cache
def replace_items() -> tuple[Executable, Executable]:
    """Delete an order's items, then insert its new ones: an order event carries them all."""
    return (
        delete(order_items).where(order_items.c.order_id == bindparam("p_order_id")),
        insert(order_items),
    )


@cache
def record_applied() -> Executable:
    """The ledger insert. Plain INSERT on purpose: a second writer of one event id fails."""
    return insert(applied_events)

"""SQL Server: every key column compares by code point, as on PostgreSQL and SQLite.

SQL Server's default collations are case-insensitive (and fold `ß` into `ss`): `SKU-1` and
`sku-1` would share a row, `alice` could overwrite `Alice`, and event id `E1` would pass for
a duplicate of `e1`. Every column that names an entity or an event takes the binary
collation `Latin1_General_BIN2`; the constraints and indexes on them are dropped and made
again around the change. PostgreSQL and SQLite already compare these columns exactly: there
this revision changes nothing.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mssql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BINARY = "Latin1_General_BIN2"

# (table, column, length, nullable)
KEY_COLUMNS = (
    ("users", "user_id", 64, False),
    ("users", "email", 254, False),
    ("orders", "order_id", 64, False),
    ("orders", "user_id", 64, False),
    ("order_items", "order_id", 64, False),
    ("order_items", "sku", 64, False),
    ("payments", "payment_id", 64, False),
    ("payments", "order_id", 64, False),
    ("inventory", "sku", 64, False),
    ("applied_events", "event_id", 64, False),
    ("dead_letters", "event_id", 64, True),
    ("dead_letters", "entity_key", 64, True),
    ("dead_letters", "parent_key", 64, True),
)
PRIMARY_KEYS = (
    ("pk_users", "users", ["user_id"]),
    ("pk_orders", "orders", ["order_id"]),
    ("pk_order_items", "order_items", ["order_id", "line_no"]),
    ("pk_payments", "payments", ["payment_id"]),
    ("pk_inventory", "inventory", ["sku"]),
    ("pk_applied_events", "applied_events", ["event_id"]),
)
INDEXES = (
    ("ix_users_email_version", "users", ["email", "version_at", "version_event_id"]),
    ("ix_orders_user_id_placed_at", "orders", ["user_id", "placed_at"]),
    ("ix_payments_order_id", "payments", ["order_id"]),
    ("ix_dead_letters_event_id", "dead_letters", ["event_id"]),
    ("ix_dead_letters_entity", "dead_letters", ["entity_kind", "entity_key"]),
    ("ix_dead_letters_parent", "dead_letters", ["parent_kind", "parent_key"]),
)


def upgrade() -> None:
    _recollate(BINARY)


def downgrade() -> None:
    _recollate(None)


def _recollate(collation: str | None) -> None:
    if op.get_context().dialect.name != "mssql":
        return
    op.drop_constraint("fk_order_items_order_id_orders", "order_items", type_="foreignkey")
    for name, table, _ in INDEXES:
        op.drop_index(name, table_name=table)
    for name, table, _ in PRIMARY_KEYS:
        op.drop_constraint(name, table, type_="primary")
    for table, column, length, nullable in KEY_COLUMNS:
        op.alter_column(table, column, type_=mssql.NVARCHAR(length, collation=collation),
                        existing_type=sa.Unicode(length), existing_nullable=nullable,
                        nullable=nullable)
    for name, table, columns in PRIMARY_KEYS:
        op.create_primary_key(name, table, columns)
    for name, table, columns in INDEXES:
        op.create_index(name, table, columns)
    op.create_foreign_key("fk_order_items_order_id_orders", "order_items", "orders",
                          ["order_id"], ["order_id"], ondelete="CASCADE")

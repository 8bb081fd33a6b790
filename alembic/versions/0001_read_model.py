"""The read model and the applied-events ledger.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from eventpipe.sqltypes import Money, UtcDateTime, event_id_type

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _version_columns() -> list[sa.Column]:
    return [
        sa.Column("version_at", UtcDateTime(), nullable=False),
        sa.Column("version_event_id", event_id_type(), nullable=False),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
    ]


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("user_id", sa.Unicode(64), nullable=False),
        sa.Column("email", sa.Unicode(254), nullable=False),
        sa.Column("name", sa.Unicode(200), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        *_version_columns(),
        sa.PrimaryKeyConstraint("user_id", name="pk_users"),
        sa.UniqueConstraint("email", name="uq_users_email"),
    )
    op.create_table(
        "orders",
        sa.Column("order_id", sa.Unicode(64), nullable=False),
        sa.Column("user_id", sa.Unicode(64), nullable=False),
        sa.Column("total_amount", Money(), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("placed_at", UtcDateTime(), nullable=False),
        *_version_columns(),
        sa.PrimaryKeyConstraint("order_id", name="pk_orders"),
        sa.ForeignKeyConstraint(["user_id"], ["users.user_id"], name="fk_orders_user_id_users"),
    )
    op.create_index("ix_orders_user_id_placed_at", "orders", ["user_id", "placed_at"])
    op.create_table(
        "order_items",
        sa.Column("order_id", sa.Unicode(64), nullable=False),
        sa.Column("line_no", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("sku", sa.Unicode(64), nullable=False),
        sa.Column("quantity", sa.Integer(), nullable=False),
        sa.Column("unit_price", Money(), nullable=False),
        sa.PrimaryKeyConstraint("order_id", "line_no", name="pk_order_items"),
        sa.ForeignKeyConstraint(
            ["order_id"], ["orders.order_id"], name="fk_order_items_order_id_orders",
            ondelete="CASCADE",
        ),
    )
    op.create_table(
        "payments",
        sa.Column("payment_id", sa.Unicode(64), nullable=False),
        sa.Column("order_id", sa.Unicode(64), nullable=False),
        sa.Column("amount", Money(), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("settled_at", UtcDateTime(), nullable=False),
        *_version_columns(),
        sa.PrimaryKeyConstraint("payment_id", name="pk_payments"),
        sa.ForeignKeyConstraint(
            ["order_id"], ["orders.order_id"], name="fk_payments_order_id_orders"
        ),
    )
    op.create_index("ix_payments_order_id", "payments", ["order_id"])
    op.create_table(
        "inventory",
        sa.Column("sku", sa.Unicode(64), nullable=False),
        sa.Column("quantity", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("sku", name="pk_inventory"),
    )
    op.create_table(
        "applied_events",
        sa.Column("event_id", sa.Unicode(64), nullable=False),
        sa.Column("event_type", sa.String(32), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("kafka_topic", sa.String(255), nullable=True),
        sa.Column("kafka_partition", sa.Integer(), nullable=True),
        sa.Column("kafka_offset", sa.BigInteger(), nullable=True),
        sa.Column("occurred_at", UtcDateTime(), nullable=False),
        sa.Column("applied_at", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("event_id", name="pk_applied_events"),
    )


def downgrade() -> None:
    op.drop_table("applied_events")
    op.drop_table("inventory")
    op.drop_index("ix_payments_order_id", table_name="payments")
    op.drop_table("payments")
    op.drop_table("order_items")
    op.drop_index("ix_orders_user_id_placed_at", table_name="orders")
    op.drop_table("orders")
    op.drop_table("users")

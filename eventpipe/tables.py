"""The read model's tables (SQLAlchemy Core), owned in the database by the Alembic migrations.

Entities carry their version, the `occurredAt` and `eventId` of the event that last changed
them, so an older event can be recognised and ignored. `applied_events` is the ledger that
makes the pipeline exactly-once in effect: one row per event id, written in the same
transaction as the event's effect.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Unicode,
)

from eventpipe.sqltypes import Money, UtcDateTime, event_id_type

# Stable constraint names on every dialect, so migrations can refer to them.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _version_columns() -> list[Column[object]]:
    return [
        Column("version_at", UtcDateTime(), nullable=False),
        Column("version_event_id", event_id_type(), nullable=False),
        Column("updated_at", UtcDateTime(), nullable=False),
    ]


users = Table(
    "users",
    metadata,
    Column("user_id", Unicode(64), primary_key=True),
    Column("email", Unicode(254), nullable=False, unique=True),
    Column("name", Unicode(200), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    *_version_columns(),
)

orders = Table(
    "orders",
    metadata,
    Column("order_id", Unicode(64), primary_key=True),
    Column("user_id", Unicode(64), ForeignKey("users.user_id"), nullable=False),
    Column("total_amount", Money(), nullable=False),
    Column("currency", String(3), nullable=False),
    Column("placed_at", UtcDateTime(), nullable=False),
    *_version_columns(),
    # Serves "the last 5 orders of a user, newest first" as an index range scan.
    Index("ix_orders_user_id_placed_at", "user_id", "placed_at"),
)

order_items = Table(
    "order_items",
    metadata,
    Column(
        "order_id",
        Unicode(64),
        ForeignKey("orders.order_id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("line_no", Integer, primary_key=True, autoincrement=False),
    Column("sku", Unicode(64), nullable=False),
    Column("quantity", Integer, nullable=False),
    Column("unit_price", Money(), nullable=False),
)

payments = Table(
    "payments",
    metadata,
    Column("payment_id", Unicode(64), primary_key=True),
    Column("order_id", Unicode(64), ForeignKey("orders.order_id"), nullable=False, index=True),
    Column("amount", Money(), nullable=False),
    Column("currency", String(3), nullable=False),
    Column("settled_at", UtcDateTime(), nullable=False),
    *_version_columns(),
)

inventory = Table(
    "inventory",
    metadata,
    Column("sku", Unicode(64), primary_key=True),
    Column("quantity", BigInteger, nullable=False),
    # The latest `adjustedAt` among the deltas applied: when the stock last changed.
    Column("updated_at", UtcDateTime(), nullable=False),
)

applied_events = Table(
    "applied_events",
    metadata,
    Column("event_id", Unicode(64), primary_key=True),
    Column("event_type", String(32), nullable=False),
    # "applied" changed the read model; "stale" was older than what it held and changed nothing.
    Column("outcome", String(16), nullable=False),
    Column("kafka_topic", String(255), nullable=True),
    Column("kafka_partition", Integer, nullable=True),
    Column("kafka_offset", BigInteger, nullable=True),
    Column("occurred_at", UtcDateTime(), nullable=False),
    Column("applied_at", UtcDateTime(), nullable=False),
)

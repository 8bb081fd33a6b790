"""The pipeline's tables (SQLAlchemy Core), owned in the database by the Alembic migrations.

- `users`, `orders` (+ `order_items`), `payments`: the newest version of every entity, each
  written on its own key with the version guard (`occurredAt`, then `eventId`), so an older
  event changes nothing. They hold every entity the topic names, including those the read
  model does not show yet: a user whose email an earlier user claimed, an order whose user has
  not arrived. What is visible is derived from them (`eventpipe.readmodel`), which is why no
  foreign key or unique email constrains them across keys.
- `inventory`: the sum of distinct deltas per SKU.
- `applied_events`: one row per event id whose effect is recorded, written in the same
  transaction as the effect; what makes the pipeline exactly-once in effect.
- `dead_letters`: the durable record of every event or message that failed or is held, and
  its state; the Redis stream the operators read is a projection of its open rows.
- `reconcile_queue`: the keys each batch touched, for the reconciler to re-check the rules
  that span keys (`eventpipe.reconcile`).
- `kafka_positions`: per partition, the offset below which this database holds the fate of
  every message, as the bridge commits it (`eventpipe.positions`): what tells, when a
  partition is assigned, that the database lost work Kafka counts as done.
- `kafka_done_ranges`: the ranges of offsets whose fates each transaction recorded, written in
  that transaction, until the bridge records a position past them: what tells a running
  bridge that the database lost work done since its last position (a failover, a restore).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Unicode,
    UnicodeText,
)

from eventpipe.sqltypes import Money, UtcDateTime, event_id_type, key_type, name_type

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
    Column("user_id", key_type(), primary_key=True),
    # Not unique: claimants of one email are all kept; the earliest is the one visible.
    Column("email", key_type(254), nullable=False),
    Column("name", Unicode(200), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    *_version_columns(),
    # Serves "who claims this email, earliest first".
    Index("ix_users_email_version", "email", "version_at", "version_event_id"),
)

orders = Table(
    "orders",
    metadata,
    Column("order_id", key_type(), primary_key=True),
    Column("user_id", key_type(), nullable=False),
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
        key_type(),
        ForeignKey("orders.order_id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("line_no", Integer, primary_key=True, autoincrement=False),
    Column("sku", key_type(), nullable=False),
    Column("quantity", Integer, nullable=False),
    Column("unit_price", Money(), nullable=False),
)

payments = Table(
    "payments",
    metadata,
    Column("payment_id", key_type(), primary_key=True),
    Column("order_id", key_type(), nullable=False, index=True),
    Column("amount", Money(), nullable=False),
    Column("currency", String(3), nullable=False),
    Column("settled_at", UtcDateTime(), nullable=False),
    *_version_columns(),
)

inventory = Table(
    "inventory",
    metadata,
    Column("sku", key_type(), primary_key=True),
    Column("quantity", BigInteger, nullable=False),
    # The latest `adjustedAt` among the deltas applied: when the stock last changed.
    Column("updated_at", UtcDateTime(), nullable=False),
)

applied_events = Table(
    "applied_events",
    metadata,
    Column("event_id", key_type(), primary_key=True),
    Column("event_type", String(32), nullable=False),
    # "applied" wrote the entity's newest version or a delta; "stale" was older than what the
    # entity held and changed nothing.
    Column("outcome", String(16), nullable=False),
    # Event.fingerprint: a copy with the same id but another payload is not a duplicate.
    Column("fingerprint", String(32), nullable=True),
    Column("kafka_topic", String(255), nullable=True),
    Column("kafka_partition", Integer, nullable=True),
    Column("kafka_offset", BigInteger, nullable=True),
    Column("occurred_at", UtcDateTime(), nullable=False),
    Column("applied_at", UtcDateTime(), nullable=False),
    Column("worker", String(255), nullable=True),
)

dead_letters = Table(
    "dead_letters",
    metadata,
    # "e:<Event.fingerprint>" or "m:<message_fingerprint>": one row per failed event.
    Column("dlq_key", String(40), primary_key=True),
    Column("event_id", key_type(), nullable=True),
    Column("event_type", String(64), nullable=True),
    # For an event held by a rule that spans keys: its entity, and the entity it waits for.
    Column("entity_kind", String(16), nullable=True),
    Column("entity_key", key_type(), nullable=True),
    Column("parent_kind", String(16), nullable=True),
    Column("parent_key", key_type(), nullable=True),
    # waiting (held, not yet shown) | open (in the DLQ) | replaying | replayed | resolved
    # (its condition cleared by itself) | purged
    Column("state", String(16), nullable=False),
    Column("error_class", String(64), nullable=False),
    Column("reason", Unicode(1000), nullable=False),
    Column("traceback", UnicodeText(), nullable=True),
    Column("kafka_topic", String(255), nullable=True),
    Column("kafka_partition", Integer, nullable=True),
    Column("kafka_offset", BigInteger, nullable=True),
    Column("attempts", Integer, nullable=False),
    Column("first_failure_at", UtcDateTime(), nullable=False),
    Column("last_failure_at", UtcDateTime(), nullable=False),
    # When a waiting row enters the DLQ; when a replaying row's claim lapses.
    Column("deadline", UtcDateTime(), nullable=True),
    Column("worker", String(255), nullable=False),
    # JSON list of earlier episodes (replayed, resolved), oldest first.
    Column("history", UnicodeText(), nullable=False),
    # Bumped on every change; the Redis projection marks the revision it wrote.
    Column("revision", Integer, nullable=False),
    Column("in_stream", Boolean(create_constraint=False), nullable=False),
    Index("ix_dead_letters_event_id", "event_id"),
    Index("ix_dead_letters_entity", "entity_kind", "entity_key"),
    Index("ix_dead_letters_parent", "parent_kind", "parent_key"),
    Index("ix_dead_letters_state_deadline", "state", "deadline"),
    Index("ix_dead_letters_in_stream", "in_stream"),
)

# The message of each dead letter, kept as the DLQ stream first showed it: a rebuild puts it
# back, and a replay publishes it, after Redis lost the stream and Kafka's retention passed
# its offset. Kept for as long as the letter.
dead_letter_messages = Table(
    "dead_letter_messages",
    metadata,
    Column("dlq_key", String(40), primary_key=True),
    Column("message_key", LargeBinary(), nullable=True),
    Column("message_value", LargeBinary(), nullable=True),  # None: a tombstone
    # JSON, [[name, base64 or null], …] in Kafka's order; None: none.
    Column("headers", UnicodeText(), nullable=True),
)

reconcile_queue = Table(
    "reconcile_queue",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
           autoincrement=True),
    # JSON, the tables written and their keys: {"users": [...], "orders": [...], …}
    Column("keys", UnicodeText(), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
)

kafka_positions = Table(
    "kafka_positions",
    metadata,
    Column("kafka_topic", name_type(255), primary_key=True),
    Column("kafka_partition", Integer, primary_key=True, autoincrement=False),
    # Kafka's id of the topic ("" from a broker with no topic ids): a topic deleted and made
    # again under its name has a new one, and starts from no position.
    Column("topic_id", name_type(64), nullable=False),
    # The next offset to read: every message below it is applied or dead-lettered here.
    Column("next_offset", BigInteger, nullable=False),
    Column("committed_at", UtcDateTime(), nullable=False),
)

kafka_done_ranges = Table(
    "kafka_done_ranges",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
           autoincrement=True),
    Column("kafka_topic", name_type(255), nullable=False),
    # Kafka's id of the topic the task's messages were read from (as in `kafka_positions`).
    Column("topic_id", name_type(64), nullable=False),
    Column("kafka_partition", Integer, nullable=False),
    # Inclusive: every offset from the first to the last was given its fate.
    Column("first_offset", BigInteger, nullable=False),
    Column("last_offset", BigInteger, nullable=False),
    # Serves the bridge's reading of a partition's ranges past its position, and their pruning.
    Index("ix_kafka_done_ranges_partition", "kafka_topic", "kafka_partition", "last_offset"),
)

"""Every event's fate in SQL; entities kept per key, the read model derived from them.

- `applied_events` gains the event's fingerprint (an id reused for another payload is not a
  duplicate) and the worker that applied it.
- `dead_letters`: the durable record of failed and held events (the Redis DLQ projects it).
- `reconcile_queue`: keys whose cross-key rules must be re-checked.
- The cross-key constraints go: users may share an email (the earliest claimant is the visible
  one) and orders or payments may arrive before their parent (they wait, invisible). Both
  rules are applied when reading, so they hold whatever order the events arrive in.

Revision ID: 0003
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from eventpipe.sqltypes import UtcDateTime

revision: str = "0003"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.drop_constraint("uq_users_email", type_="unique")
        batch.create_index("ix_users_email_version", ["email", "version_at", "version_event_id"])
    with op.batch_alter_table("orders") as batch:
        batch.drop_constraint("fk_orders_user_id_users", type_="foreignkey")
    with op.batch_alter_table("payments") as batch:
        batch.drop_constraint("fk_payments_order_id_orders", type_="foreignkey")
    with op.batch_alter_table("applied_events") as batch:
        batch.add_column(sa.Column("fingerprint", sa.String(32), nullable=True))
        batch.add_column(sa.Column("worker", sa.String(255), nullable=True))
    op.create_table(
        "dead_letters",
        sa.Column("dlq_key", sa.String(40), nullable=False),
        sa.Column("event_id", sa.Unicode(64), nullable=True),
        sa.Column("event_type", sa.String(64), nullable=True),
        sa.Column("entity_kind", sa.String(16), nullable=True),
        sa.Column("entity_key", sa.Unicode(64), nullable=True),
        sa.Column("parent_kind", sa.String(16), nullable=True),
        sa.Column("parent_key", sa.Unicode(64), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("error_class", sa.String(64), nullable=False),
        sa.Column("reason", sa.Unicode(1000), nullable=False),
        sa.Column("traceback", sa.UnicodeText(), nullable=True),
        sa.Column("kafka_topic", sa.String(255), nullable=True),
        sa.Column("kafka_partition", sa.Integer(), nullable=True),
        sa.Column("kafka_offset", sa.BigInteger(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("first_failure_at", UtcDateTime(), nullable=False),
        sa.Column("last_failure_at", UtcDateTime(), nullable=False),
        sa.Column("deadline", UtcDateTime(), nullable=True),
        sa.Column("worker", sa.String(255), nullable=False),
        sa.Column("history", sa.UnicodeText(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("in_stream", sa.Boolean(create_constraint=False), nullable=False),
        sa.PrimaryKeyConstraint("dlq_key", name="pk_dead_letters"),
    )
    op.create_index("ix_dead_letters_event_id", "dead_letters", ["event_id"])
    op.create_index("ix_dead_letters_entity", "dead_letters", ["entity_kind", "entity_key"])
    op.create_index("ix_dead_letters_parent", "dead_letters", ["parent_kind", "parent_key"])
    op.create_index("ix_dead_letters_state_deadline", "dead_letters", ["state", "deadline"])
    op.create_index("ix_dead_letters_in_stream", "dead_letters", ["in_stream"])
    op.create_table(
        "reconcile_queue",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                  autoincrement=True, nullable=False),
        sa.Column("keys", sa.UnicodeText(), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_reconcile_queue"),
    )


def downgrade() -> None:
    op.drop_table("reconcile_queue")
    op.drop_index("ix_dead_letters_in_stream", table_name="dead_letters")
    op.drop_index("ix_dead_letters_state_deadline", table_name="dead_letters")
    op.drop_index("ix_dead_letters_parent", table_name="dead_letters")
    op.drop_index("ix_dead_letters_entity", table_name="dead_letters")
    op.drop_index("ix_dead_letters_event_id", table_name="dead_letters")
    op.drop_table("dead_letters")
    with op.batch_alter_table("applied_events") as batch:
        batch.drop_column("worker")
        batch.drop_column("fingerprint")
    # Restoring the cross-key constraints fails if the data breaks them (shared emails,
    # orders of users that never arrived): such rows have to be removed by hand first.
    with op.batch_alter_table("payments") as batch:
        batch.create_foreign_key("fk_payments_order_id_orders", "orders", ["order_id"],
                                 ["order_id"])
    with op.batch_alter_table("orders") as batch:
        batch.create_foreign_key("fk_orders_user_id_users", "users", ["user_id"], ["user_id"])
    with op.batch_alter_table("users") as batch:
        batch.drop_index("ix_users_email_version")
        batch.create_unique_constraint("uq_users_email", ["email"])

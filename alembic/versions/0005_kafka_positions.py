"""`kafka_positions`: what the database holds of each partition, committed with Kafka's offsets.

The bridge writes each partition's offset here before it commits it to Kafka: every message
below it is applied or dead-lettered in this database. A database restored from a backup, or
one a failover left behind its primary, holds less than Kafka's committed offsets say; the
bridge reads the partition again from here (`eventpipe.positions`).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

from eventpipe.sqltypes import UtcDateTime, name_type

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    positions = op.create_table(
        "kafka_positions",
        sa.Column("kafka_topic", name_type(255), nullable=False),
        sa.Column("kafka_partition", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("topic_id", name_type(64), nullable=False),
        sa.Column("next_offset", sa.BigInteger(), nullable=False),
        sa.Column("committed_at", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("kafka_topic", "kafka_partition", name="pk_kafka_positions"),
    )
    # A database that holds no fate yet is made with positions: a partition it has none of
    # holds nothing, whatever fates tasks left in the queues write before a bridge comes
    # (`eventpipe.positions.MADE_WITH_POSITIONS`, a name no topic has).
    if op.get_context().as_sql:  # a script for later (`alembic upgrade --sql`): no data read
        return
    bind = op.get_bind()
    if all(bind.execute(sa.select(sa.literal(1)).select_from(sa.table(name)).limit(1)).first()
           is None for name in ("applied_events", "dead_letters")):
        op.bulk_insert(positions, [{"kafka_topic": "", "kafka_partition": -1, "topic_id": "",
                                    "next_offset": 0, "committed_at": datetime.now(UTC)}])


def downgrade() -> None:
    op.drop_table("kafka_positions")

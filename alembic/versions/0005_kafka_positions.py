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

import sqlalchemy as sa
from alembic import op

from eventpipe.sqltypes import UtcDateTime, name_type

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "kafka_positions",
        sa.Column("kafka_topic", name_type(255), nullable=False),
        sa.Column("kafka_partition", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("topic_id", name_type(64), nullable=False),
        sa.Column("next_offset", sa.BigInteger(), nullable=False),
        sa.Column("committed_at", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("kafka_topic", "kafka_partition", name="pk_kafka_positions"),
    )


def downgrade() -> None:
    op.drop_table("kafka_positions")

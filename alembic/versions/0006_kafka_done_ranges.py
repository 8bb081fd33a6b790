"""`kafka_done_ranges`: the offsets each transaction gave a fate, until a position passes them.

A worker records the ranges of offsets of the messages it gave a fate in the transaction that
records the fates; the bridge, as it records a position, checks that the database holds
every offset it takes for done since the last one, and deletes the ranges below it. A
failover, or a restore, that lost work done since the last position then lacks its ranges,
where the ledger in Redis still says done (`eventpipe.positions`).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from eventpipe.sqltypes import name_type

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "kafka_done_ranges",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                  autoincrement=True, nullable=False),
        sa.Column("kafka_topic", name_type(255), nullable=False),
        sa.Column("topic_id", name_type(64), nullable=False),
        sa.Column("kafka_partition", sa.Integer(), nullable=False),
        sa.Column("first_offset", sa.BigInteger(), nullable=False),
        sa.Column("last_offset", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_kafka_done_ranges"),
    )
    op.create_index("ix_kafka_done_ranges_partition", "kafka_done_ranges",
                    ["kafka_topic", "kafka_partition", "last_offset"])


def downgrade() -> None:
    op.drop_index("ix_kafka_done_ranges_partition", table_name="kafka_done_ranges")
    op.drop_table("kafka_done_ranges")

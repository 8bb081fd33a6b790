"""`dead_letter_messages`: the message of each dead letter, in SQL.

The DLQ stream in Redis showed a letter's message, and Kafka kept it at its position: once
Kafka's retention had passed the offset, a Redis that lost the stream lost the only copy.
The projection now keeps the message it shows in SQL, which a rebuild and a replay read
before Kafka. Letters shown before this revision have their bytes kept as they are shown
again.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "dead_letter_messages",
        sa.Column("dlq_key", sa.String(40), nullable=False),
        sa.Column("message_key", sa.LargeBinary(), nullable=True),
        sa.Column("message_value", sa.LargeBinary(), nullable=True),
        sa.Column("headers", sa.UnicodeText(), nullable=True),
        sa.PrimaryKeyConstraint("dlq_key", name="pk_dead_letter_messages"),
    )


def downgrade() -> None:
    op.drop_table("dead_letter_messages")

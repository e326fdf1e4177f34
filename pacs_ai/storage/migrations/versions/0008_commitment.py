"""Storage commitment: per delivery, its state and latest request; what it covers; each
request's Transaction UID.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("commitment", sa.String(16), nullable=False, server_default=""))
        batch.add_column(
            sa.Column("commitment_uid", sa.String(64), nullable=False, server_default="")
        )
        batch.add_column(sa.Column("commitment_requested_at", sa.Float, nullable=True))
        batch.add_column(
            sa.Column("commitment_requests", sa.Integer, nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("committed_at", sa.Float, nullable=True))
        batch.add_column(
            sa.Column("commitment_error", sa.String(1024), nullable=False, server_default="")
        )
    op.create_index("ix_deliveries_study_commitment", "deliveries", ["study_id", "commitment"])
    op.create_table(
        "commitment_items",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "delivery_id",
            sa.Integer,
            sa.ForeignKey("deliveries.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
    )
    op.create_index("ix_commitment_items_delivery", "commitment_items", ["delivery_id"])
    op.create_table(
        "commitment_transactions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "delivery_id",
            sa.Integer,
            sa.ForeignKey("deliveries.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("transaction_uid", sa.String(64), nullable=False, unique=True),
        sa.Column("requested_at", sa.Float, nullable=False),
        sa.Column("answered_at", sa.Float, nullable=True),
        sa.Column("event_type", sa.Integer, nullable=True),
    )
    op.create_index(
        "ix_commitment_transactions_delivery", "commitment_transactions", ["delivery_id"]
    )


def downgrade() -> None:
    op.drop_index("ix_commitment_transactions_delivery", table_name="commitment_transactions")
    op.drop_table("commitment_transactions")
    op.drop_index("ix_commitment_items_delivery", table_name="commitment_items")
    op.drop_table("commitment_items")
    op.drop_index("ix_deliveries_study_commitment", table_name="deliveries")
    with op.batch_alter_table("deliveries") as batch:
        for column in (
            "commitment_error",
            "committed_at",
            "commitment_requests",
            "commitment_requested_at",
            "commitment_uid",
            "commitment",
        ):
            batch.drop_column(column)

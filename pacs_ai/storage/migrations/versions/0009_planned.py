"""Which completion of each study was planned, so that a completion the node died before
planning is planned by the reconciler.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "studies",
        sa.Column("planned_completions", sa.Integer, nullable=False, server_default="0"),
    )
    # Studies completed before this column existed were planned when they completed.
    op.execute("UPDATE studies SET planned_completions = completions")


def downgrade() -> None:
    op.drop_column("studies", "planned_completions")

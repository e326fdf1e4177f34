"""Retention: when a study's source images were purged (its rows and results stay).

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("studies", sa.Column("purged_at", sa.Float, nullable=True))


def downgrade() -> None:
    op.drop_column("studies", "purged_at")

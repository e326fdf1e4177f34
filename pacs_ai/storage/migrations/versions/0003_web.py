"""The HTTP side: API tokens, reviews, worklist columns on studies, result instances.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tokens",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("peer", sa.String(64), nullable=False, server_default=""),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("revoked_at", sa.Float, nullable=True),
        sa.Column("last_used_at", sa.Float, nullable=True),
    )
    op.create_table(
        "reviews",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "study_id", sa.Integer, sa.ForeignKey("studies.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column(
            "job_id", sa.Integer, sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=True
        ),
        sa.Column("finding", sa.String(128), nullable=False, server_default=""),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("comment", sa.String(2000), nullable=False, server_default=""),
        sa.Column("reviewer", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_index("ix_reviews_study", "reviews", ["study_id"])
    op.add_column(
        "studies", sa.Column("priority", sa.String(16), nullable=False, server_default="")
    )
    op.add_column(
        "studies", sa.Column("priority_rank", sa.Integer, nullable=False, server_default="0")
    )
    op.add_column(
        "studies",
        sa.Column("findings_summary", sa.String(512), nullable=False, server_default=""),
    )
    op.add_column(
        "studies",
        sa.Column("review_state", sa.String(16), nullable=False, server_default="UNREVIEWED"),
    )
    op.create_index("ix_studies_worklist", "studies", ["priority_rank", "first_received_at"])
    op.add_column(
        "instances", sa.Column("kind", sa.String(8), nullable=False, server_default="source")
    )


def downgrade() -> None:
    op.drop_column("instances", "kind")
    op.drop_index("ix_studies_worklist", "studies")
    for column in ("review_state", "findings_summary", "priority_rank", "priority"):
        op.drop_column("studies", column)
    op.drop_index("ix_reviews_study", "reviews")
    op.drop_table("reviews")
    op.drop_table("tokens")

"""Index of received studies, series and instances.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "studies",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("calling_ae", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("patient_id", sa.String(64), nullable=False),
        sa.Column("patient_name", sa.String(324), nullable=False),
        sa.Column("patient_birth_date", sa.String(8), nullable=False),
        sa.Column("patient_sex", sa.String(16), nullable=False),
        sa.Column("accession_number", sa.String(16), nullable=False),
        sa.Column("study_date", sa.String(8), nullable=False),
        sa.Column("study_time", sa.String(16), nullable=False),
        sa.Column("study_description", sa.String(64), nullable=False),
        sa.Column("referring_physician_name", sa.String(324), nullable=False),
        sa.Column("first_received_at", sa.Float, nullable=False),
        sa.Column("last_received_at", sa.Float, nullable=False),
        sa.Column("completed_at", sa.Float, nullable=True),
        sa.Column("series_count", sa.Integer, nullable=False),
        sa.Column("instance_count", sa.Integer, nullable=False),
        sa.Column("completions", sa.Integer, nullable=False),
        sa.Column("reopened", sa.Integer, nullable=False),
        sa.UniqueConstraint("study_instance_uid", "calling_ae", name="uq_studies_uid_ae"),
    )
    op.create_index("ix_studies_state_last", "studies", ["state", "last_received_at"])
    op.create_table(
        "series",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "study_id", sa.Integer, sa.ForeignKey("studies.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("series_instance_uid", sa.String(64), nullable=False),
        sa.Column("modality", sa.String(16), nullable=False),
        sa.Column("series_number", sa.Integer, nullable=True),
        sa.Column("series_description", sa.String(64), nullable=False),
        sa.Column("body_part_examined", sa.String(64), nullable=False),
        sa.Column("protocol_name", sa.String(64), nullable=False),
        sa.Column("manufacturer", sa.String(64), nullable=False),
        sa.Column("slice_thickness", sa.Float, nullable=True),
        sa.Column("image_type", sa.String(256), nullable=False),
        sa.Column("first_received_at", sa.Float, nullable=False),
        sa.UniqueConstraint("study_id", "series_instance_uid", name="uq_series_study_uid"),
    )
    op.create_table(
        "instances",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False, unique=True),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column(
            "series_id", sa.Integer, sa.ForeignKey("series.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column(
            "study_id", sa.Integer, sa.ForeignKey("studies.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("instance_number", sa.Integer, nullable=True),
        sa.Column("transfer_syntax_uid", sa.String(64), nullable=False),
        sa.Column("path", sa.String(200), nullable=False),
        sa.Column("size_bytes", sa.Integer, nullable=False),
        sa.Column("calling_ae", sa.String(16), nullable=False),
        sa.Column("received_at", sa.Float, nullable=False),
        sa.Column("duplicates", sa.Integer, nullable=False),
    )
    op.create_index("ix_instances_series", "instances", ["series_id"])
    op.create_index("ix_instances_study", "instances", ["study_id"])


def downgrade() -> None:
    op.drop_table("instances")
    op.drop_table("series")
    op.drop_index("ix_studies_state_last", table_name="studies")
    op.drop_table("studies")

"""DICOMweb: indexes for QIDO-RS matching keys and for series looked up by UID.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_INDEXES = (
    ("ix_studies_patient_id", "studies", ["patient_id"]),
    ("ix_studies_study_date", "studies", ["study_date"]),
    ("ix_studies_accession_number", "studies", ["accession_number"]),
    ("ix_series_uid", "series", ["series_instance_uid"]),
)


def upgrade() -> None:
    for name, table, columns in _INDEXES:
        op.create_index(name, table, columns)


def downgrade() -> None:
    for name, table, _ in reversed(_INDEXES):
        op.drop_index(name, table)

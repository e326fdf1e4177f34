"""Worklist: jobs and reviews looked up by study.

The worklist reads a page's jobs by study, filters studies by their jobs' model and state,
and every finished job refreshes its study from all the study's jobs: without an index each
of these scans the whole jobs table.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_jobs_study", "jobs", ["study_id", "model", "state"])


def downgrade() -> None:
    op.drop_index("ix_jobs_study", "jobs")

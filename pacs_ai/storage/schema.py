"""Index tables. Migrations in ``migrations/versions`` create them; keep the two in step.

Times are UNIX seconds (float) so SQLite and PostgreSQL compare them the same way.
A study row is one reception: the same StudyInstanceUID from two calling AEs is two rows,
assembled separately (PS3.4 gives no promise that two senders send the same instances).
"""

from __future__ import annotations

from sqlalchemy import (
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
)

metadata = MetaData()

RECEIVING = "RECEIVING"
COMPLETE = "COMPLETE"
STUDY_STATES = (RECEIVING, COMPLETE)

studies = Table(
    "studies",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("study_instance_uid", String(64), nullable=False),
    Column("calling_ae", String(16), nullable=False),
    Column("state", String(16), nullable=False),
    Column("patient_id", String(64), nullable=False, default=""),
    Column("patient_name", String(324), nullable=False, default=""),
    Column("patient_birth_date", String(8), nullable=False, default=""),
    Column("patient_sex", String(16), nullable=False, default=""),
    Column("accession_number", String(16), nullable=False, default=""),
    Column("study_date", String(8), nullable=False, default=""),
    Column("study_time", String(16), nullable=False, default=""),
    Column("study_description", String(64), nullable=False, default=""),
    Column("referring_physician_name", String(324), nullable=False, default=""),
    Column("first_received_at", Float, nullable=False),
    Column("last_received_at", Float, nullable=False),
    Column("completed_at", Float, nullable=True),
    # Counts as of the last completion.
    Column("series_count", Integer, nullable=False, default=0),
    Column("instance_count", Integer, nullable=False, default=0),
    # How often the study became COMPLETE, and how often a new instance reopened it.
    Column("completions", Integer, nullable=False, default=0),
    Column("reopened", Integer, nullable=False, default=0),
    UniqueConstraint("study_instance_uid", "calling_ae", name="uq_studies_uid_ae"),
    Index("ix_studies_state_last", "state", "last_received_at"),
)

series = Table(
    "series",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("study_id", Integer, ForeignKey("studies.id", ondelete="CASCADE"), nullable=False),
    Column("series_instance_uid", String(64), nullable=False),
    Column("modality", String(16), nullable=False, default=""),
    Column("series_number", Integer, nullable=True),
    Column("series_description", String(64), nullable=False, default=""),
    Column("body_part_examined", String(64), nullable=False, default=""),
    Column("protocol_name", String(64), nullable=False, default=""),
    Column("manufacturer", String(64), nullable=False, default=""),
    Column("slice_thickness", Float, nullable=True),
    Column("image_type", String(256), nullable=False, default=""),
    Column("first_received_at", Float, nullable=False),
    UniqueConstraint("study_id", "series_instance_uid", name="uq_series_study_uid"),
)

instances = Table(
    "instances",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("sop_instance_uid", String(64), nullable=False, unique=True),
    Column("sop_class_uid", String(64), nullable=False),
    Column("series_id", Integer, ForeignKey("series.id", ondelete="CASCADE"), nullable=False),
    Column("study_id", Integer, ForeignKey("studies.id", ondelete="CASCADE"), nullable=False),
    Column("instance_number", Integer, nullable=True),
    Column("transfer_syntax_uid", String(64), nullable=False),
    # Relative to the spool root: studies/<Study>/<Series>/<SOP>.dcm
    Column("path", String(200), nullable=False),
    Column("size_bytes", Integer, nullable=False),
    Column("calling_ae", String(16), nullable=False),
    Column("received_at", Float, nullable=False),
    # Further receptions of the same SOP Instance UID: stored once, counted here.
    Column("duplicates", Integer, nullable=False, default=0),
    Index("ix_instances_series", "series_id"),
    Index("ix_instances_study", "study_id"),
)

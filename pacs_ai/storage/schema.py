"""Index tables. Migrations in ``migrations/versions`` create them; keep the two in step.

Times are UNIX seconds (float) so SQLite and PostgreSQL compare them the same way.
A study row is one reception: the same StudyInstanceUID from two calling AEs is two rows,
assembled separately (PS3.4 gives no promise that two senders send the same instances).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
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

# For values that may pass 2**31 - 1, PostgreSQL's INTEGER limit: sizes of instances (a
# whole-slide or long cine one passes 2 GiB), numbers a sender may give past the IS range,
# and the keys of the tables that grow by one row per image or event (a node that receives
# a million images a day numbers its 2^31st in six years; keys are never reused). SQLite's
# INTEGER already holds 64 bits, and only INTEGER PRIMARY KEY is its rowid, so there it
# stays (migration 0010).
BIG_INTEGER = BigInteger().with_variant(Integer(), "sqlite")

SOURCE, RESULT = "source", "result"

RECEIVING = "RECEIVING"
COMPLETE = "COMPLETE"
STUDY_STATES = (RECEIVING, COMPLETE)

# studies.rules_fired: room for the names of the rules a completion matched.
RULES_FIRED_MAX = 512
# Ends a rules_fired list cut short to fit; no rule name can hold it (route.RuleSettings).
RULES_FIRED_MORE = "…"

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
    # The completion whose jobs and forwards were last planned (pipeline/dispatch.py). Behind
    # ``completions`` when the node died between completing a study and planning it: the
    # reconciler then plans it.
    Column("planned_completions", Integer, nullable=False, default=0),
    # The rules that matched when that completion was planned, comma-separated in rule order
    # ("" = none: the study is kept and nothing runs), written in the same transaction; what
    # the latest completion got once planned_completions == completions. A server default
    # only: a Python one would put the column in every INSERT through this table, which then
    # fails on a database at a revision before 0011 (the migration tests fill those).
    Column("rules_fired", String(RULES_FIRED_MAX), nullable=False, server_default=""),
    # The worklist (pacs_ai/worklist): priority from the rules and the findings, kept here so
    # the list sorts in the database; priority_rank is Priority.rank (0 = no AI planned).
    Column("priority", String(16), nullable=False, default=""),
    Column("priority_rank", Integer, nullable=False, default=0),
    Column("findings_summary", String(512), nullable=False, default=""),
    Column("review_state", String(16), nullable=False, default="UNREVIEWED"),
    # When retention removed the source images (pacs_ai/storage/retention.py); None = kept.
    Column("purged_at", Float, nullable=True),
    UniqueConstraint("study_instance_uid", "calling_ae", name="uq_studies_uid_ae"),
    Index("ix_studies_state_last", "state", "last_received_at"),
    Index("ix_studies_worklist", "priority_rank", "first_received_at"),
    # QIDO-RS matching keys (pacs_ai/web/dicomweb): exact matches on these stay index lookups.
    Index("ix_studies_patient_id", "patient_id"),
    Index("ix_studies_study_date", "study_date"),
    Index("ix_studies_accession_number", "accession_number"),
)

series = Table(
    "series",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("study_id", Integer, ForeignKey("studies.id", ondelete="CASCADE"), nullable=False),
    Column("series_instance_uid", String(64), nullable=False),
    Column("modality", String(16), nullable=False, default=""),
    Column("series_number", BIG_INTEGER, nullable=True),
    Column("series_description", String(64), nullable=False, default=""),
    Column("body_part_examined", String(64), nullable=False, default=""),
    Column("protocol_name", String(64), nullable=False, default=""),
    Column("manufacturer", String(64), nullable=False, default=""),
    Column("slice_thickness", Float, nullable=True),
    Column("image_type", String(256), nullable=False, default=""),
    Column("first_received_at", Float, nullable=False),
    UniqueConstraint("study_id", "series_instance_uid", name="uq_series_study_uid"),
    # WADO-RS and QIDO-RS look series up by UID across receptions.
    Index("ix_series_uid", "series_instance_uid"),
)

instances = Table(
    "instances",
    metadata,
    Column("id", BIG_INTEGER, primary_key=True, autoincrement=True),
    Column("sop_instance_uid", String(64), nullable=False, unique=True),
    Column("sop_class_uid", String(64), nullable=False),
    Column("series_id", Integer, ForeignKey("series.id", ondelete="CASCADE"), nullable=False),
    Column("study_id", Integer, ForeignKey("studies.id", ondelete="CASCADE"), nullable=False),
    Column("instance_number", BIG_INTEGER, nullable=True),
    Column("transfer_syntax_uid", String(64), nullable=False),
    # Relative to the spool root: studies/<Study>/<Series>/<SOP>.dcm
    Column("path", String(200), nullable=False),
    Column("size_bytes", BIG_INTEGER, nullable=False),
    Column("calling_ae", String(16), nullable=False),
    Column("received_at", Float, nullable=False),
    # Further receptions of the same SOP Instance UID: stored once, counted here.
    Column("duplicates", Integer, nullable=False, default=0),
    # "source" (received; path relative to the spool root) or "result" (a SEG/SR the node
    # made; path relative to the data dir). Results never reopen a study or meet the rules.
    Column("kind", String(8), nullable=False, default=SOURCE),
    Index("ix_instances_series", "series_id"),
    Index("ix_instances_study", "study_id"),
)


# --- the AI path ------------------------------------------------------------------------------

QUEUED, RUNNING, ENCODED, DELIVERED = "QUEUED", "RUNNING", "ENCODED", "DELIVERED"
SKIPPED, FAILED, CANCELED = "SKIPPED", "FAILED", "CANCELED"
JOB_STATES = (QUEUED, RUNNING, ENCODED, DELIVERED, SKIPPED, FAILED, CANCELED)
# What a worker times in a job, in order (jobs.timings): waiting for its warm-up, loading the
# model, reading the series into a volume, the model, the SEG and SR. Their sum runs from the
# claim to ENCODED.
WORKER_STAGES = ("warm-up", "load", "volume", "inference", "encode")
JOB_FINAL = (DELIVERED, SKIPPED, FAILED, CANCELED)

PENDING, SENDING, DONE = "PENDING", "SENDING", "DONE"
DELIVERY_STATES = (PENDING, SENDING, DONE, FAILED, CANCELED)

jobs = Table(
    "jobs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("study_id", Integer, ForeignKey("studies.id", ondelete="CASCADE"), nullable=False),
    Column("series_id", Integer, ForeignKey("series.id", ondelete="CASCADE"), nullable=False),
    Column("model", String(64), nullable=False),
    Column("rule", String(64), nullable=False),
    Column("priority", String(16), nullable=False),
    Column("state", String(16), nullable=False),
    Column("reason", String(1024), nullable=False, default=""),
    Column("attempts", Integer, nullable=False, default=0),
    Column("max_attempts", Integer, nullable=False),
    # Peer names the results go to, comma-separated (resolved when the job was made).
    Column("destinations", String(1024), nullable=False, default=""),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("enqueued_at", Float, nullable=True),
    Column("started_at", Float, nullable=True),
    Column("lease_expires_at", Float, nullable=True),
    Column("worker", String(128), nullable=False, default=""),
    Column("finished_at", Float, nullable=True),
    # Stage durations in seconds, JSON, keyed by WORKER_STAGES.
    Column("timings", String(1024), nullable=False, default="{}"),
    Column("findings", String(4096), nullable=False, default=""),
    # Which completion of the study made this job: a reopened study may run its models again.
    Column("completion", Integer, nullable=False, default=1),
    UniqueConstraint("series_id", "model", "rule", "completion", name="uq_jobs_series_model_rule"),
    Index("ix_jobs_state", "state"),
    # The worklist: a study's jobs, and studies by their jobs' model and state (0006).
    Index("ix_jobs_study", "study_id", "model", "state"),
)

deliveries = Table(
    "deliveries",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", Integer, ForeignKey("jobs.id", ondelete="CASCADE"), nullable=True),
    Column("study_id", Integer, ForeignKey("studies.id", ondelete="CASCADE"), nullable=False),
    Column("peer", String(64), nullable=False),
    # SEG / SR for a job's results; SERIES / STUDY for a plain forward.
    Column("kind", String(16), nullable=False),
    # What to send: a result file relative to the data dir, or a series UID for a forward.
    Column("payload", String(256), nullable=False),
    Column("sop_instance_uid", String(64), nullable=False, default=""),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("max_attempts", Integer, nullable=False),
    Column("last_error", String(1024), nullable=False, default=""),
    Column("next_attempt_at", Float, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    # Storage commitment (pacs_ai/storage/commitments.py), for peers with storage_commitment:
    # "" (not asked), REQUESTED, COMMITTED, FAILED (the peer reported failures) or UNANSWERED
    # (no report after the last request). While REQUESTED, next_attempt_at is when the
    # reconciler asks again.
    Column("commitment", String(16), nullable=False, default=""),
    # The Transaction UID of the latest request, when it went, and how many went.
    Column("commitment_uid", String(64), nullable=False, default=""),
    Column("commitment_requested_at", Float, nullable=True),
    Column("commitment_requests", Integer, nullable=False, default=0),
    Column("committed_at", Float, nullable=True),
    # Why the commitment is not (yet) there: the peer's failure reasons, or a request error.
    Column("commitment_error", String(1024), nullable=False, default=""),
    UniqueConstraint("job_id", "study_id", "peer", "kind", "payload", name="uq_deliveries_what"),
    Index("ix_deliveries_state", "state"),
    # Retention asks, per study, whether any commitment is still missing.
    Index("ix_deliveries_study_commitment", "study_id", "commitment"),
)

COMMITMENT_REQUESTED, COMMITTED, UNANSWERED = "REQUESTED", "COMMITTED", "UNANSWERED"
COMMITMENT_STATES = ("", COMMITMENT_REQUESTED, COMMITTED, FAILED, UNANSWERED)

# What a delivery's commitment covers: each SOP instance it stored on the peer, as sent.
commitment_items = Table(
    "commitment_items",
    metadata,
    Column("id", BIG_INTEGER, primary_key=True, autoincrement=True),
    Column("delivery_id", Integer, ForeignKey("deliveries.id", ondelete="CASCADE"), nullable=False),
    Column("sop_class_uid", String(64), nullable=False),
    Column("sop_instance_uid", String(64), nullable=False),
    Index("ix_commitment_items_delivery", "delivery_id"),
)

# Every N-ACTION sent: a report names its Transaction UID, which may be an earlier request's.
commitment_transactions = Table(
    "commitment_transactions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("delivery_id", Integer, ForeignKey("deliveries.id", ondelete="CASCADE"), nullable=False),
    Column("transaction_uid", String(64), nullable=False, unique=True),
    Column("requested_at", Float, nullable=False),
    Column("answered_at", Float, nullable=True),
    # N-EVENT-REPORT Event Type ID: 1 all committed, 2 failures exist; NULL = no report yet.
    Column("event_type", Integer, nullable=True),
    Index("ix_commitment_transactions_delivery", "delivery_id"),
)


# --- the HTTP side ----------------------------------------------------------------------------

tokens = Table(
    "tokens",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("role", String(16), nullable=False),
    # SHA-256 of the token: tokens are 256 random bits, so a plain hash cannot be reversed.
    Column("token_hash", String(64), nullable=False, unique=True),
    # The peer a STOW-RS sender with this token stands for (results go back to it).
    Column("peer", String(64), nullable=False, default=""),
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float, nullable=True),
    Column("last_used_at", Float, nullable=True),
)

ACCEPT, REJECT, COMMENT = "ACCEPT", "REJECT", "COMMENT"
REVIEW_ACTIONS = (ACCEPT, REJECT, COMMENT)
UNREVIEWED, ACCEPTED, REJECTED, PARTIAL = "UNREVIEWED", "ACCEPTED", "REJECTED", "PARTIAL"

reviews = Table(
    "reviews",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("study_id", Integer, ForeignKey("studies.id", ondelete="CASCADE"), nullable=False),
    # The job whose finding is reviewed; NULL for a review of the whole study.
    Column("job_id", Integer, ForeignKey("jobs.id", ondelete="CASCADE"), nullable=True),
    # The finding's name within the job's findings; "" for the job (or study) as a whole.
    Column("finding", String(128), nullable=False, default=""),
    Column("action", String(16), nullable=False),
    Column("comment", String(2000), nullable=False, default=""),
    # The token name of who reviewed.
    Column("reviewer", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
    Index("ix_reviews_study", "study_id"),
)


# --- the audit trail (pacs_ai/audit) ----------------------------------------------------------

# Append-only: migration 0005 adds triggers that refuse UPDATE and DELETE on this table.
audit = Table(
    "audit",
    metadata,
    Column("id", BIG_INTEGER, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False),
    Column("kind", String(32), nullable=False),
    # DICOM audit codes (PS3.15 A.5.3): EventID, EventTypeCode, EventActionCode.
    Column("event_id", String(16), nullable=False),
    Column("event_type", String(16), nullable=False, default=""),
    Column("action", String(1), nullable=False),
    # EventOutcomeIndicator: 0 success, 4 minor, 8 serious, 12 major failure.
    Column("outcome", Integer, nullable=False, default=0),
    Column("actor", String(64), nullable=False, default=""),
    Column("address", String(64), nullable=False, default=""),
    Column("target", String(256), nullable=False, default=""),
    Column("detail", String(2000), nullable=False, default="{}"),
    Index("ix_audit_at", "at"),
)

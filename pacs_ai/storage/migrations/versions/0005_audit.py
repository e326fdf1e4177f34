"""The audit trail: an append-only table (UPDATE and DELETE refused by triggers).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_REFUSAL = "the audit trail is append-only"


def upgrade() -> None:
    op.create_table(
        "audit",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("event_id", sa.String(16), nullable=False),
        sa.Column("event_type", sa.String(16), nullable=False, server_default=""),
        sa.Column("action", sa.String(1), nullable=False),
        sa.Column("outcome", sa.Integer, nullable=False, server_default="0"),
        sa.Column("actor", sa.String(64), nullable=False, server_default=""),
        sa.Column("address", sa.String(64), nullable=False, server_default=""),
        sa.Column("target", sa.String(256), nullable=False, server_default=""),
        sa.Column("detail", sa.String(2000), nullable=False, server_default="{}"),
    )
    op.create_index("ix_audit_at", "audit", ["at"])
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "CREATE FUNCTION audit_append_only() RETURNS trigger AS $$ BEGIN "
            f"RAISE EXCEPTION '{_REFUSAL}'; END; $$ LANGUAGE plpgsql"
        )
        op.execute(
            "CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE ON audit "
            "FOR EACH ROW EXECUTE FUNCTION audit_append_only()"
        )
    else:
        for verb in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER audit_no_{verb.lower()} BEFORE {verb} ON audit "
                f"BEGIN SELECT RAISE(ABORT, '{_REFUSAL}'); END"
            )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER audit_append_only ON audit")
        op.execute("DROP FUNCTION audit_append_only()")
    op.drop_index("ix_audit_at", "audit")
    op.drop_table("audit")

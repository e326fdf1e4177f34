"""64-bit sizes, numbers and keys, so that instances of 2 GiB and more are indexed on
PostgreSQL, and the tables that grow by a row per image or event never run out of keys.

Only PostgreSQL changes: its INTEGER is 32 bits, SQLite's already holds 64. Changing the
type rewrites the table, so each table is altered in one statement, once; a key's sequence
is widened with it (PostgreSQL's SERIAL makes an ``AS integer`` sequence, which stops at
2^31 - 1 whatever the column holds). A downgrade fails with "integer out of range" while a
row holds a value that INTEGER cannot.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

COLUMNS = {
    "instances": ("id", "size_bytes", "instance_number"),
    "series": ("series_number",),
    "audit": ("id",),
    "commitment_items": ("id",),
}


def upgrade() -> None:
    _alter("BIGINT")


def downgrade() -> None:
    _alter("INTEGER")


def _alter(sql_type: str) -> None:
    if op.get_bind().dialect.name == "sqlite":
        return
    for table, columns in COLUMNS.items():
        changes = ", ".join(f"ALTER COLUMN {column} TYPE {sql_type}" for column in columns)
        op.execute(f"ALTER TABLE {table} {changes}")
        if "id" in columns:
            sequence = (
                op.get_bind()
                .exec_driver_sql(f"SELECT pg_get_serial_sequence('{table}', 'id')")
                .scalar_one()
            )
            op.execute(f"ALTER SEQUENCE {sequence} AS {sql_type}")

"""Which rules matched a study's planned completion, so that an admin can list the studies
that matched none (kept, nothing runs) beside those that ran something.

Studies planned before this column existed get the rules that made jobs for their planned
completion, in name order (a migration does not know the configured order). A rule that only
forwards leaves no job row naming it, so such a study reads as having matched none.

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

from collections import defaultdict

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

# As in pacs_ai/storage/schema.py at this revision: a migration keeps its own copy.
RULES_FIRED_MAX = 512
RULES_FIRED_MORE = "…"

_studies = sa.table(
    "studies",
    sa.column("id", sa.Integer),
    sa.column("planned_completions", sa.Integer),
    sa.column("rules_fired", sa.String),
)
_jobs = sa.table(
    "jobs",
    sa.column("study_id", sa.Integer),
    sa.column("rule", sa.String),
    sa.column("completion", sa.Integer),
)


def upgrade() -> None:
    op.add_column(
        "studies",
        sa.Column("rules_fired", sa.String(RULES_FIRED_MAX), nullable=False, server_default=""),
    )
    fired: dict[int, set[str]] = defaultdict(set)
    rows = op.get_bind().execute(
        sa.select(_jobs.c.study_id, _jobs.c.rule)
        .distinct()
        .select_from(
            _jobs.join(
                _studies,
                sa.and_(
                    _studies.c.id == _jobs.c.study_id,
                    _jobs.c.completion == _studies.c.planned_completions,
                ),
            )
        )
    )
    for study_id, rule in rows:
        fired[study_id].add(rule)
    if fired:
        op.get_bind().execute(
            sa.update(_studies)
            .where(_studies.c.id == sa.bindparam("study_id"))
            .values(rules_fired=sa.bindparam("names")),
            [{"study_id": s, "names": _joined(sorted(names))} for s, names in fired.items()],
        )


def downgrade() -> None:
    op.drop_column("studies", "rules_fired")


def _joined(names: list[str]) -> str:
    text = ",".join(names)
    while len(text) > RULES_FIRED_MAX:
        names = names[:-1]
        text = ",".join([*names, RULES_FIRED_MORE])
    return text

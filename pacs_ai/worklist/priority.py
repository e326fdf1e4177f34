"""A study's worklist priority and findings summary, recomputed from its jobs.

The priority is the most urgent of the priorities of the rules that made the study's jobs,
raised by those rules' ``escalate`` entries when a job's findings meet them (a nodule at
certainty 0.9 makes the study STAT). It never falls below what the rules planned. A study
with no jobs has rank 0 and no priority: no AI was planned for it.

:func:`refresh` is called wherever jobs change what they say: when the dispatcher makes them
and when a worker finishes one. It reads only the database and the rules, so a worker on
another machine with the same configuration gives the same answer as the node.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Engine, update

from pacs_ai.pipeline.route import Priority, RuleSettings
from pacs_ai.storage.schema import CANCELED, studies
from pacs_ai.worklist import reviews
from pacs_ai.worklist.findings import JobView, job_views, summarize

logger = logging.getLogger(__name__)

SUMMARY_CHARS = 512  # studies.findings_summary


@dataclass(frozen=True)
class Worklisted:
    priority: Priority | None
    summary: str
    escalated_by: str = ""
    """``job <id> <finding>`` when a finding raised the priority, for the log."""

    @property
    def rank(self) -> int:
        return 0 if self.priority is None else self.priority.rank


def compute(views: Sequence[JobView], rules: Sequence[RuleSettings]) -> Worklisted:
    """Priority and summary of a study from its current jobs (pure)."""
    if not views:
        return Worklisted(None, "")
    by_rule = {rule.name: rule for rule in rules}
    priority = max((v.priority for v in views), key=lambda p: p.rank)
    escalated_by = ""
    # A canceled job's findings are not offered to the radiologist, so they escalate nothing.
    with_findings = [v for v in views if v.state != CANCELED and v.findings.findings]
    for view in with_findings:
        rule = by_rule.get(view.rule)
        if rule is None:
            continue  # the rule was renamed or removed since: its findings still show
        for escalation in rule.escalate:
            for finding in view.findings.findings:
                raised = escalation.priority
                if raised.rank > priority.rank and escalation.raises(
                    finding.name, finding.certainty
                ):
                    priority = raised
                    escalated_by = f"job {view.id} {finding.key}"
    return Worklisted(priority, _summary(views), escalated_by)


def _summary(views: Sequence[JobView]) -> str:
    # One line per model, from the job with the most findings: the same lesions seen on a
    # thin and a thick series of one study are one set of lesions, not two.
    chosen: dict[str, JobView] = {}
    for view in views:
        if view.state == CANCELED or (not view.findings.findings and view.findings.present is None):
            continue
        best = chosen.get(view.model)
        if best is None or len(view.findings.findings) > len(best.findings.findings):
            chosen[view.model] = view
    lines = [summarize(model, view.findings) for model, view in chosen.items()]
    text = "; ".join(line for line in lines if line)
    return text if len(text) <= SUMMARY_CHARS else text[: SUMMARY_CHARS - 1] + "…"


def refresh(engine: Engine, rules: Sequence[RuleSettings], study_id: int) -> Worklisted | None:
    """Recompute and store the study's priority, findings summary and review state.

    Returns None when there is no such study.
    """
    with engine.begin() as conn:
        # Write first, read after: the no-op update takes the study row's write lock, so two
        # workers finishing jobs of one study at once refresh one after the other, and the
        # later one reads both jobs' results (a read first could store a stale answer).
        locked = conn.execute(
            update(studies)
            .where(studies.c.id == study_id)
            .values(priority_rank=studies.c.priority_rank)
        ).rowcount
        if not locked:
            return None
        views = job_views(conn, [study_id])[study_id]
        result = compute(views, rules)
        # New findings change what the reviews cover: a study accepted before a second
        # model reported is no longer wholly accepted.
        reviews.store_state(conn, study_id, views)
        conn.execute(
            update(studies)
            .where(studies.c.id == study_id)
            .values(
                priority="" if result.priority is None else result.priority.value,
                priority_rank=result.rank,
                findings_summary=result.summary,
            )
        )
    if result.escalated_by:
        logger.info(
            "study %d escalated to %s by %s", study_id, result.priority, result.escalated_by
        )
    return result

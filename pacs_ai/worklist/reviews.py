"""Radiologists' reviews of AI results: accept, reject or comment; kept forever.

A review names what it is about: a finding (job id + the finding's ``"<name> <n>"``), a
whole job (job id, no finding) or the whole study (neither). ACCEPT and REJECT are verdicts;
COMMENT only adds to the history. Nothing is updated or deleted: a change of mind is a new
row, and the latest verdict that covers a finding is the one that counts.

The study's review state follows from the verdicts on its current findings:

- UNREVIEWED: no finding has a verdict;
- ACCEPTED / REJECTED: every finding has one, and all agree;
- PARTIAL: some findings are still open, or the verdicts differ.

A job that found nothing is one item of its own (reviewed as a job), and a study without AI
results is reviewed as a whole.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, insert, select, update

from pacs_ai.errors import InvalidArgument, NotFound
from pacs_ai.storage.schema import (
    ACCEPT,
    ACCEPTED,
    CANCELED,
    COMMENT,
    DELIVERED,
    ENCODED,
    PARTIAL,
    REJECT,
    REJECTED,
    REVIEW_ACTIONS,
    UNREVIEWED,
    jobs,
    reviews,
    studies,
)
from pacs_ai.worklist.findings import JobView, job_views, parse

logger = logging.getLogger(__name__)

COMMENT_CHARS = 2000  # reviews.comment
VERDICTS = (ACCEPT, REJECT)


@dataclass(frozen=True)
class Item:
    """One thing a verdict is given on: a finding, a job that found nothing, or the study."""

    job_id: int | None
    finding: str  # "" for a whole job (or the study)
    since: float = 0.0  # when the job that made it started


@dataclass(frozen=True)
class Review:
    id: int
    study_id: int
    job_id: int | None
    finding: str
    action: str
    comment: str
    reviewer: str
    created_at: float

    def covers(self, item: Item) -> bool:
        """Whether this review speaks for ``item``.

        Not when it was given before the job that found the item ran: a study accepted
        before a second model reported has not been seen with that model's findings.
        """
        if self.created_at < item.since:
            return False
        if self.job_id is None:
            return True
        return self.job_id == item.job_id and self.finding in ("", item.finding)

    def as_json(self) -> dict[str, Any]:
        return {**self.__dict__, "created": iso(self.created_at)}


def iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat(timespec="seconds")


def items(views: Sequence[JobView]) -> list[Item]:
    """What the study's verdicts are about: every current finding, or finished empty jobs."""
    found: list[Item] = []
    for view in views:
        if view.state == CANCELED:
            continue
        since = view.started_at or 0.0
        if view.findings.findings:
            found += [Item(view.id, f.key, since) for f in view.findings.findings]
        elif view.state in (ENCODED, DELIVERED):
            found.append(Item(view.id, "", since))
    return found or [Item(None, "")]


def verdict(item: Item, history: Sequence[Review]) -> Review | None:
    """The latest ACCEPT or REJECT that covers ``item`` (history is oldest first)."""
    for review in reversed(history):
        if review.action in VERDICTS and review.covers(item):
            return review
    return None


def review_state(views: Sequence[JobView], history: Sequence[Review]) -> str:
    verdicts = [verdict(item, history) for item in items(views)]
    actions = {v.action if v is not None else None for v in verdicts}
    if actions == {None}:
        return UNREVIEWED
    if actions == {ACCEPT}:
        return ACCEPTED
    if actions == {REJECT}:
        return REJECTED
    return PARTIAL


def history(conn: Connection, study_id: int) -> list[Review]:
    """Every review of the study, oldest first."""
    rows = conn.execute(
        select(reviews).where(reviews.c.study_id == study_id).order_by(reviews.c.id)
    ).all()
    return [Review(**row._mapping) for row in rows]


def store_state(conn: Connection, study_id: int, views: Sequence[JobView]) -> str:
    """Recompute and store the study's review state (call with the study row locked)."""
    state = review_state(views, history(conn, study_id))
    conn.execute(update(studies).where(studies.c.id == study_id).values(review_state=state))
    return state


def _check(action: str, job_id: int | None, finding: str, comment: str) -> str:
    action = action.upper()
    if action not in REVIEW_ACTIONS:
        raise InvalidArgument(
            f"action must be one of {', '.join(a.lower() for a in REVIEW_ACTIONS)}, "
            f"not {action.lower()!r}"
        )
    if finding and job_id is None:
        raise InvalidArgument("a finding is reviewed within its job: give job_id as well")
    if len(comment) > COMMENT_CHARS:
        raise InvalidArgument(f"comment is {len(comment)} characters; at most {COMMENT_CHARS}")
    if action == COMMENT and not comment.strip():
        raise InvalidArgument("a comment review needs a comment")
    return action


def record(
    engine: Engine,
    study_id: int,
    action: str,
    reviewer: str,
    now: float,
    job_id: int | None = None,
    finding: str = "",
    comment: str = "",
) -> tuple[Review, str]:
    """Add a review and return it with the study's new review state.

    Raises :class:`NotFound` for an unknown study or a job not of this study, and
    :class:`InvalidArgument` for an unknown action or finding.
    """
    action = _check(action, job_id, finding, comment)
    with engine.begin() as conn:
        # Lock the study row first, as priority.refresh does: states computed one at a time.
        locked = conn.execute(
            update(studies)
            .where(studies.c.id == study_id)
            .values(review_state=studies.c.review_state)
        ).rowcount
        if not locked:
            raise NotFound(f"no study with id {study_id}")
        if job_id is not None:
            job = conn.execute(
                select(jobs.c.findings).where(jobs.c.id == job_id, jobs.c.study_id == study_id)
            ).first()
            if job is None:
                raise NotFound(f"study {study_id} has no job {job_id}")
            keys = parse(job.findings, job_id).keys()
            if finding and finding not in keys:
                known = ", ".join(sorted(keys)) or "none"
                raise InvalidArgument(
                    f"job {job_id} has no finding {finding!r}; its findings: {known}"
                )
        row = conn.execute(
            insert(reviews)
            .values(
                study_id=study_id,
                job_id=job_id,
                finding=finding,
                action=action,
                comment=comment,
                reviewer=reviewer,
                created_at=now,
            )
            .returning(reviews.c.id)
        ).one()
        state = store_state(conn, study_id, job_views(conn, [study_id])[study_id])
    review = Review(int(row.id), study_id, job_id, finding, action, comment, reviewer, now)
    logger.info(
        "review %d by %s: %s on study %d job %s %s -> study %s",
        review.id,
        reviewer,
        action,
        study_id,
        job_id if job_id is not None else "-",
        finding or "(whole)",
        state,
    )
    return review, state


EXPORT_FIELDS = (
    "review_id",
    "created",
    "study_instance_uid",
    "accession_number",
    "job_id",
    "model",
    "rule",
    "finding",
    "action",
    "reviewer",
    "comment",
)


def export(engine: Engine, since: float | None = None) -> list[dict[str, Any]]:
    """Every review (oldest first), with the study UID and the job's model, for export.

    Patient names and IDs stay out: the export is for measuring the models, and the study
    UID and accession number are enough to go back to a case.
    """
    query = (
        select(
            reviews.c.id,
            reviews.c.created_at,
            studies.c.study_instance_uid,
            studies.c.accession_number,
            reviews.c.job_id,
            jobs.c.model,
            jobs.c.rule,
            reviews.c.finding,
            reviews.c.action,
            reviews.c.reviewer,
            reviews.c.comment,
        )
        .select_from(
            reviews.join(studies, studies.c.id == reviews.c.study_id).outerjoin(
                jobs, jobs.c.id == reviews.c.job_id
            )
        )
        .order_by(reviews.c.id)
    )
    if since is not None:
        query = query.where(reviews.c.created_at >= since)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return [
        dict(
            zip(
                EXPORT_FIELDS,
                (
                    r.id,
                    iso(r.created_at),
                    r.study_instance_uid,
                    r.accession_number,
                    r.job_id,
                    r.model or "",
                    r.rule or "",
                    r.finding,
                    r.action,
                    r.reviewer,
                    r.comment,
                ),
                strict=True,
            )
        )
        for r in rows
    ]


def by_model(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """ACCEPT / REJECT counts per model from exported rows, and the share accepted.

    Only the latest verdict on each finding (or job) counts: a reviewer who changed their
    mind has given one verdict, not two.
    """
    latest: dict[tuple[Any, str], dict[str, Any]] = {}
    for row in rows:
        if row["job_id"] is not None and row["action"] in VERDICTS:
            latest[(row["job_id"], row["finding"])] = row
    counts: dict[str, dict[str, Any]] = {}
    for row in latest.values():
        model = counts.setdefault(row["model"], {ACCEPT: 0, REJECT: 0})
        model[row["action"]] += 1
    for model in counts.values():
        total = model[ACCEPT] + model[REJECT]
        model["accepted_share"] = round(model[ACCEPT] / total, 4) if total else None
    return counts

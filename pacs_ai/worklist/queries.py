"""The worklist query and a study's detail, as JSON-ready dicts for the API, pages and CLI.

The worklist sorts in the database on ``studies.priority_rank`` (kept by
:mod:`.priority`) and arrival, filters with plain column tests and IN subqueries,
and pages with LIMIT/OFFSET; the page's series modalities and jobs come from one query each,
whatever the page size. Patient names are returned (the worklist is for radiologists) but
never logged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, and_, func, select

from pacs_ai.errors import InvalidArgument, NotFound
from pacs_ai.pipeline.route import Priority
from pacs_ai.results.uids import MANUFACTURER
from pacs_ai.storage.schema import (
    ACCEPTED,
    CANCELED,
    DELIVERED,
    ENCODED,
    FAILED,
    PARTIAL,
    QUEUED,
    REJECT,
    REJECTED,
    RESULT,
    RUNNING,
    SKIPPED,
    STUDY_STATES,
    UNREVIEWED,
    deliveries,
    instances,
    jobs,
    series,
    studies,
)
from pacs_ai.worklist import reviews
from pacs_ai.worklist.findings import JobView, job_views

MAX_LIMIT = 500
REVIEW_STATES = (UNREVIEWED, ACCEPTED, REJECTED, PARTIAL)

# What a radiologist needs to know of a job; ENCODED is done as far as reading goes.
AI_STATES: dict[str, tuple[str, ...]] = {
    "queued": (QUEUED,),
    "running": (RUNNING,),
    "done": (ENCODED, DELIVERED),
    "failed": (FAILED,),
    "skipped": (SKIPPED,),
    "canceled": (CANCELED,),
}
AI_STATE_OF = {job_state: ai for ai, states in AI_STATES.items() for job_state in states}
_DATE = re.compile(r"^\d{8}$")
# Where a worker writes a job's results (pipeline/infer.py), relative to the data dir.
_RESULT_PATH = re.compile(r"^results/(?P<job>\d+)/(?P<kind>[A-Z]+)\.dcm$")


@dataclass(frozen=True)
class WorklistFilter:
    """What to list. ``state`` is a study state (RECEIVING, COMPLETE) or an AI state
    (queued, running, done, failed, skipped, canceled: some job of the study is in it, a job
    of ``model`` when that is given too)."""

    state: str | None = None
    priority: str | None = None
    modality: str | None = None
    date_from: str | None = None
    date_to: str | None = None
    review_state: str | None = None
    model: str | None = None
    limit: int = 50
    offset: int = 0

    def __post_init__(self) -> None:
        # StudyDate is YYYYMMDD; YYYY-MM-DD (an HTML date input, a typed CLI date) means the same.
        for name in ("date_from", "date_to"):
            value = getattr(self, name)
            if value:
                object.__setattr__(self, name, value.replace("-", ""))

    def check(self) -> None:
        """Raise :class:`InvalidArgument` naming the first bad value."""
        if (
            self.state
            and self.state.upper() not in STUDY_STATES
            and (self.state.lower() not in AI_STATES)
        ):
            raise InvalidArgument(
                f"state must be one of {', '.join(STUDY_STATES)} (the study) or "
                f"{', '.join(AI_STATES)} (its AI jobs), not {self.state!r}"
            )
        if self.priority and self.priority.upper() not in (*Priority, "NONE"):
            raise InvalidArgument(
                f"priority must be one of {', '.join(Priority)} or NONE, not {self.priority!r}"
            )
        for name in ("date_from", "date_to"):
            value = getattr(self, name)
            if value and not _DATE.match(value):
                raise InvalidArgument(f"{name} must be a date as YYYYMMDD, not {value!r}")
        if self.review_state and self.review_state.upper() not in REVIEW_STATES:
            raise InvalidArgument(
                f"review_state must be one of {', '.join(REVIEW_STATES)}, not {self.review_state!r}"
            )
        if not 1 <= self.limit <= MAX_LIMIT:
            raise InvalidArgument(f"limit must be between 1 and {MAX_LIMIT}, not {self.limit}")
        if self.offset < 0:
            raise InvalidArgument(f"offset must be 0 or more, not {self.offset}")

    def conditions(self) -> list[Any]:
        # Job and series filters are uncorrelated IN subqueries, evaluated once (a hash or a
        # temporary index) rather than probed per study as a correlated EXISTS would be.
        where: list[Any] = []
        job_tests: list[Any] = []
        if self.state:
            if self.state.upper() in STUDY_STATES:
                where.append(studies.c.state == self.state.upper())
            else:
                job_tests.append(jobs.c.state.in_(AI_STATES[self.state.lower()]))
        if self.model:
            job_tests.append(jobs.c.model == self.model)
        if job_tests:
            # Together: model=X&state=failed means X's job failed, not "X ran, something failed".
            where.append(studies.c.id.in_(select(jobs.c.study_id).where(*job_tests)))
        if self.priority:
            wanted = self.priority.upper()
            where.append(studies.c.priority == ("" if wanted == "NONE" else wanted))
        if self.modality:
            where.append(
                studies.c.id.in_(
                    select(series.c.study_id).where(series.c.modality == self.modality.upper())
                )
            )
        if self.date_from:
            where.append(studies.c.study_date >= self.date_from)
        if self.date_to:
            # "" sorts before every date: a study without a date is in no date range.
            where.append(and_(studies.c.study_date <= self.date_to, studies.c.study_date != ""))
        if self.review_state:
            where.append(studies.c.review_state == self.review_state.upper())
        return where


WORKLIST_COLUMNS = (
    studies.c.id,
    studies.c.study_instance_uid,
    studies.c.patient_name,
    studies.c.patient_id,
    studies.c.accession_number,
    studies.c.study_description,
    studies.c.study_date,
    studies.c.first_received_at,
    studies.c.state,
    studies.c.priority,
    studies.c.priority_rank,
    studies.c.findings_summary,
    studies.c.review_state,
)


def worklist(engine: Engine, f: WorklistFilter) -> dict[str, Any]:
    """One page of the worklist: most urgent first, then the longest waiting."""
    f.check()
    where = f.conditions()
    query = (
        select(*WORKLIST_COLUMNS)
        .where(*where)
        .order_by(
            studies.c.priority_rank.desc(), studies.c.first_received_at.asc(), studies.c.id.asc()
        )
        .limit(f.limit)
        .offset(f.offset)
    )
    with engine.connect() as conn:
        total = conn.execute(select(func.count()).select_from(studies).where(*where)).scalar_one()
        rows = conn.execute(query).all()
        ids = [row.id for row in rows]
        modalities = _modalities(conn, ids)
        views = job_views(conn, ids) if ids else {}
    return {
        "total": int(total),
        "limit": f.limit,
        "offset": f.offset,
        "items": [
            {
                "study_id": row.id,
                "study_instance_uid": row.study_instance_uid,
                "patient_name": row.patient_name,
                "patient_id": row.patient_id,
                "accession_number": row.accession_number,
                "modality": "\\".join(modalities.get(row.id, [])),
                "study_description": row.study_description,
                "study_date": row.study_date,
                "received_at": row.first_received_at,
                "state": row.state,
                "priority": row.priority,
                "priority_rank": row.priority_rank,
                "findings_summary": row.findings_summary,
                "review_state": row.review_state,
                "ai": [_ai(view) for view in views.get(row.id, [])],
            }
            for row in rows
        ],
    }


def _modalities(conn: Connection, study_ids: list[int]) -> dict[int, list[str]]:
    if not study_ids:
        return {}
    found: dict[int, set[str]] = {}
    # The modalities the modality sent: our own results (also when a PACS sent them back) not.
    for study_id, modality in conn.execute(
        select(series.c.study_id, series.c.modality)
        .where(series.c.study_id.in_(study_ids), series.c.manufacturer != MANUFACTURER)
        .distinct()
    ):
        if modality:
            found.setdefault(study_id, set()).add(modality)
    return {study_id: sorted(values) for study_id, values in found.items()}


def _ai(view: JobView) -> dict[str, Any]:
    return {
        "job_id": view.id,
        "model": view.model,
        "state": AI_STATE_OF.get(view.state, view.state.lower()),
        "reason": view.reason,
    }


# --- one study --------------------------------------------------------------------------------


def study_detail(engine: Engine, study_id: int) -> dict[str, Any]:
    """Everything the study page shows: the study, its series, its current jobs with their
    findings and the latest verdict on each, result files, and the whole review history.

    Raises :class:`NotFound` for an unknown study.
    """
    with engine.connect() as conn:
        study = conn.execute(select(studies).where(studies.c.id == study_id)).first()
        if study is None:
            raise NotFound(f"no study with id {study_id}")
        series_rows = conn.execute(
            select(
                series.c.id,
                series.c.series_instance_uid,
                series.c.modality,
                series.c.series_number,
                series.c.series_description,
                series.c.manufacturer,
                func.count(instances.c.id).label("instance_count"),
            )
            .select_from(series.outerjoin(instances, instances.c.series_id == series.c.id))
            .where(series.c.study_id == study_id)
            .group_by(series.c.id)
            .order_by(series.c.series_number, series.c.id)
        ).all()
        views = job_views(conn, [study_id])[study_id]
        outputs = _outputs(conn, study_id, [v.id for v in views])
        history = reviews.history(conn, study_id)
    series_uid = {row.id: row.series_instance_uid for row in series_rows}
    return {
        "study": {
            "study_id": study.id,
            "study_instance_uid": study.study_instance_uid,
            "calling_ae": study.calling_ae,
            "patient_name": study.patient_name,
            "patient_id": study.patient_id,
            "patient_birth_date": study.patient_birth_date,
            "patient_sex": study.patient_sex,
            "accession_number": study.accession_number,
            "study_date": study.study_date,
            "study_time": study.study_time,
            "study_description": study.study_description,
            "received_at": study.first_received_at,
            "state": study.state,
            "priority": study.priority,
            "priority_rank": study.priority_rank,
            "findings_summary": study.findings_summary,
            "review_state": study.review_state,
        },
        "series": [
            {
                "series_instance_uid": row.series_instance_uid,
                "modality": row.modality,
                "series_number": row.series_number,
                "series_description": row.series_description,
                "instance_count": int(row.instance_count),
                "result": row.manufacturer == MANUFACTURER,
            }
            for row in series_rows
        ],
        "jobs": [_job(view, series_uid, outputs.get(view.id, {}), history) for view in views],
        "reviews": [r.as_json() for r in history],
    }


def _outputs(conn: Connection, study_id: int, job_ids: list[int]) -> dict[int, dict[str, str]]:
    """Each job's result files by kind (SEG, SR), relative to the data dir.

    Deliveries name them when the job had destinations; result instances indexed in the
    study (``results/<job id>/<kind>.dcm``) name them when it had none.
    """
    found: dict[int, dict[str, str]] = {}
    if not job_ids:
        return found
    for job_id, kind, payload in conn.execute(
        select(deliveries.c.job_id, deliveries.c.kind, deliveries.c.payload)
        .where(deliveries.c.job_id.in_(job_ids))
        .distinct()
    ):
        found.setdefault(job_id, {})[kind] = payload
    wanted = set(job_ids)
    for path in conn.execute(
        select(instances.c.path).where(instances.c.study_id == study_id, instances.c.kind == RESULT)
    ).scalars():
        match = _RESULT_PATH.match(path)
        if match and int(match["job"]) in wanted:
            found.setdefault(int(match["job"]), {}).setdefault(match["kind"], path)
    return found


def _job(
    view: JobView,
    series_uid: dict[int, str],
    outputs: dict[str, str],
    history: list[reviews.Review],
) -> dict[str, Any]:
    def latest(finding: str) -> dict[str, Any] | None:
        found = reviews.verdict(reviews.Item(view.id, finding, view.started_at or 0.0), history)
        return None if found is None else found.as_json()

    findings = []
    for finding in view.findings.findings:
        verdict = latest(finding.key)
        findings.append(
            {
                **finding.as_json(),
                "verdict": verdict,
                "rejected": verdict is not None and verdict["action"] == REJECT,
            }
        )
    job_verdict = latest("")
    return {
        "job_id": view.id,
        "model": view.model,
        "rule": view.rule,
        "series_instance_uid": series_uid.get(view.series_id, ""),
        "state": AI_STATE_OF.get(view.state, view.state.lower()),
        "job_state": view.state,
        "reason": view.reason,
        "priority": view.priority.value,
        "present": view.findings.present,
        "findings": findings,
        "verdict": job_verdict,
        "rejected": job_verdict is not None and job_verdict["action"] == REJECT,
        "outputs": outputs,
    }

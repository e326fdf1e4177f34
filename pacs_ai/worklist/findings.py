"""A study's jobs as the worklist sees them, and the findings each recorded, read back.

Each finding is named ``"<name> <n>"``, n counting from 1 over the job's findings: the SR's
TID 4108 tracking identifier reads the same, so a review of "Nodule 2" on the worklist and
"Nodule 2" in a viewer showing the SR are the same finding.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, select

from pacs_ai.pipeline.route import Priority
from pacs_ai.storage.schema import jobs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobFinding:
    key: str
    """``"<name> <n>"``, unique within the job (the reviews' ``finding`` column)."""
    name: str
    volume_ml: float | None
    longest_diameter_mm: float | None
    certainty: float | None

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class JobFindings:
    present: bool | None
    findings: tuple[JobFinding, ...]

    def keys(self) -> set[str]:
        return {f.key for f in self.findings}


EMPTY = JobFindings(None, ())


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def parse(raw: str, job_id: int = 0) -> JobFindings:
    """The job's findings; empty for a job that has none yet (or unreadable JSON, logged)."""
    if not raw:
        return EMPTY
    try:
        data = json.loads(raw)
    except ValueError:
        logger.warning("job %d: findings are not JSON; shown as none", job_id)
        return EMPTY
    if not isinstance(data, dict):
        return EMPTY
    items = data.get("findings")
    found = []
    for index, item in enumerate(items if isinstance(items, list) else []):
        if not isinstance(item, dict):
            continue
        name = str(item.get("name") or "finding")
        found.append(
            JobFinding(
                key=f"{name} {index + 1}",
                name=name,
                volume_ml=_number(item.get("volume_ml")),
                longest_diameter_mm=_number(item.get("longest_diameter_mm")),
                certainty=_number(item.get("certainty")),
            )
        )
    present = data.get("present")
    return JobFindings(present if isinstance(present, bool) else None, tuple(found))


def _plural(name: str, count: int) -> str:
    word = name.casefold()
    return word if count == 1 or word.endswith("s") else word + "s"


def summarize(model: str, job: JobFindings) -> str:
    """One line for a model's findings, e.g. ``lung-nodule-demo: 2 nodules, largest 14 mm (0.93)``.

    Findings with a certainty or a diameter are lesions and are counted; the others are
    structures and are listed with their volumes (``lungs 4200 mL``).
    """
    if not job.findings:
        return f"{model}: nothing found" if job.present is False else ""
    parts: list[str] = []
    by_name: dict[str, list[JobFinding]] = {}
    for finding in job.findings:
        by_name.setdefault(finding.name, []).append(finding)
    for name, group in by_name.items():
        lesions = [f for f in group if f.certainty is not None or f.longest_diameter_mm is not None]
        if lesions:
            part = f"{len(group)} {_plural(name, len(group))}"
            largest = max(lesions, key=lambda f: f.longest_diameter_mm or 0.0)
            if largest.longest_diameter_mm is not None:
                part += f", largest {largest.longest_diameter_mm:.0f} mm"
            if largest.certainty is not None:
                part += f" ({largest.certainty:.2f})"
            parts.append(part)
        else:
            for finding in group:
                volume = "" if finding.volume_ml is None else f" {finding.volume_ml:.0f} mL"
                parts.append(f"{name.casefold()}{volume}")
    return f"{model}: " + ", ".join(parts)


@dataclass(frozen=True)
class JobView:
    """What the worklist needs of one job."""

    id: int
    series_id: int
    model: str
    rule: str
    priority: Priority
    state: str
    reason: str
    completion: int
    started_at: float | None
    findings: JobFindings


def current(views: Iterable[JobView]) -> list[JobView]:
    """The jobs of the study's latest run of each (series, model, rule), oldest first.

    A reopened study runs its models again as new jobs: the older run no longer speaks for it.
    """
    latest: dict[tuple[int, str, str], JobView] = {}
    for view in views:
        key = (view.series_id, view.model, view.rule)
        if key not in latest or view.completion > latest[key].completion:
            latest[key] = view
    return sorted(latest.values(), key=lambda v: v.id)


def job_views(conn: Connection, study_ids: Sequence[int]) -> dict[int, list[JobView]]:
    """The current jobs of each study (one query)."""
    rows = conn.execute(
        select(
            jobs.c.id,
            jobs.c.study_id,
            jobs.c.series_id,
            jobs.c.model,
            jobs.c.rule,
            jobs.c.priority,
            jobs.c.state,
            jobs.c.reason,
            jobs.c.completion,
            jobs.c.started_at,
            jobs.c.findings,
        )
        .where(jobs.c.study_id.in_(list(study_ids)))
        .order_by(jobs.c.id)
    ).all()
    found: dict[int, list[JobView]] = {study_id: [] for study_id in study_ids}
    for row in rows:
        found[row.study_id].append(
            JobView(
                id=row.id,
                series_id=row.series_id,
                model=row.model,
                rule=row.rule,
                priority=Priority(row.priority),
                state=row.state,
                reason=row.reason,
                completion=row.completion,
                started_at=row.started_at,
                findings=parse(row.findings, row.id),
            )
        )
    return {study_id: current(views) for study_id, views in found.items()}

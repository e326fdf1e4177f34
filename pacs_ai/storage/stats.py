"""Counts and stage durations for the metrics endpoint, read from the index.

Reading the index (not counters kept in memory) means instances stored by receivers in other
processes, and jobs finished by workers on other hosts, count the same as this process's own.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field

from sqlalchemy import Engine, case, func, select

from pacs_ai.storage.schema import (
    COMPLETE,
    DELIVERED,
    DONE,
    FAILED,
    PENDING,
    SENDING,
    SOURCE,
    WORKER_STAGES,
    deliveries,
    instances,
    jobs,
    studies,
)


@dataclass(frozen=True)
class Counts:
    """Totals as of one read."""

    received_instances: int = 0  # source instances stored, plus their duplicate receptions
    received_bytes: int = 0  # bytes of the source instances kept (a duplicate is not kept)
    duplicates: int = 0
    results: int = 0  # SEG and SR objects the node made
    studies: dict[str, int] = field(default_factory=dict)  # by state
    jobs: dict[tuple[str, str], int] = field(default_factory=dict)  # by (state, model)
    deliveries: dict[str, int] = field(default_factory=dict)  # by state
    delivery_failed_attempts: int = 0


def counts(engine: Engine) -> Counts:
    with engine.connect() as conn:
        by_kind = {
            kind: (int(n), int(dups), int(size))
            for kind, n, dups, size in conn.execute(
                select(
                    instances.c.kind,
                    func.count(),
                    func.coalesce(func.sum(instances.c.duplicates), 0),
                    func.coalesce(func.sum(instances.c.size_bytes), 0),
                ).group_by(instances.c.kind)
            )
        }
        study_states = {
            str(state): int(n)
            for state, n in conn.execute(
                select(studies.c.state, func.count()).group_by(studies.c.state)
            )
        }
        job_states = {
            (state, model): int(n)
            for state, model, n in conn.execute(
                select(jobs.c.state, jobs.c.model, func.count()).group_by(
                    jobs.c.state, jobs.c.model
                )
            )
        }
        delivery_states = {
            str(state): int(n)
            for state, n in conn.execute(
                select(deliveries.c.state, func.count()).group_by(deliveries.c.state)
            )
        }
        # Every attempt of a FAILED or PENDING delivery failed; a DONE or SENDING one has one
        # attempt that succeeded or is under way. A retry by an admin resets attempts to 0.
        failed_attempts = conn.execute(
            select(
                func.coalesce(
                    func.sum(
                        case(
                            (deliveries.c.state.in_([FAILED, PENDING]), deliveries.c.attempts),
                            (
                                deliveries.c.state.in_([DONE, SENDING]),
                                deliveries.c.attempts - 1,
                            ),
                            else_=0,
                        )
                    ),
                    0,
                )
            )
        ).scalar_one()
    n, dups, size = by_kind.get(SOURCE, (0, 0, 0))
    results = sum(v[0] for k, v in by_kind.items() if k != SOURCE)
    return Counts(
        received_instances=n + dups,
        received_bytes=size,
        duplicates=dups,
        results=results,
        studies=study_states,
        jobs=job_states,
        deliveries=delivery_states,
        delivery_failed_attempts=max(0, int(failed_attempts)),
    )


# --- stage durations -----------------------------------------------------------------------

JOB_STAGES = ("queue_wait", *WORKER_STAGES, "delivery")
STUDY_STAGES = ("receive", "quiet")


@dataclass(frozen=True)
class Finished:
    """Something that finished at ``at`` (its id is unique per ``kind``) with stage durations."""

    kind: str  # "job" or "study"
    id: int
    at: float
    stages: dict[str, float]


def finished_since(engine: Engine, since: float) -> Iterator[Finished]:
    """Jobs DELIVERED and studies COMPLETE at or after ``since``, with their stage durations.

    Job stages: ``queue_wait`` (on the queue until claimed), ``volume``, ``inference`` and
    ``encode`` (the worker's own timings) and ``delivery`` (encoded until the last delivery
    was done; only for jobs with somewhere to deliver to). Study stages: ``receive`` (first
    to last instance) and ``quiet`` (last instance until COMPLETE, the quiet period).
    """
    with engine.connect() as conn:
        job_rows = conn.execute(
            select(
                jobs.c.id,
                jobs.c.enqueued_at,
                jobs.c.started_at,
                jobs.c.finished_at,
                jobs.c.timings,
                jobs.c.destinations,
            ).where(jobs.c.state == DELIVERED, jobs.c.finished_at >= since)
        ).all()
        study_rows = conn.execute(
            select(
                studies.c.id,
                studies.c.first_received_at,
                studies.c.last_received_at,
                studies.c.completed_at,
            ).where(studies.c.state == COMPLETE, studies.c.completed_at >= since)
        ).all()
    for r in job_rows:
        timings = json.loads(r.timings or "{}")
        # Jobs from before the warm-up and load timings have only the last three.
        worked = {k: float(timings[k]) for k in WORKER_STAGES if k in timings}
        stages = dict(worked)
        if r.enqueued_at is not None and r.started_at is not None:
            # The reconciler may stamp enqueued_at again after the claim: never negative.
            stages["queue_wait"] = max(0.0, r.started_at - r.enqueued_at)
        if r.destinations and r.started_at is not None and "encode" in worked:
            encoded_at = r.started_at + sum(worked.values())
            stages["delivery"] = max(0.0, r.finished_at - encoded_at)
        yield Finished("job", r.id, r.finished_at, stages)
    for s in study_rows:
        yield Finished(
            "study",
            s.id,
            s.completed_at,
            {
                "receive": s.last_received_at - s.first_received_at,
                "quiet": max(0.0, s.completed_at - s.last_received_at),
            },
        )

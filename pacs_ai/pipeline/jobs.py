"""Jobs and deliveries: the database is the source of truth, the broker carries ids only.

A job is one model on one series, made by one rule for one completion of the study::

    QUEUED ──claim──► RUNNING ──encoded──► ENCODED ──all deliveries DONE──► DELIVERED
       │                 │  └─ series cannot be a volume ─► SKIPPED (reason)
       │                 └─ error ─► QUEUED again (attempts < max) or FAILED (reason)
       └─ cancel ─► CANCELED                       (retry puts FAILED/CANCELED back to QUEUED)

A delivery is one object (SEG, SR) or one forward (SERIES, STUDY) to one peer:
PENDING ─► SENDING ─► DONE, or back to PENDING with a backoff, or FAILED after max attempts.

Every transition is a guarded UPDATE (``WHERE state = …``), so two workers, a reconciler and
an admin can act at once and exactly one wins. Claiming a job takes a lease; the reconciler
puts back jobs whose lease ran out (a killed worker) and jobs queued long ago that no worker
took (a lost broker).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, overload

from sqlalchemy import Connection, Engine, Row, and_, func, or_, select, true, update
from sqlalchemy.dialects import postgresql, sqlite

from pacs_ai.config import PeerSettings
from pacs_ai.pipeline.route import Decision, Priority, RuleSettings, SeriesFacts
from pacs_ai.storage.schema import (
    CANCELED,
    COMMITMENT_REQUESTED,
    DELIVERED,
    DONE,
    ENCODED,
    FAILED,
    PENDING,
    QUEUED,
    RULES_FIRED_MAX,
    RULES_FIRED_MORE,
    RUNNING,
    SENDING,
    SKIPPED,
    deliveries,
    jobs,
    series,
    studies,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobSpec:
    study_id: int
    series_id: int
    model: str
    rule: str
    priority: Priority
    destinations: tuple[str, ...]
    completion: int


@dataclass(frozen=True)
class ForwardSpec:
    study_id: int
    peer: str
    kind: str  # SERIES or STUDY
    payload: str  # SeriesInstanceUID, or StudyInstanceUID for a whole study


def result_destinations(
    rule: RuleSettings, calling_ae: str, peers: Sequence[PeerSettings]
) -> tuple[str, ...]:
    """Where a rule's results go: its ``results_to``, else the sender if it may receive."""
    if rule.results_to:
        return rule.results_to
    return tuple(p.name for p in peers if p.ae_title == calling_ae and p.receive)[:1]


def plan(
    decisions: Sequence[Decision],
    facts: Sequence[SeriesFacts],
    rules: Sequence[RuleSettings],
    study_id: int,
    calling_ae: str,
    completion: int,
    peers: Sequence[PeerSettings],
) -> tuple[list[JobSpec], list[ForwardSpec]]:
    """Turn the rules that fired into jobs and forwards (pure)."""
    by_rule = {r.name: r for r in rules}
    by_series = {f.series_instance_uid: f for f in facts}
    job_specs: list[JobSpec] = []
    forwards: dict[tuple[str, str, str], ForwardSpec] = {}
    for decision in decisions:
        if not decision.matched:
            continue
        rule = by_rule[decision.rule]
        fact = by_series[decision.series_instance_uid]
        for model in rule.models:
            job_specs.append(
                JobSpec(
                    study_id=study_id,
                    series_id=fact.series_id,
                    model=model,
                    rule=rule.name,
                    priority=rule.priority,
                    destinations=result_destinations(rule, calling_ae, peers),
                    completion=completion,
                )
            )
        for peer in rule.forward:
            kind = "STUDY" if rule.forward_level == "study" else "SERIES"
            payload = fact.study_instance_uid if kind == "STUDY" else fact.series_instance_uid
            forwards[(peer, kind, payload)] = ForwardSpec(study_id, peer, kind, payload)
    return job_specs, list(forwards.values())


def _insert_ignore(engine_or_conn: Any) -> Any:
    return postgresql.insert if engine_or_conn.dialect.name == "postgresql" else sqlite.insert


def fired_rules(decisions: Sequence[Decision], rules: Sequence[RuleSettings]) -> list[str]:
    """The names of the rules that matched at least one series (route.evaluate's decisions
    are the matches), in the configured order."""
    matched = {d.rule for d in decisions}
    return [r.name for r in rules if r.name in matched]


def rules_fired_text(names: Sequence[str]) -> str:
    """``names`` as ``studies.rules_fired`` holds them: comma-separated, and cut at a whole
    name with a final ``RULES_FIRED_MORE`` when they would not fit the column."""
    kept = list(names)
    text = ",".join(kept)
    while len(text) > RULES_FIRED_MAX:
        kept.pop()
        text = ",".join([*kept, RULES_FIRED_MORE])
    return text


def plan_nothing(engine: Engine, completion: tuple[int, int], now: float) -> None:
    """Mark a study's completion (study id, number) planned with no rule matched, so the
    reconciler does not take it for one lost between completing and routing, and an admin
    sees that nothing runs on it (``rules_fired`` "")."""
    create(engine, [], [], 0, 0, now, completion)


def create(
    engine: Engine,
    job_specs: Sequence[JobSpec],
    forwards: Sequence[ForwardSpec],
    max_attempts: int,
    delivery_attempts: int,
    now: float,
    completion: tuple[int, int] | None = None,
    rules_fired: Sequence[str] = (),
) -> tuple[list[tuple[int, Priority]], list[int]]:
    """Insert jobs and forward deliveries once (re-planning the same completion adds nothing).

    With ``completion`` = (study id, completion number), the study's completion is marked
    planned in the same transaction, with the names of the rules that matched it
    (``rules_fired``, in rule order), and a completion already planned creates nothing: the
    assembler and the reconciler may both try, one of them plans. (Forwards have no job, so
    no unique key would stop a second copy.)

    Returns the new jobs as (id, priority) and the new deliveries' ids.
    """
    job_ids: list[tuple[int, Priority]] = []
    delivery_ids: list[int] = []
    with engine.begin() as conn:
        if completion is not None:
            study_id, number = completion
            first = conn.execute(
                update(studies)
                .where(studies.c.id == study_id, studies.c.planned_completions < number)
                .values(planned_completions=number, rules_fired=rules_fired_text(rules_fired))
            ).rowcount
            if not first:
                return [], []
        insert = _insert_ignore(conn)
        for spec in job_specs:
            row = conn.execute(
                insert(jobs)
                .values(
                    study_id=spec.study_id,
                    series_id=spec.series_id,
                    model=spec.model,
                    rule=spec.rule,
                    priority=spec.priority.value,
                    state=QUEUED,
                    reason="",
                    attempts=0,
                    max_attempts=max_attempts,
                    destinations=",".join(spec.destinations),
                    created_at=now,
                    updated_at=now,
                    worker="",
                    timings="{}",
                    findings="",
                    completion=spec.completion,
                )
                .on_conflict_do_nothing()
                .returning(jobs.c.id)
            ).first()
            if row is not None:
                job_ids.append((int(row.id), spec.priority))
        for fwd in forwards:
            added = _add_delivery(
                conn,
                None,
                fwd.study_id,
                fwd.peer,
                fwd.kind,
                fwd.payload,
                "",
                delivery_attempts,
                now,
            )
            if added is not None:
                delivery_ids.append(added)
    return job_ids, delivery_ids


def _add_delivery(
    conn: Any,
    job_id: int | None,
    study_id: int,
    peer: str,
    kind: str,
    payload: str,
    sop_instance_uid: str,
    max_attempts: int,
    now: float,
) -> int | None:
    """Insert one PENDING delivery unless the same one exists; return its id if added."""
    row = conn.execute(
        _insert_ignore(conn)(deliveries)
        .values(
            job_id=job_id,
            study_id=study_id,
            peer=peer,
            kind=kind,
            payload=payload,
            sop_instance_uid=sop_instance_uid,
            state=PENDING,
            attempts=0,
            max_attempts=max_attempts,
            last_error="",
            created_at=now,
            updated_at=now,
        )
        .on_conflict_do_nothing()
        .returning(deliveries.c.id)
    ).first()
    return None if row is None else int(row.id)


@dataclass(frozen=True)
class ClaimedJob:
    id: int
    model: str
    attempt: int
    study_instance_uid: str
    series_instance_uid: str
    series_id: int
    study_id: int
    destinations: tuple[str, ...]
    priority: Priority


def claim(
    engine: Engine, job_id: int, worker: str, lease_s: float, now: float
) -> ClaimedJob | None:
    """Take a QUEUED job (or a RUNNING one whose lease ran out); None if someone else has it."""
    with engine.begin() as conn:
        claimed = conn.execute(
            update(jobs)
            .where(
                jobs.c.id == job_id,
                or_(
                    jobs.c.state == QUEUED,
                    # A job whose every attempt ended with its lease running out is not
                    # taken again: the reconciler fails it (expire_exhausted).
                    and_(
                        jobs.c.state == RUNNING,
                        jobs.c.lease_expires_at < now,
                        jobs.c.attempts < jobs.c.max_attempts,
                    ),
                ),
            )
            .values(
                state=RUNNING,
                attempts=jobs.c.attempts + 1,
                started_at=now,
                lease_expires_at=now + lease_s,
                worker=worker,
                updated_at=now,
            )
            .returning(jobs.c.id)
        ).first()
        if claimed is None:
            return None
        return _claimed(conn, jobs.c.id == job_id)


def held(engine: Engine, job_id: int, worker: str) -> ClaimedJob | None:
    """The job if it is RUNNING under ``worker`` (a worker's later calls about its claim)."""
    with engine.connect() as conn:
        return _claimed(
            conn, and_(jobs.c.id == job_id, jobs.c.state == RUNNING, jobs.c.worker == worker)
        )


def _claimed(conn: Connection, where: Any) -> ClaimedJob | None:
    row = conn.execute(
        select(
            jobs.c.id,
            jobs.c.model,
            jobs.c.attempts,
            jobs.c.destinations,
            jobs.c.priority,
            jobs.c.series_id,
            jobs.c.study_id,
            series.c.series_instance_uid,
            studies.c.study_instance_uid,
        )
        .select_from(
            jobs.join(series, series.c.id == jobs.c.series_id).join(
                studies, studies.c.id == jobs.c.study_id
            )
        )
        .where(where)
    ).first()
    if row is None:
        return None
    return ClaimedJob(
        id=row.id,
        model=row.model,
        attempt=int(row.attempts),
        study_instance_uid=row.study_instance_uid,
        series_instance_uid=row.series_instance_uid,
        series_id=row.series_id,
        study_id=row.study_id,
        destinations=tuple(d for d in row.destinations.split(",") if d),
        priority=Priority(row.priority),
    )


def _held_by(worker: str | None) -> Any:
    """No condition for ``None``; else the job must still be held by ``worker``: one whose
    lease ran out and was taken by another worker is no longer this one's to finish."""
    return true() if worker is None else jobs.c.worker == worker


def _move(
    engine: Engine,
    job_id: int,
    from_states: Sequence[str],
    now: float,
    worker: str | None = None,
    **values: Any,
) -> bool:
    with engine.begin() as conn:
        result = conn.execute(
            update(jobs)
            .where(jobs.c.id == job_id, jobs.c.state.in_(list(from_states)), _held_by(worker))
            .values(updated_at=now, **values)
        )
    return bool(result.rowcount)


def skip(engine: Engine, job_id: int, reason: str, now: float, worker: str | None = None) -> bool:
    logger.info("job %d SKIPPED: %s", job_id, reason)
    return _move(
        engine,
        job_id,
        [RUNNING],
        now,
        worker,
        state=SKIPPED,
        reason=reason[:1024],
        finished_at=now,
        lease_expires_at=None,
    )


def fail_attempt(
    engine: Engine, job_id: int, reason: str, now: float, worker: str | None = None
) -> str:
    """Record a failed attempt: QUEUED again while attempts remain, else FAILED; say which.

    ``NOT_HELD`` if the job is no longer RUNNING (under ``worker``, when given).
    """
    with engine.begin() as conn:
        row = conn.execute(
            select(jobs.c.attempts, jobs.c.max_attempts).where(jobs.c.id == job_id)
        ).one()
        state = QUEUED if row.attempts < row.max_attempts else FAILED
        moved = conn.execute(
            update(jobs)
            .where(jobs.c.id == job_id, jobs.c.state == RUNNING, _held_by(worker))
            .values(
                state=state,
                reason=reason[:1024],
                updated_at=now,
                lease_expires_at=None,
                finished_at=now if state == FAILED else None,
            )
        ).rowcount
    if not moved:
        return "NOT_HELD"
    logger.warning("job %d attempt %d failed (%s): now %s", job_id, row.attempts, reason, state)
    return state


@dataclass(frozen=True)
class Output:
    kind: str  # SEG or SR
    path: str  # relative to the data dir
    sop_instance_uid: str


def encoded(
    engine: Engine,
    job_id: int,
    outputs: Sequence[Output],
    destinations: Sequence[str],
    timings: dict[str, float],
    findings: str,
    study_id: int,
    delivery_attempts: int,
    now: float,
    worker: str | None = None,
) -> list[int]:
    """RUNNING → ENCODED with one PENDING delivery per (destination, output); returns their ids.

    With no destination the results stay on the node and the job is DELIVERED at once.
    """
    with engine.begin() as conn:
        moved = conn.execute(
            update(jobs)
            .where(jobs.c.id == job_id, jobs.c.state == RUNNING, _held_by(worker))
            .values(
                state=ENCODED if destinations else DELIVERED,
                reason="" if destinations else "no destination: results kept on the node",
                timings=json.dumps(timings),
                findings=findings[:4096],
                updated_at=now,
                lease_expires_at=None,
                finished_at=None if destinations else now,
            )
        ).rowcount
        if not moved:
            return []  # canceled meanwhile, or another attempt already finished
        ids = []
        for peer in destinations:
            for out in outputs:
                added = _add_delivery(
                    conn,
                    job_id,
                    study_id,
                    peer,
                    out.kind,
                    out.path,
                    out.sop_instance_uid,
                    delivery_attempts,
                    now,
                )
                if added is not None:
                    ids.append(added)
    return ids


def cancel(engine: Engine, job_id: int, now: float) -> bool:
    return _move(
        engine,
        job_id,
        [QUEUED, RUNNING, ENCODED],
        now,
        state=CANCELED,
        reason="canceled by an administrator",
        finished_at=now,
        lease_expires_at=None,
    )


def retry(engine: Engine, job_id: int, now: float) -> bool:
    """FAILED, CANCELED or SKIPPED back to QUEUED with a fresh attempt budget."""
    return _move(
        engine,
        job_id,
        [FAILED, CANCELED, SKIPPED],
        now,
        state=QUEUED,
        reason="",
        attempts=0,
        finished_at=None,
        enqueued_at=None,
    )


def mark_enqueued(engine: Engine, job_ids: Sequence[int], now: float) -> None:
    if job_ids:
        with engine.begin() as conn:
            conn.execute(update(jobs).where(jobs.c.id.in_(list(job_ids))).values(enqueued_at=now))


# --- deliveries -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ClaimedDelivery:
    id: int
    job_id: int | None
    study_id: int
    peer: str
    kind: str
    payload: str
    attempt: int
    max_attempts: int


PEER_BUSY = "PEER_BUSY"
"""What :func:`claim_delivery` returns for a delivery whose peer has ``per_peer`` in flight."""
PEER_BUSY_RETRY_S = 1.0
"""A delivery put off for a busy peer is due again this soon: the reconciler's next pass."""


@overload
def claim_delivery(
    engine: Engine, delivery_id: int, now: float, per_peer: None = None
) -> ClaimedDelivery | None: ...


@overload
def claim_delivery(
    engine: Engine, delivery_id: int, now: float, per_peer: int
) -> ClaimedDelivery | str | None: ...


def claim_delivery(
    engine: Engine, delivery_id: int, now: float, per_peer: int | None = None
) -> ClaimedDelivery | str | None:
    """PENDING → SENDING, one attempt more; None when it is not PENDING.

    With ``per_peer``, a delivery whose peer already has that many SENDING (from any worker)
    is left PENDING and due again shortly (:data:`PEER_BUSY`): a peer that accepts the
    connection and never answers then holds that many of the senders until its timeout, not
    all of them, and the other destinations go on. (Counted in the claiming statement itself;
    on PostgreSQL two claims at the same moment may still both pass.)
    """
    claim = update(deliveries).where(deliveries.c.id == delivery_id, deliveries.c.state == PENDING)
    if per_peer is not None:
        others = deliveries.alias("in_flight")
        in_flight = (
            select(func.count())
            .select_from(others)
            .where(others.c.peer == deliveries.c.peer, others.c.state == SENDING)
            .correlate(deliveries)
            .scalar_subquery()
        )
        claim = claim.where(in_flight < per_peer)
    with engine.begin() as conn:
        row = conn.execute(
            claim.values(
                state=SENDING, attempts=deliveries.c.attempts + 1, updated_at=now
            ).returning(
                deliveries.c.job_id,
                deliveries.c.study_id,
                deliveries.c.peer,
                deliveries.c.kind,
                deliveries.c.payload,
                deliveries.c.attempts,
                deliveries.c.max_attempts,
            )
        ).first()
        if row is None and per_peer is not None:
            put_off = conn.execute(
                update(deliveries)
                .where(deliveries.c.id == delivery_id, deliveries.c.state == PENDING)
                .values(next_attempt_at=now + PEER_BUSY_RETRY_S)
            ).rowcount
            if put_off:
                return PEER_BUSY
    if row is None:
        return None
    return ClaimedDelivery(
        delivery_id,
        row.job_id,
        row.study_id,
        row.peer,
        row.kind,
        row.payload,
        int(row.attempts),
        int(row.max_attempts),
    )


def _this_attempt(delivery: ClaimedDelivery) -> tuple[Any, ...]:
    # The attempt that was claimed, still SENDING: one cut off as stale (release_cut_off_sends)
    # and claimed again must not record its late outcome over the newer attempt's.
    return (
        deliveries.c.id == delivery.id,
        deliveries.c.state == SENDING,
        deliveries.c.attempts == delivery.attempt,
    )


def delivered(engine: Engine, delivery: ClaimedDelivery, now: float) -> None:
    """SENDING → DONE; the job becomes DELIVERED when its last delivery is done."""
    with engine.begin() as conn:
        conn.execute(
            update(deliveries)
            .where(*_this_attempt(delivery))
            .values(state=DONE, last_error="", updated_at=now)
        )
        if delivery.job_id is None:
            return
        open_ = conn.execute(
            select(deliveries.c.id).where(
                deliveries.c.job_id == delivery.job_id, deliveries.c.state != DONE
            )
        ).first()
        if open_ is None:
            conn.execute(
                update(jobs)
                .where(jobs.c.id == delivery.job_id, jobs.c.state == ENCODED)
                .values(state=DELIVERED, finished_at=now, updated_at=now)
            )


def delivery_failed(
    engine: Engine,
    delivery: ClaimedDelivery,
    error: str,
    now: float,
    backoff_s: float,
    backoff_max_s: float = float("inf"),
) -> float | None:
    """Record a failed send; return the delay before the next attempt, or None when FAILED.

    The delay doubles from ``backoff_s`` up to ``backoff_max_s``: with many attempts allowed,
    doubling alone would put the last ones months away.
    """
    final = delivery.attempt >= delivery.max_attempts
    delay = None if final else min(backoff_s * 2 ** (delivery.attempt - 1), backoff_max_s)
    with engine.begin() as conn:
        recorded = conn.execute(
            update(deliveries)
            .where(*_this_attempt(delivery))
            .values(
                state=FAILED if final else PENDING,
                last_error=error[:1024],
                next_attempt_at=None if delay is None else now + delay,
                updated_at=now,
            )
        ).rowcount
    if not recorded:
        logger.warning(
            "delivery %d to %s attempt %d failed after it was cut off and sent again: %s",
            delivery.id,
            delivery.peer,
            delivery.attempt,
            error,
        )
        return delay
    logger.warning(
        "delivery %d to %s attempt %d/%d failed: %s%s",
        delivery.id,
        delivery.peer,
        delivery.attempt,
        delivery.max_attempts,
        error,
        "" if delay is None else f"; retry in {delay:.0f} s",
    )
    return delay


def retry_delivery(engine: Engine, delivery_id: int, now: float) -> bool:
    with engine.begin() as conn:
        result = conn.execute(
            update(deliveries)
            .where(deliveries.c.id == delivery_id, deliveries.c.state.in_([FAILED, CANCELED]))
            .values(state=PENDING, attempts=0, last_error="", next_attempt_at=now, updated_at=now)
        )
    return bool(result.rowcount)


# --- reconciler -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Redo:
    jobs: list[tuple[int, Priority]]
    deliveries: list[int]


def expire_exhausted(engine: Engine, now: float) -> list[int]:
    """FAIL the RUNNING jobs whose lease ran out on their last attempt; return their ids.

    A worker killed mid-job, or one that cannot reach the node to record its outcome, leaves
    the job RUNNING until its lease runs out; each new claim counts an attempt. Without this
    a job that kills its worker every time would be retried for ever.
    """
    with engine.begin() as conn:
        rows = conn.execute(
            update(jobs)
            .where(
                jobs.c.state == RUNNING,
                jobs.c.lease_expires_at < now,
                jobs.c.attempts >= jobs.c.max_attempts,
            )
            .values(
                state=FAILED,
                reason="the lease ran out on every attempt (worker killed, or the node out of "
                "its reach); see the workers' logs",
                finished_at=now,
                updated_at=now,
                lease_expires_at=None,
            )
            .returning(jobs.c.id)
        ).all()
    for row in rows:
        logger.warning("job %d FAILED: its lease ran out on its last attempt", row.id)
    return [int(r.id) for r in rows]


def release_cut_off_sends(engine: Engine, now: float, stale_after_s: float) -> int:
    """SENDING deliveries claimed more than ``stale_after_s`` ago back to PENDING, due now.

    A worker (or the node with its embedded worker) killed in the middle of an attempt leaves
    the delivery SENDING, and nothing would ever send it. Sending again is safe: the peer
    stores the same SOP Instance UIDs once.
    """
    with engine.begin() as conn:
        released = conn.execute(
            update(deliveries)
            .where(deliveries.c.state == SENDING, deliveries.c.updated_at < now - stale_after_s)
            .values(
                state=PENDING,
                next_attempt_at=now,
                updated_at=now,
                last_error="the attempt was cut off (its worker or the node stopped while sending)",
            )
        ).rowcount
    if released:
        logger.warning("%d delivery attempt(s) cut off mid-send: sending again", released)
    return int(released)


def forget_enqueued(engine: Engine, now: float) -> tuple[int, int]:
    """Make every QUEUED job and every PENDING delivery due now; return how many of each.

    The node calls this when it starts. A message enqueued before it stopped may have died
    with it: the broker keeps a message taken by a killed worker unacknowledged for its
    visibility timeout (hours), and the reconciler would otherwise wait out the requeue window
    (``requeue_after_s``) before sending it again. Sending again is harmless, since only one
    claim of a job or a delivery succeeds. A delivery waiting out a backoff is tried once at
    start as well: a restart is the usual sign that what failed has been seen to.
    """
    with engine.begin() as conn:
        queued = conn.execute(
            update(jobs)
            .where(jobs.c.state == QUEUED, jobs.c.enqueued_at.is_not(None))
            .values(enqueued_at=None)
        ).rowcount
        pending = conn.execute(
            update(deliveries)
            .where(deliveries.c.state == PENDING, deliveries.c.next_attempt_at > now)
            .values(next_attempt_at=now)
        ).rowcount
    return int(queued), int(pending)


def reconcile(
    engine: Engine, now: float, requeue_after_s: float, sending_stale_s: float | None = None
) -> Redo:
    """What to (re-)enqueue: lost QUEUED jobs, expired leases, and due deliveries.

    A delivery is due when PENDING past its ``next_attempt_at``, or DONE with a storage
    commitment still REQUESTED past it (the worker then asks the peer again).

    A QUEUED job enqueued more than ``requeue_after_s`` ago (or never) is sent again: the
    message may have died with a Redis that lost its data. Sending twice is harmless, since
    only one claim can succeed. A RUNNING job whose lease expired is requeued the same way,
    unless that was its last attempt: then it is FAILED.
    """
    expire_exhausted(engine, now)
    if sending_stale_s is not None:
        release_cut_off_sends(engine, now, sending_stale_s)
    with engine.connect() as conn:
        job_rows = conn.execute(
            select(jobs.c.id, jobs.c.priority).where(
                or_(
                    and_(
                        jobs.c.state == QUEUED,
                        or_(
                            jobs.c.enqueued_at.is_(None),
                            jobs.c.enqueued_at < now - requeue_after_s,
                        ),
                    ),
                    and_(jobs.c.state == RUNNING, jobs.c.lease_expires_at < now),
                )
            )
        ).all()
        delivery_rows = conn.execute(
            select(deliveries.c.id).where(
                or_(
                    deliveries.c.state == PENDING,
                    # A storage commitment still unanswered is asked for again when due
                    # (pacs_ai/storage/commitments.py).
                    and_(
                        deliveries.c.state == DONE, deliveries.c.commitment == COMMITMENT_REQUESTED
                    ),
                ),
                or_(deliveries.c.next_attempt_at.is_(None), deliveries.c.next_attempt_at <= now),
            )
        ).all()
    return Redo([(r.id, Priority(r.priority)) for r in job_rows], [r.id for r in delivery_rows])


def mark_delivery_scheduled(engine: Engine, delivery_id: int, at: float) -> None:
    with engine.begin() as conn:
        conn.execute(
            update(deliveries).where(deliveries.c.id == delivery_id).values(next_attempt_at=at)
        )


# --- reading -------------------------------------------------------------------------------


def _job_query() -> Any:
    return select(jobs, series.c.series_instance_uid, studies.c.study_instance_uid).select_from(
        jobs.join(series, series.c.id == jobs.c.series_id).join(
            studies, studies.c.id == jobs.c.study_id
        )
    )


def job_rows(engine: Engine, state: str | None = None, limit: int = 200) -> list[Row[Any]]:
    query = _job_query().order_by(jobs.c.id.desc()).limit(limit)
    if state:
        query = query.where(jobs.c.state == state)
    with engine.connect() as conn:
        return list(conn.execute(query).all())


def job_row(engine: Engine, job_id: int) -> Row[Any] | None:
    """One job as :func:`job_rows` gives it, or None."""
    with engine.connect() as conn:
        row: Row[Any] | None = conn.execute(_job_query().where(jobs.c.id == job_id)).first()
    return row


def delivery_row(engine: Engine, delivery_id: int) -> Row[Any] | None:
    with engine.connect() as conn:
        row: Row[Any] | None = conn.execute(
            select(deliveries).where(deliveries.c.id == delivery_id)
        ).first()
    return row


def delivery_rows(
    engine: Engine, state: str | None = None, job_id: int | None = None, limit: int = 200
) -> list[Row[Any]]:
    query = select(deliveries).order_by(deliveries.c.id.desc()).limit(limit)
    if state:
        query = query.where(deliveries.c.state == state)
    if job_id is not None:
        query = query.where(deliveries.c.job_id == job_id)
    with engine.connect() as conn:
        return list(conn.execute(query).all())

"""Purge source images whose results are delivered (the ``[retention]`` policy).

Never before: a study is eligible only when it is COMPLETE, every job on it has ended,
every delivery (results and forwards) is DONE, and nothing arrived for ``keep_days``. With
``require_commitment``, each of those deliveries for which storage commitment was requested
(peers with ``storage_commitment = true``) must also be COMMITTED: one REQUESTED, FAILED or
UNANSWERED keeps the study's sources (FAILED and UNANSWERED do not with ``purge_failed``). Rows
go first, in one transaction that re-checks all of that, then the files: a crash between the
two leaves unreferenced files, never a row pointing at nothing.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Engine, and_, delete, func, not_, select, update
from sqlalchemy.exc import SQLAlchemyError

from pacs_ai.audit.events import AuditEvent, Kind
from pacs_ai.audit.trail import Auditor
from pacs_ai.config import Settings
from pacs_ai.storage.schema import (
    CANCELED,
    COMMITMENT_REQUESTED,
    COMPLETE,
    DELIVERED,
    DONE,
    ENCODED,
    FAILED,
    SKIPPED,
    SOURCE,
    UNANSWERED,
    deliveries,
    instances,
    jobs,
    studies,
)
from pacs_ai.storage.spool import Spool

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Purged:
    study_id: int
    study_instance_uid: str
    instances: int
    bytes: int


def _eligible(settings: Settings, now: float) -> object:
    policy = settings.retention
    # With purge_failed, a job that FAILED, or is ENCODED with every delivery given up
    # (FAILED deliveries; open ones still block below), has ended too.
    ended = [DELIVERED, SKIPPED, CANCELED] + ([FAILED, ENCODED] if policy.purge_failed else [])
    # Each test correlates to the outer studies row only (candidates() also joins instances).
    unfinished_job = (
        select(jobs.c.id)
        .where(jobs.c.study_id == studies.c.id, jobs.c.state.not_in(ended))
        .correlate(studies)
        .exists()
    )
    settled = [DONE, CANCELED] + ([FAILED] if policy.purge_failed else [])
    open_delivery = (
        select(deliveries.c.id)
        .where(deliveries.c.study_id == studies.c.id, deliveries.c.state.not_in(settled))
        .correlate(studies)
        .exists()
    )
    has_sources = (
        select(instances.c.id)
        .where(instances.c.study_id == studies.c.id, instances.c.kind == SOURCE)
        .correlate(studies)
        .exists()
    )
    conditions = [
        studies.c.state == COMPLETE,
        studies.c.last_received_at < now - policy.keep_days * 86400,
        not_(unfinished_job),
        not_(open_delivery),
        has_sources,
    ]
    if policy.require_commitment:
        waiting = [COMMITMENT_REQUESTED] + ([] if policy.purge_failed else [FAILED, UNANSWERED])
        uncommitted = (
            select(deliveries.c.id)
            .where(deliveries.c.study_id == studies.c.id, deliveries.c.commitment.in_(waiting))
            .correlate(studies)
            .exists()
        )
        conditions.append(not_(uncommitted))
    return and_(*conditions)


def candidates(engine: Engine, settings: Settings, now: float) -> list[Purged]:
    """What a purge would remove now (``pacs-ai purge --dry-run``)."""
    query = (
        select(
            studies.c.id,
            studies.c.study_instance_uid,
            func.count(instances.c.id),
            func.coalesce(func.sum(instances.c.size_bytes), 0),
        )
        .join(instances, and_(instances.c.study_id == studies.c.id, instances.c.kind == SOURCE))
        .where(_eligible(settings, now))  # type: ignore[arg-type]
        .group_by(studies.c.id, studies.c.study_instance_uid)
        .order_by(studies.c.id)
    )
    with engine.connect() as conn:
        return [Purged(r[0], r[1], int(r[2]), int(r[3])) for r in conn.execute(query)]


def purge(
    engine: Engine, settings: Settings, spool: Spool, now: float, auditor: Auditor | None = None
) -> list[Purged]:
    """Remove the eligible studies' source images; return what was removed."""
    done = []
    for study in candidates(engine, settings, now):
        with engine.begin() as conn:
            # Re-check inside the transaction: an instance may have arrived, or a job been
            # retried, since the candidates were listed.
            still = conn.execute(
                select(studies.c.id).where(
                    studies.c.id == study.study_id,
                    _eligible(settings, now),  # type: ignore[arg-type]
                )
            ).first()
            if still is None:
                continue
            paths = (
                conn.execute(
                    select(instances.c.path).where(
                        instances.c.study_id == study.study_id, instances.c.kind == SOURCE
                    )
                )
                .scalars()
                .all()
            )
            conn.execute(
                delete(instances).where(
                    instances.c.study_id == study.study_id, instances.c.kind == SOURCE
                )
            )
            conn.execute(
                update(studies).where(studies.c.id == study.study_id).values(purged_at=now)
            )
        # A modality may have sent one of these again since the commit: its new row owns
        # the file now. (The window left is between this query and the unlink.)
        with engine.connect() as conn:
            back = set(
                conn.execute(select(instances.c.path).where(instances.c.path.in_(paths)))
                .scalars()
                .all()
            )
        for relative in paths:
            if relative in back:
                continue
            with contextlib.suppress(FileNotFoundError):
                spool.path_of(relative).unlink()
        _remove_empty_dirs(spool, study.study_instance_uid)
        logger.info(
            "purged study %s: %d source instances, %.1f MiB",
            study.study_instance_uid,
            len(paths),
            study.bytes / 2**20,
        )
        if auditor is not None:
            auditor.record(
                AuditEvent(
                    Kind.INSTANCES_DELETED,
                    actor=auditor.source_id,
                    target=study.study_instance_uid,
                    detail={"instances": len(paths), "bytes": study.bytes, "policy": "retention"},
                )
            )
        done.append(study)
    return done


def _remove_empty_dirs(spool: Spool, study_uid: str) -> None:
    folder = spool.path_of(study_uid)
    if not folder.is_dir():
        return
    for series_dir in folder.iterdir():
        with contextlib.suppress(OSError):
            series_dir.rmdir()  # only if empty: another reception may still hold files
    with contextlib.suppress(OSError):
        folder.rmdir()


def run_periodically(
    engine: Engine,
    settings: Settings,
    spool: Spool,
    auditor: Auditor,
    stop: threading.Event,
    clock: Callable[[], float] = time.time,
) -> None:
    """The node's automatic purge (``retention.automatic``), every ``interval_h`` hours."""
    while not stop.wait(settings.retention.interval_h * 3600):
        try:
            purge(engine, settings, spool, clock(), auditor)
        except (SQLAlchemyError, OSError) as exc:
            logger.error("retention purge failed, will try again: %s", exc)

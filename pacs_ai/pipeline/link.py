"""How a worker reaches the node's state: the job row, the series, the result files.

:func:`~pacs_ai.pipeline.infer.run_job` talks to a :class:`JobLink` and nothing else, so the
same code runs in two places:

- :class:`LocalLink`, on the node's machine: the database and the spool directly. The node's
  worker API (:mod:`pacs_ai.web.worker_api`) also answers remote workers through it, so each
  state change is written by one piece of code whoever asked for it.
- :class:`~pacs_ai.pipeline.node_client.RemoteLink`, on a GPU server that shares no disk with
  the node: the same calls over HTTP, the series over WADO-RS.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage, SegmentationStorage
from sqlalchemy import Engine, select, update
from sqlalchemy.exc import SQLAlchemyError

from pacs_ai.config import Settings
from pacs_ai.dicom.header import InstanceHeader, MalformedDataset, read_header
from pacs_ai.errors import PacsAiError
from pacs_ai.imaging.volume import load_series
from pacs_ai.pipeline import jobs
from pacs_ai.pipeline.jobs import ClaimedJob, Output
from pacs_ai.pipeline.route import Priority
from pacs_ai.results.uids import SEG_INSTANCE, SEG_SERIES, SR_INSTANCE, SR_SERIES, result_uid
from pacs_ai.storage import index
from pacs_ai.storage.schema import QUEUED, RUNNING, SOURCE, instances, studies
from pacs_ai.storage.schema import jobs as jobs_table
from pacs_ai.storage.spool import write_durable
from pacs_ai.worklist.priority import refresh as refresh_worklist

logger = logging.getLogger(__name__)

# What a job may write, and the SOP Instance UID each must carry (results/uids.py): the node
# takes no other object from a worker.
RESULT_KINDS = {"SEG": SEG_INSTANCE, "SR": SR_INSTANCE}
# And the SOP Class and the Series Instance UID of each: a result never joins a source series.
_RESULT_CLASS = {"SEG": SegmentationStorage, "SR": Comprehensive3DSRStorage}
_RESULT_SERIES = {"SEG": SEG_SERIES, "SR": SR_SERIES}


class ResultRefused(PacsAiError):
    """A worker's result is not the object its job must produce."""


class LeaseLost(PacsAiError):
    """The job is no longer this worker's: its lease ran out and another took it, or an
    administrator canceled it. The worker drops it; whoever holds it now finishes it."""


class JobLink(Protocol):
    """The node, as a worker running a job sees it."""

    @property
    def lease_s(self) -> float: ...

    def claim(self, job_id: int) -> ClaimedJob | None: ...

    def renew(self, job_id: int) -> bool: ...

    def series(self, job: ClaimedJob) -> list[Dataset]: ...

    def store(self, job: ClaimedJob, kind: str, data: bytes) -> Output: ...

    def encoded(
        self,
        job: ClaimedJob,
        outputs: Sequence[Output],
        timings: dict[str, float],
        findings: str,
    ) -> int: ...

    def skip(self, job: ClaimedJob, reason: str) -> None: ...

    def fail(self, job: ClaimedJob, reason: str) -> str: ...


def result_path(job_id: int, kind: str) -> Path:
    """Where a job's result lives, relative to the data dir."""
    return Path("results") / str(job_id) / f"{kind}.dcm"


def check_result(
    job: ClaimedJob, kind: str, data: bytes, patient_id: str | None = None
) -> InstanceHeader:
    """The header of ``data`` if it is the job's own SEG or SR, in the job's study and series
    (and of the study's patient, when ``patient_id`` is given)."""
    if kind not in RESULT_KINDS:
        raise ResultRefused(f"result kind must be one of {sorted(RESULT_KINDS)}, not {kind!r}")
    try:
        header = read_header(data)
    except MalformedDataset as exc:
        raise ResultRefused(f"job {job.id}'s {kind} is not a readable DICOM object: {exc}") from exc
    expected = result_uid(job.id, RESULT_KINDS[kind])
    sop = header.sop_instance_uid
    if sop != expected:
        raise ResultRefused(
            f"job {job.id}'s {kind} must have SOP Instance UID {expected}, not {sop or 'none'}"
        )
    study = header.study_instance_uid
    if study != job.study_instance_uid:
        raise ResultRefused(
            f"job {job.id}'s {kind} belongs in study {job.study_instance_uid}, not {study}"
        )
    if header.sop_class_uid != _RESULT_CLASS[kind]:
        raise ResultRefused(
            f"job {job.id}'s {kind} must be SOP Class {_RESULT_CLASS[kind]}, "
            f"not {header.sop_class_uid or 'none'}"
        )
    series = result_uid(job.id, _RESULT_SERIES[kind])
    if header.series_instance_uid != series:
        raise ResultRefused(f"job {job.id}'s {kind} must be in its own series {series}")
    if patient_id is not None and header.patient_id != patient_id:
        raise ResultRefused(f"job {job.id}'s {kind} names another patient than its study")
    return header


@dataclass
class LocalLink:
    """The database and the spool of this machine; ``worker`` names who holds the job."""

    settings: Settings
    engine: Engine
    worker: str
    clock: Callable[[], float]
    enqueue_delivery: Callable[[int], None]
    # (job id, priority): a retried STAT job is still STAT.
    enqueue_job_retry: Callable[[int, Priority], None]

    @property
    def lease_s(self) -> float:
        return self.settings.worker.lease_s

    def claim(self, job_id: int) -> ClaimedJob | None:
        return jobs.claim(self.engine, job_id, self.worker, self.lease_s, self.clock())

    def held(self, job_id: int) -> ClaimedJob | None:
        """The job if it is RUNNING under this link's worker (a remote worker's later calls)."""
        return jobs.held(self.engine, job_id, self.worker)

    def renew(self, job_id: int) -> bool:
        with self.engine.begin() as conn:
            renewed = conn.execute(
                update(jobs_table)
                .where(
                    jobs_table.c.id == job_id,
                    jobs_table.c.state == RUNNING,
                    jobs_table.c.worker == self.worker,
                )
                .values(lease_expires_at=self.clock() + self.lease_s)
            ).rowcount
        return bool(renewed)

    def series_paths(self, series_id: int) -> list[Path]:
        """The files of a series that a job reads: the instances received, not our results."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(instances.c.path).where(
                    instances.c.series_id == series_id, instances.c.kind == SOURCE
                )
            ).scalars()
            return [self.settings.spool_dir / p for p in rows]

    def series(self, job: ClaimedJob) -> list[Dataset]:
        return load_series(self.series_paths(job.series_id))

    def store(self, job: ClaimedJob, kind: str, data: bytes) -> Output:
        header = check_result(job, kind, data, self._patient_id(job))
        relative = result_path(job.id, kind)
        write_durable(self.settings.node.data_dir / relative, data, self.settings.tmp_dir)
        # Indexed as a result of the job's study, so QIDO-RS and WADO-RS serve it; a retry
        # writes the same SOP Instance UID and finds the row already there.
        index.record_result(
            self.engine,
            job.study_id,
            header,
            relative.as_posix(),
            len(data),
            self.settings.node.ae_title,
            self.clock(),
        )
        return Output(kind, relative.as_posix(), result_uid(job.id, RESULT_KINDS[kind]))

    def _patient_id(self, job: ClaimedJob) -> str:
        with self.engine.connect() as conn:
            return str(
                conn.execute(
                    select(studies.c.patient_id).where(studies.c.id == job.study_id)
                ).scalar_one()
            )

    def encoded(
        self,
        job: ClaimedJob,
        outputs: Sequence[Output],
        timings: dict[str, float],
        findings: str,
    ) -> int:
        delivery_ids = jobs.encoded(
            self.engine,
            job.id,
            outputs,
            job.destinations,
            timings,
            findings,
            job.study_id,
            self.settings.delivery.max_attempts,
            self.clock(),
            worker=self.worker,
        )
        # Before the sends: the findings may make the study STAT on the worklist.
        self._refresh_worklist(job)
        for delivery_id in delivery_ids:
            self.enqueue_delivery(delivery_id)
        return len(delivery_ids)

    def skip(self, job: ClaimedJob, reason: str) -> None:
        jobs.skip(self.engine, job.id, reason, self.clock(), worker=self.worker)
        self._refresh_worklist(job)

    def fail(self, job: ClaimedJob, reason: str) -> str:
        state = jobs.fail_attempt(self.engine, job.id, reason, self.clock(), worker=self.worker)
        if state == QUEUED:
            self.enqueue_job_retry(job.id, job.priority)
        else:
            self._refresh_worklist(job)
        return state

    def _refresh_worklist(self, job: ClaimedJob) -> None:
        try:
            refresh_worklist(self.engine, self.settings.rules, job.study_id)
        except SQLAlchemyError as exc:
            # The job's outcome is recorded; the study's next refresh catches the worklist up.
            logger.warning(
                "job %d: worklist of study %d not refreshed: %s", job.id, job.study_id, exc
            )

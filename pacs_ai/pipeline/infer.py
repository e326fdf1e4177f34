"""One inference job: series ─► volume ─► model ─► Prediction ─► SEG + SR ─► deliveries.

Runs inside a worker process (:mod:`workers.tasks`). The job row is claimed first, so a
message delivered twice runs once; the lease is renewed while the model works, so a job whose
worker dies is taken back by the reconciler. Output UIDs derive from the job id: a re-run
after a crash writes the same SEG and SR, and the PACS sees a duplicate, not a second result.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from sqlalchemy import Engine, select, update
from sqlalchemy.exc import SQLAlchemyError

from pacs_ai.audit.trail import Auditor
from pacs_ai.config import Settings
from pacs_ai.dicom.header import read_header
from pacs_ai.errors import NotAVolume, PacsAiError
from pacs_ai.imaging.volume import build_volume, in_volume_order, load_series
from pacs_ai.models.base import Model, ModelManifest, Prediction
from pacs_ai.models.registry import create
from pacs_ai.pipeline import jobs
from pacs_ai.pipeline.jobs import ClaimedJob, Output
from pacs_ai.results.seg import build_seg
from pacs_ai.results.sr import build_sr
from pacs_ai.storage import index
from pacs_ai.storage.schema import RUNNING, SOURCE, instances
from pacs_ai.storage.schema import jobs as jobs_table
from pacs_ai.storage.spool import write_durable
from pacs_ai.worklist.priority import refresh as refresh_worklist

logger = logging.getLogger(__name__)


class Unsuitable(PacsAiError):
    """The series is not something this model accepts (modality, slice count)."""


def resolve_device(requested: str) -> str:
    """``auto`` is the first GPU when torch sees one, else the CPU."""
    if requested != "auto":
        return requested
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda:0" if torch.cuda.is_available() else "cpu"


@dataclass
class ModelCache:
    """Models stay resident in the worker process: loaded on first use, once."""

    device: str
    loaded: dict[str, Model] = field(default_factory=dict)

    def get(self, name: str) -> Model:
        if name not in self.loaded:
            model = create(name)
            started = time.perf_counter()
            model.load(self.device)
            logger.info(
                "model %s loaded on %s in %.1f s", name, self.device, time.perf_counter() - started
            )
            self.loaded[name] = model
        return self.loaded[name]


@dataclass
class WorkerContext:
    """What a worker process builds once and every task uses."""

    settings: Settings
    engine: Engine
    models: ModelCache
    enqueue_delivery: Callable[[int], None]
    enqueue_job_retry: Callable[[int], None]
    clock: Callable[[], float] = time.time
    name: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    # Deliveries are audited; one Auditor (and syslog socket) per worker process.
    auditor: Auditor = field(init=False)

    def __post_init__(self) -> None:
        self.auditor = Auditor(self.engine, self.settings, self.clock)


class LeaseKeeper:
    """Renews a RUNNING job's lease every third of its length until the job is done."""

    def __init__(self, ctx: WorkerContext, job_id: int) -> None:
        self.ctx, self.job_id = ctx, job_id
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join()

    def _run(self) -> None:
        lease = self.ctx.settings.worker.lease_s
        while not self.stop.wait(lease / 3):
            with self.ctx.engine.begin() as conn:
                conn.execute(
                    update(jobs_table)
                    .where(
                        jobs_table.c.id == self.job_id,
                        jobs_table.c.state == RUNNING,
                        jobs_table.c.worker == self.ctx.name,
                    )
                    .values(lease_expires_at=self.ctx.clock() + lease)
                )


def series_paths(engine: Engine, spool_root: Path, series_id: int) -> list[Path]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(instances.c.path).where(
                instances.c.series_id == series_id, instances.c.kind == SOURCE
            )
        ).scalars()
        return [spool_root / p for p in rows]


def run_job(ctx: WorkerContext, job_id: int) -> str:
    """Run one job to ENCODED (or SKIPPED / back to QUEUED / FAILED); return the new state."""
    job = jobs.claim(ctx.engine, job_id, ctx.name, ctx.settings.worker.lease_s, ctx.clock())
    if job is None:
        logger.info("job %d not claimable (done, canceled, or running elsewhere)", job_id)
        return "NOT_CLAIMED"
    logger.info(
        "job %d: %s on series %s (attempt %d)",
        job_id,
        job.model,
        job.series_instance_uid,
        job.attempt,
    )
    with LeaseKeeper(ctx, job_id):
        try:
            outputs, timings, findings = _infer(ctx, job)
        except (NotAVolume, Unsuitable) as exc:
            jobs.skip(ctx.engine, job_id, str(exc), ctx.clock())
            _refresh_worklist(ctx, job)
            return "SKIPPED"
        except Exception as exc:
            # The task edge: any failure is recorded on the job and retried or failed there.
            logger.exception("job %d failed", job_id)
            state = jobs.fail_attempt(
                ctx.engine, job_id, f"{type(exc).__name__}: {exc}", ctx.clock()
            )
            if state == "QUEUED":
                ctx.enqueue_job_retry(job_id)
            else:
                _refresh_worklist(ctx, job)
            return state
    delivery_ids = jobs.encoded(
        ctx.engine,
        job_id,
        outputs,
        job.destinations,
        timings,
        findings,
        job.study_id,
        ctx.settings.delivery.max_attempts,
        ctx.clock(),
    )
    # Before the sends: the findings may make the study STAT on the worklist.
    _refresh_worklist(ctx, job)
    for delivery_id in delivery_ids:
        ctx.enqueue_delivery(delivery_id)
    logger.info(
        "job %d ENCODED: %s; %d deliveries",
        job_id,
        ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()),
        len(delivery_ids),
    )
    return "ENCODED"


def _refresh_worklist(ctx: WorkerContext, job: ClaimedJob) -> None:
    try:
        refresh_worklist(ctx.engine, ctx.settings.rules, job.study_id)
    except SQLAlchemyError as exc:
        # The job's outcome is recorded; the study's next refresh catches the worklist up.
        logger.warning("job %d: worklist of study %d not refreshed: %s", job.id, job.study_id, exc)


def _check_suitable(manifest: ModelManifest, datasets: list[Dataset]) -> None:
    modality = str(datasets[0].get("Modality", "")) if datasets else ""
    if modality not in manifest.modalities:
        accepted = "/".join(manifest.modalities)
        raise Unsuitable(f"{manifest.name} takes {accepted}, not {modality!r}")
    if len(datasets) < manifest.min_slices:
        raise Unsuitable(
            f"{manifest.name} needs at least {manifest.min_slices} slices; "
            f"the series has {len(datasets)}"
        )


def _infer(ctx: WorkerContext, job: ClaimedJob) -> tuple[list[Output], dict[str, float], str]:
    timings: dict[str, float] = {}
    started = time.perf_counter()
    paths = series_paths(ctx.engine, ctx.settings.spool_dir, job.series_id)
    datasets = load_series(paths)
    model = ctx.models.get(job.model)
    manifest = model.manifest
    _check_suitable(manifest, datasets)
    volume = build_volume(datasets, require_3d=manifest.needs_3d)
    sources = in_volume_order(datasets, volume)
    timings["volume"] = time.perf_counter() - started

    started = time.perf_counter()
    prediction = model.predict(volume)
    timings["inference"] = time.perf_counter() - started

    started = time.perf_counter()
    outputs = _encode(ctx, job, sources, prediction, manifest)
    timings["encode"] = time.perf_counter() - started
    return outputs, timings, _summary(prediction)


def _encode(
    ctx: WorkerContext,
    job: ClaimedJob,
    sources: list[Dataset],
    prediction: Prediction,
    manifest: ModelManifest,
) -> list[Output]:
    folder = Path("results") / str(job.id)
    outputs = []
    seg = None
    if prediction.labelmap.any():
        seg = build_seg(sources, prediction, manifest, job.id)
        outputs.append(_write(ctx, job, folder / "SEG.dcm", seg, "SEG"))
    sr = build_sr(sources, seg, prediction, manifest, job.id)
    outputs.append(_write(ctx, job, folder / "SR.dcm", sr, "SR"))
    return outputs


def _write(ctx: WorkerContext, job: ClaimedJob, relative: Path, dataset: Any, kind: str) -> Output:
    from io import BytesIO

    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    data_dir = ctx.settings.node.data_dir
    write_durable(data_dir / relative, data, ctx.settings.tmp_dir)
    # Indexed as a result of the job's study, so QIDO-RS and WADO-RS serve it; a retry writes
    # the same SOP Instance UID and finds the row already there.
    index.record_result(
        ctx.engine,
        job.study_id,
        read_header(data),
        relative.as_posix(),
        len(data),
        ctx.settings.node.ae_title,
        ctx.clock(),
    )
    return Output(kind, relative.as_posix(), str(dataset.SOPInstanceUID))


def _summary(prediction: Prediction) -> str:
    findings = [
        {
            "name": f.name,
            "volume_ml": None if f.volume_ml is None else round(f.volume_ml, 2),
            "longest_diameter_mm": None
            if f.longest_diameter_mm is None
            else round(f.longest_diameter_mm, 1),
            "certainty": None if f.certainty is None else round(f.certainty, 3),
        }
        for f in prediction.findings
    ]
    return json.dumps({"present": prediction.present, "findings": findings})

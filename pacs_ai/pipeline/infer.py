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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from io import BytesIO
from typing import Protocol

from pydicom.dataset import Dataset
from sqlalchemy import Engine

from pacs_ai.audit.trail import Auditor
from pacs_ai.config import Settings
from pacs_ai.dicom.encode import part10_bytes
from pacs_ai.errors import NetworkError, NotAVolume, PacsAiError
from pacs_ai.imaging.volume import build_volume, in_volume_order
from pacs_ai.models.base import Model, ModelManifest, Prediction
from pacs_ai.models.registry import create, wrong_device
from pacs_ai.pipeline.jobs import ClaimedJob, Output
from pacs_ai.pipeline.link import JobLink, LeaseLost, LocalLink
from pacs_ai.pipeline.memory import collector_paused
from pacs_ai.pipeline.prepare import PreparedSeries
from pacs_ai.pipeline.route import Priority
from pacs_ai.results.seg import build_seg, segment_numbers
from pacs_ai.results.sr import build_sr

logger = logging.getLogger(__name__)


def worker_name() -> str:
    """How a worker process signs its claims: host and pid, unique while it lives."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Unsuitable(PacsAiError):
    """The series is not something this model accepts (modality, slice count)."""


class WrongDevice(PacsAiError):
    """The model needs a device this worker does not have: its manifest says ``cuda``, the
    worker runs on the CPU. The message names the model and how to fix it."""


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
    """Models stay resident in the worker process: loaded on first use, once.

    The worker's warm-up (:mod:`pacs_ai.pipeline.warmup`) runs in a thread of its own while
    jobs may already arrive. A job's :meth:`get` waits for it (:meth:`exclusive`) rather than
    load a second copy of a model, or compete with the warm-up for the CPU and the GIL.
    """

    device: str
    loaded: dict[str, Model] = field(default_factory=dict)
    # Reentrant: the warm-up holds it throughout and loads its models through get().
    _lock: threading.RLock = field(
        init=False, default_factory=threading.RLock, repr=False, compare=False
    )

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold every other thread's :meth:`get` back until the block is done."""
        with self._lock:
            yield

    def get(self, name: str) -> Model:
        return self.timed_get(name)[0]

    def timed_get(self, name: str) -> tuple[Model, float, float]:
        """Model ``name``; the seconds spent waiting for the warm-up, and loading the model."""
        started = time.perf_counter()
        with self._lock:
            waited = time.perf_counter() - started
            loading = 0.0
            if name not in self.loaded:
                model = create(name)
                # Before the load: a model that needs CUDA is not loaded on a CPU at all.
                why = wrong_device(name, model.manifest, self.device)
                if why is not None:
                    raise WrongDevice(why)
                started = time.perf_counter()
                model.load(self.device)
                loading = time.perf_counter() - started
                logger.info("model %s loaded on %s in %.1f s", name, self.device, loading)
                self.loaded[name] = model
            return self.loaded[name], waited, loading


class JobRunner(Protocol):
    """What :func:`run_job` needs: settings, resident models, a link to the node, and the
    series this process prepared (None where it cannot: no files of the node's)."""

    @property
    def settings(self) -> Settings: ...

    @property
    def models(self) -> ModelCache: ...

    @property
    def link(self) -> JobLink: ...

    @property
    def prepared(self) -> PreparedSeries | None: ...


@dataclass
class WorkerContext:
    """What a worker process on the node's machine builds once and every task uses.

    Its :class:`~pacs_ai.pipeline.link.LocalLink` reads the database and the spool; the
    deliveries (:mod:`pacs_ai.pipeline.deliver`) use the engine directly.
    """

    settings: Settings
    engine: Engine
    models: ModelCache
    enqueue_delivery: Callable[[int], None]
    enqueue_job_retry: Callable[[int, Priority], None]
    clock: Callable[[], float] = time.time
    name: str = field(default_factory=worker_name)
    # Deliveries are audited; one Auditor (and syslog socket) per worker process.
    auditor: Auditor = field(init=False)
    link: LocalLink = field(init=False)
    prepared: PreparedSeries | None = field(init=False)

    def __post_init__(self) -> None:
        self.auditor = Auditor(self.engine, self.settings, self.clock)
        self.link = LocalLink(
            self.settings,
            self.engine,
            self.name,
            self.clock,
            self.enqueue_delivery,
            self.enqueue_job_retry,
        )
        budget = self.settings.worker.prepare_mb << 20
        self.prepared = PreparedSeries(budget, self.link.series_paths) if budget else None


@dataclass
class RemoteWorkerContext:
    """A worker that shares no disk with the node: the node's HTTP API is its only way in."""

    settings: Settings
    models: ModelCache
    link: JobLink
    # Series come over HTTP, file by file, only once a job holds them: nothing to prepare.
    prepared: None = None


class LeaseKeeper:
    """Renews a RUNNING job's lease every third of its length until the job is done."""

    def __init__(self, link: JobLink, job_id: int) -> None:
        self.link, self.job_id = link, job_id
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join()

    def _run(self) -> None:
        while not self.stop.wait(self.link.lease_s / 3):
            try:
                if not self.link.renew(self.job_id):
                    logger.warning("job %d: lease lost (taken back or canceled)", self.job_id)
            except PacsAiError as exc:
                # A node that does not answer for a while: the next renewal may get through,
                # and if none does the reconciler gives the job to another worker.
                logger.warning("job %d: lease not renewed: %s", self.job_id, exc)


def run_job(ctx: JobRunner, job_id: int) -> str:
    """Run one job to ENCODED (or SKIPPED / back to QUEUED / FAILED); return the new state."""
    link = ctx.link
    job = link.claim(job_id)
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
    with LeaseKeeper(link, job_id):
        try:
            outputs, timings, findings = _infer(ctx, job)
        except (NotAVolume, Unsuitable) as exc:
            link.skip(job, str(exc))
            return "SKIPPED"
        except WrongDevice as exc:
            # Not SKIPPED: the series is fine, this worker is not, and FAILED (with `pacs-ai
            # jobs retry` once a GPU worker runs) is where an admin looks for what to fix. An
            # ordinary failed attempt: its retry goes back to the infer queue, which a GPU worker
            # of a mixed pool may take; on CPU workers alone each attempt fails at once (nothing
            # is loaded or read) and the job ends FAILED. Failing without a retry would need a
            # call of its own on both links (local and HTTP), for attempts that cost nothing.
            logger.error("job %d: %s", job_id, exc)
            return link.fail(job, str(exc))
        except NetworkError:
            # The node itself is out of reach: nothing can be recorded there. The job's lease
            # runs out and the reconciler sends it again.
            raise
        except LeaseLost as exc:
            logger.warning("job %d dropped: %s", job_id, exc)
            return "LEASE_LOST"
        except Exception as exc:
            # The task edge: any failure is recorded on the job and retried or failed there.
            logger.exception("job %d failed", job_id)
            return link.fail(job, f"{type(exc).__name__}: {exc}")
    count = link.encoded(job, outputs, timings, findings)
    logger.info(
        "job %d ENCODED: %s; %d deliveries",
        job_id,
        ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()),
        count,
    )
    return "ENCODED"


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


def _infer(ctx: JobRunner, job: ClaimedJob) -> tuple[list[Output], dict[str, float], str]:
    timings: dict[str, float] = {}
    # Stages of their own, both zero on a warm worker: waiting for the worker's warm-up (a job
    # that came while the worker was starting), and loading a model the warm-up did not load.
    model, timings["warm-up"], timings["load"] = ctx.models.timed_get(job.model)

    started = time.perf_counter()
    manifest = model.manifest
    prepared = ctx.prepared.take(job.series_id) if ctx.prepared is not None else None
    if prepared is not None:
        # Read and built while the study was quiet, from the very files the job would read
        # (pacs_ai.pipeline.prepare); two or more slices, so require_3d changes nothing.
        datasets, volume = prepared.datasets, prepared.volume
        _check_suitable(manifest, datasets)
        timings["prepared"] = prepared.seconds
        logger.info(
            "job %d: series prepared in the quiet period (%.2f s)", job.id, prepared.seconds
        )
    else:
        with collector_paused():
            datasets = ctx.link.series(job)
            _check_suitable(manifest, datasets)
            volume = build_volume(datasets, require_3d=manifest.needs_3d)
    sources = in_volume_order(datasets, volume)
    timings["volume"] = time.perf_counter() - started

    started = time.perf_counter()
    prediction = model.predict(volume)
    timings["inference"] = time.perf_counter() - started

    started = time.perf_counter()
    with collector_paused():
        outputs = _encode(ctx, job, sources, prediction, manifest)
    timings["encode"] = time.perf_counter() - started
    return outputs, timings, _summary(prediction)


def _encode(
    ctx: JobRunner,
    job: ClaimedJob,
    sources: list[Dataset],
    prediction: Prediction,
    manifest: ModelManifest,
) -> list[Output]:
    outputs = []
    seg = None
    # One scan of the label map for both objects (10^8 voxels in a large CT).
    numbers = segment_numbers(prediction, manifest)
    if numbers:
        seg = build_seg(sources, prediction, manifest, job.id, numbers=numbers)
        outputs.append(ctx.link.store(job, "SEG", encoded_bytes(seg)))
    sr = build_sr(sources, seg, prediction, manifest, job.id, numbers=numbers)
    outputs.append(ctx.link.store(job, "SR", encoded_bytes(sr)))
    return outputs


def encoded_bytes(dataset: Dataset) -> bytes:
    """``dataset`` as a DICOM Part 10 file in memory (what the node stores and sends)."""
    fast = part10_bytes(dataset)
    if fast is not None:
        return fast
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


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

"""A worker's warm-up: what its first job would otherwise pay before any model runs.

A fresh worker process has imported its code but not used it. Its first job would load the
model and pay one-time costs inside pydicom and highdicom (highdicom reads the standard's IOD
and module tables on first use, 0.3 s on the project machine), all counted in the latency of
whatever study happens to come first. So, when the process starts:

1. a rehearsal: a tiny synthetic CT series goes through the job's own steps (bytes → datasets
   → volume → SEG → SR → bytes), which touches every lazily initialised path of the encode;
2. the models it will run are loaded into the process's :class:`ModelCache`: those
   ``worker.preload`` names, else those the enabled rules name (:func:`models_to_load`).

It runs in a daemon thread (:func:`start`): Celery kills a pool process that takes longer
than ``worker_proc_alive_timeout`` to come up, and a large model on a slow disk may. A job
that arrives meanwhile waits for the warm-up to finish (the job's "warm-up" timing). Nothing
here can fail the worker: what goes wrong is logged, and the job that needs it tries again.
"""

from __future__ import annotations

import logging
import threading
import time
from io import BytesIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from pacs_ai.config import Settings
from pacs_ai.imaging.volume import build_volume, in_volume_order
from pacs_ai.models.base import (
    ANATOMICAL_STRUCTURE,
    Code,
    Finding,
    LabelSpec,
    ModelManifest,
    Prediction,
)
from pacs_ai.pipeline.infer import ModelCache, encoded_bytes
from pacs_ai.results.seg import build_seg
from pacs_ai.results.sr import build_sr

logger = logging.getLogger(__name__)

REHEARSAL_JOB = "warm-up"
"""The job id the rehearsal's UIDs derive from; nothing it builds leaves the process."""
_REHEARSAL_MANIFEST = ModelManifest(
    name="pacs-ai-warm-up",
    version="1",
    task="segmentation",
    description="Rehearsal encode at worker start-up",
    labels=(LabelSpec(1, "Body", ANATOMICAL_STRUCTURE, Code("38266002", "SCT", "Entire body")),),
)


def rule_models(settings: Settings) -> list[str]:
    """The models the enabled rules run, each once, in the order the rules name them."""
    names = [name for rule in settings.rules if rule.enabled for name in rule.models]
    return list(dict.fromkeys(names))


def models_to_load(settings: Settings) -> list[str]:
    """What the warm-up loads: ``worker.preload`` when set, else the enabled rules' models."""
    if settings.worker.preload:
        return list(dict.fromkeys(settings.worker.preload))
    return rule_models(settings)


def start(settings: Settings, models: ModelCache) -> threading.Thread | None:
    """Warm this process up in the background, if it runs inference; the thread, else None."""
    if "infer" not in settings.worker.queues:
        return None  # a delivery-only worker never builds a volume nor loads a model
    thread = threading.Thread(target=warm_up, args=(settings, models), name="warm-up", daemon=True)
    thread.start()
    return thread


def warm_up(settings: Settings, models: ModelCache) -> None:
    """Rehearse the encode, then load :func:`models_to_load`; log, never raise.

    A job that arrives meanwhile waits in ``models.timed_get`` until this is done: run side
    by side, both would only be slower.
    """
    started = time.perf_counter()
    with models.exclusive():
        try:
            rehearse()
        except Exception:
            # A bug in the rehearsal must not stop a worker whose jobs may well run.
            logger.exception("warm-up: the rehearsal encode failed")
        rehearsed = time.perf_counter() - started
        loaded = [name for name in models_to_load(settings) if _load(models, name)]
    logger.info(
        "warm-up done in %.1f s (rehearsal %.1f s); models loaded: %s",
        time.perf_counter() - started,
        rehearsed,
        ", ".join(loaded) or "none",
    )


def _load(models: ModelCache, name: str) -> bool:
    try:
        models.get(name)
    except Exception as exc:
        # The job that needs it loads it again and records the failure on the job.
        logger.warning("warm-up: model %s not loaded: %s: %s", name, type(exc).__name__, exc)
        return False
    return True


def rehearse() -> tuple[bytes, bytes]:
    """One job's worth of reading, volume building and encoding, on a tiny synthetic series;
    the SEG's and SR's bytes, as a job would deliver them."""
    datasets = [pydicom.dcmread(BytesIO(encoded_bytes(ds))) for ds in synthetic_series()]
    volume = build_volume(datasets)
    sources = in_volume_order(datasets, volume)
    labelmap = np.zeros(volume.shape, dtype=np.uint8)
    labelmap[:, :2, :2] = 1
    finding = Finding(1, "Body", volume_ml=float(labelmap.sum()) * volume.voxel_volume_ml)
    prediction = Prediction(labelmap, [finding])
    seg = build_seg(sources, prediction, _REHEARSAL_MANIFEST, REHEARSAL_JOB)
    sr = build_sr(sources, seg, prediction, _REHEARSAL_MANIFEST, REHEARSAL_JOB)
    return encoded_bytes(seg), encoded_bytes(sr)


def synthetic_series(slices: int = 2, size: int = 4) -> list[Dataset]:
    """An uncompressed axial CT series of ``slices`` images of ``size``² air, 1 mm apart."""
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    return [_slice(study, series, frame, k, size) for k in range(slices)]


def _slice(study: str, series: str, frame: str, k: int, size: int) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
    ds.Modality, ds.ImageType = "CT", ["ORIGINAL", "PRIMARY", "AXIAL"]
    # Type 2 attributes a SEG and an SR copy from their sources: present, and empty.
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"):
        setattr(ds, keyword, "")
    for keyword in ("StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName"):
        setattr(ds, keyword, "")
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "", 1, k + 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0, 0, k]
    ds.PixelSpacing, ds.SliceThickness = [1, 1], 1
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.PixelData = np.zeros((size, size), dtype="<i2").tobytes()
    return ds

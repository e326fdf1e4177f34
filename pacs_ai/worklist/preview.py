"""A key-slice PNG of a job: the source image, windowed, with the job's SEG drawn over it.

The key slice is the source image the segmentation covers most, counting each segment as
its share of that segment's total: a small nodule then outweighs a large body outline, and a
slice where every organ shows beats one with the body alone. Only that one source image is
decoded; the SEG's frames are counted from their packed bits without unpacking
them all. A job without a SEG (it found nothing) shows its series' middle image.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from numpy.typing import NDArray
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels.processing import apply_modality_lut
from pydicom.pixels.utils import pixel_array
from scipy import ndimage  # type: ignore[import-untyped]
from sqlalchemy import Engine, select

from pacs_ai.errors import NotFound
from pacs_ai.storage.schema import SOURCE, deliveries, instances, jobs

logger = logging.getLogger(__name__)

# Distinct, saturated colours (segment 1 red, 2 green, 3 blue, ...), RGB.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (255, 225, 25),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
)
ALPHA = 0.45
# Soft-tissue window for CT that names none; other modalities use the image's own range.
CT_WINDOW = (40.0, 400.0)
# Set bits per byte value, to count a packed BINARY frame's pixels without unpacking it.
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint32)


@dataclass(frozen=True)
class Segment:
    number: int
    label: str
    colour: tuple[int, int, int]


@dataclass
class Preview:
    png: bytes
    sop_instance_uid: str
    """The source image shown."""
    segments: list[Segment] = field(default_factory=list)
    """The segments drawn on it, with their colours."""


def colour(segment_number: int) -> tuple[int, int, int]:
    return PALETTE[(segment_number - 1) % len(PALETTE)]


def render(engine: Engine, spool_dir: Path, data_dir: Path, study_id: int, job_id: int) -> Preview:
    """The preview of job ``job_id`` of study ``study_id``; :class:`NotFound` if none."""
    with engine.connect() as conn:
        job = conn.execute(
            select(jobs.c.series_id).where(jobs.c.id == job_id, jobs.c.study_id == study_id)
        ).first()
        if job is None:
            raise NotFound(f"study {study_id} has no job {job_id}")
        seg_payload = conn.execute(
            select(deliveries.c.payload).where(
                deliveries.c.job_id == job_id, deliveries.c.kind == "SEG"
            )
        ).scalar()
        sources = conn.execute(
            select(instances.c.sop_instance_uid, instances.c.path)
            .where(instances.c.series_id == job.series_id, instances.c.kind == SOURCE)
            .order_by(instances.c.instance_number, instances.c.id)
        ).all()
    if not sources:
        raise NotFound(f"the source series of job {job_id} holds no instances")
    paths = {row.sop_instance_uid: spool_dir / row.path for row in sources}
    middle = sources[len(sources) // 2].sop_instance_uid
    seg = _read_seg(data_dir, job_id, seg_payload)
    if seg is None:
        return Preview(_png(_grey(_read_source(paths[middle]))), middle)
    frames = _frames(seg, paths)
    key = _key_slice(seg, frames) or middle
    image = _grey(_read_source(paths[key]))
    drawn = _overlay(image, seg, [i for i, f in enumerate(frames) if f.source == key])
    logger.debug("preview of job %d: source %s, %d segment(s)", job_id, key, len(drawn))
    return Preview(_png(image), key, drawn)


def _read_source(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path)
    except (OSError, InvalidDicomError) as exc:
        raise NotFound(f"source image {path.name} cannot be read on this node: {exc}") from None


def _read_seg(data_dir: Path, job_id: int, payload: str | None) -> Dataset | None:
    """The job's SEG, or None when it has none here (nothing found, or written elsewhere)."""
    # The worker writes results/<job id>/SEG.dcm (pipeline/infer.py); a delivery names it too.
    # A worker on another machine with its own data dir leaves no SEG here: the preview then
    # shows the plain image rather than failing.
    path = (data_dir / (payload or f"results/{job_id}/SEG.dcm")).resolve()
    if not path.is_relative_to(data_dir.resolve()) or not path.is_file():
        return None
    try:
        return pydicom.dcmread(path)
    except (OSError, InvalidDicomError) as exc:
        logger.warning("job %d: SEG %s unreadable, preview without it: %s", job_id, path, exc)
        return None


@dataclass(frozen=True)
class _Frame:
    segment: int
    source: str  # SOP Instance UID of the source image, "" when unknown


def _frames(seg: Dataset, paths: dict[str, Path]) -> list[_Frame]:
    """Segment number and source image of each SEG frame."""
    by_position: dict[tuple[float, ...], str] | None = None
    found = []
    for item in seg.PerFrameFunctionalGroupsSequence:
        number = _segment_of(seg, item)
        source = ""
        if "DerivationImageSequence" in item:
            derivation = item.DerivationImageSequence[0]
            if "SourceImageSequence" in derivation:
                source = str(derivation.SourceImageSequence[0].ReferencedSOPInstanceUID)
        if not source and "PlanePositionSequence" in item:
            # No reference: match the frame to the source image at the same position.
            if by_position is None:
                by_position = _positions(paths)
            position = item.PlanePositionSequence[0].ImagePositionPatient
            source = by_position.get(_rounded(position), "")
        found.append(_Frame(number, source))
    return found


def _rounded(position: Any) -> tuple[float, ...]:
    return tuple(round(float(v), 2) for v in position)


def _positions(paths: dict[str, Path]) -> dict[tuple[float, ...], str]:
    positions = {}
    for uid, path in paths.items():
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["ImagePositionPatient"])
        if "ImagePositionPatient" in ds:
            positions[_rounded(ds.ImagePositionPatient)] = uid
    return positions


def _is_packed(seg: Dataset) -> bool:
    return int(seg.BitsAllocated) == 1 and not seg.file_meta.TransferSyntaxUID.is_compressed


def _counts(seg: Dataset, n_frames: int) -> NDArray[np.int64]:
    """Segmented pixels per frame."""
    pixels = int(seg.Rows) * int(seg.Columns)
    if _is_packed(seg) and pixels % 8 == 0:
        raw = np.frombuffer(seg.PixelData, dtype=np.uint8)[: n_frames * pixels // 8]
        counts: NDArray[np.int64] = _POPCOUNT[raw.reshape(n_frames, pixels // 8)].sum(axis=1)
        return counts.astype(np.int64)
    return np.array([int(np.count_nonzero(_mask(seg, i))) for i in range(n_frames)], dtype=np.int64)


def _mask(seg: Dataset, index: int) -> NDArray[np.bool_]:
    rows, columns = int(seg.Rows), int(seg.Columns)
    if _is_packed(seg):
        # Frames are packed back to back, least significant bit first (PS3.5 8.1.1).
        start = index * rows * columns
        first, last = start // 8, (start + rows * columns + 7) // 8
        bits = np.unpackbits(
            np.frombuffer(seg.PixelData, dtype=np.uint8)[first:last], bitorder="little"
        )
        offset = start - first * 8
        return bits[offset : offset + rows * columns].reshape(rows, columns).astype(bool)
    return np.asarray(pixel_array(seg, index=index)) > 0


def _key_slice(seg: Dataset, frames: list[_Frame]) -> str:
    counts = _counts(seg, len(frames))
    totals: dict[int, int] = {}
    for frame, count in zip(frames, counts, strict=True):
        totals[frame.segment] = totals.get(frame.segment, 0) + int(count)
    score: dict[str, float] = {}
    for frame, count in zip(frames, counts, strict=True):
        if frame.source and count:
            share = float(count) / totals[frame.segment]
            score[frame.source] = score.get(frame.source, 0.0) + share
    return max(score, key=lambda uid: score[uid]) if score else ""


def _window(ds: Dataset, values: NDArray[np.float64]) -> tuple[float, float]:
    if "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = ds.WindowCenter, ds.WindowWidth
        # Multi-valued: the first is the one the modality suggests by default.
        center = center[0] if isinstance(center, pydicom.multival.MultiValue) else center
        width = width[0] if isinstance(width, pydicom.multival.MultiValue) else width
        if float(width) > 0:
            return float(center), float(width)
    if str(ds.get("Modality", "")) == "CT":
        return CT_WINDOW
    low, high = float(values.min()), float(values.max())
    return (low + high) / 2, max(high - low, 1.0)


def _grey(ds: Dataset) -> NDArray[np.uint8]:
    """The image as RGB, windowed for display."""
    pixels = np.asarray(ds.pixel_array)
    if pixels.ndim == 3 and str(ds.get("PhotometricInterpretation", "")) != "RGB":
        pixels = pixels[0]  # a multi-frame source: its first frame
    if pixels.ndim == 3:
        return pixels.astype(np.uint8)
    values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float64)
    center, width = _window(ds, values)
    low = center - width / 2
    scaled = np.clip((values - low) / width, 0.0, 1.0) * 255.0
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        scaled = 255.0 - scaled
    grey = np.rint(scaled).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def _overlay(image: NDArray[np.uint8], seg: Dataset, indices: list[int]) -> list[Segment]:
    labels = {
        int(item.SegmentNumber): str(item.get("SegmentLabel", ""))
        for item in seg.get("SegmentSequence", [])
    }
    drawn: list[Segment] = []
    for index in indices:
        mask = _mask(seg, index)
        if mask.shape != image.shape[:2]:
            logger.warning(
                "SEG %s frame %d is %s, its source image %s: not drawn",
                seg.SOPInstanceUID,
                index + 1,
                mask.shape,
                image.shape[:2],
            )
            continue
        number = _segment_of(seg, seg.PerFrameFunctionalGroupsSequence[index])
        rgb = np.array(colour(number), dtype=np.float64)
        blended = image[mask] * (1 - ALPHA) + rgb * ALPHA
        image[mask] = np.rint(blended).astype(np.uint8)
        # A solid outline keeps a small or faint segment visible at any zoom.
        edge = mask & ~ndimage.binary_erosion(mask)
        image[edge] = rgb.astype(np.uint8)
        drawn.append(Segment(number, labels.get(number, ""), colour(number)))
    return drawn


def _segment_of(seg: Dataset, item: Dataset) -> int:
    if "SegmentIdentificationSequence" not in item:
        # With one segment highdicom puts its identification in the shared groups.
        shared = seg.get("SharedFunctionalGroupsSequence")
        if not shared or "SegmentIdentificationSequence" not in shared[0]:
            return 1
        item = shared[0]
    return int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)


def _png(image: NDArray[np.uint8]) -> bytes:
    buffer = BytesIO()
    Image.fromarray(image, "RGB").save(buffer, "PNG")
    return buffer.getvalue()

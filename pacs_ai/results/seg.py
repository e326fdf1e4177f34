"""A model's label map as a DICOM Segmentation (PS3.3 A.51, C.8.20) in the source study.

The SEG is BINARY (one bit per pixel, one frame per segment and slice, empty frames left
out) and uncompressed: the LABELMAP SOP class is too new for Orthanc 1.10 and dcmtk, which
reject it (DESIGN.md). Each segment carries its SNOMED CT category and type (CID 7150,
CID 7151), AUTOMATIC as the Segment Algorithm Type and the model in the Segmentation
Algorithm Identification Sequence (PS3.3 C.8.20.2, Table 10-19); every frame references the
source image it was derived from.

Segment numbers: BINARY SEGs must number their segments 1..N without gaps (PS3.3 C.8.20.2,
enforced by highdicom), so a label map holding labels {1, 3} cannot keep those numbers. Only
the labels present in the label map become segments, numbered by ascending label:
:func:`segment_numbers` gives the mapping, which the SR builder uses to reference them. For the
usual manifest (labels 1..N, all found) the segment number is the label number.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code as DicomCode

import pacs_ai
from pacs_ai.models.base import Code, LabelSpec, ModelManifest, Prediction
from pacs_ai.results import uids
from pacs_ai.results.uids import MANUFACTURER

logger = logging.getLogger(__name__)

RESEARCH_USE_ONLY = "RESEARCH USE ONLY"
DEFAULT_DEVICE_SERIAL_NUMBER = "PACSAI"
"""Used when the caller names no node; the worker passes the node's AE title instead."""
FEW_LABELS = 16
"""Up to this label value, :func:`labels_present` compares value by value instead of sorting."""


def coded(code: Code) -> hd.sr.CodedConcept:
    """The project's :class:`~pacs_ai.models.base.Code` as a highdicom coded concept."""
    return hd.sr.CodedConcept.from_code(DicomCode(code.value, code.scheme, code.meaning))


def series_description(manifest: ModelManifest, kind: str) -> str:
    """``"<model> <kind> RESEARCH USE ONLY"`` cut to the 64 characters of an LO (PS3.5 6.2).

    The model name is shortened, never the suffix: the warning is what must reach the viewer.
    """
    suffix = f" {kind} {RESEARCH_USE_ONLY}" if manifest.research_only else f" {kind}"
    return manifest.name[: 64 - len(suffix)].rstrip() + suffix


def content_label(manifest: ModelManifest) -> str:
    """The model name as a Content Label (PS3.3 10.9): a CS of at most 16 ``A-Z 0-9 _``."""
    label = re.sub(r"[^A-Z0-9_]", "_", manifest.name.upper())[:16]
    return label or "AI_SEG"


def labels_present(labelmap: NDArray[np.integer[Any]] | NDArray[np.bool_]) -> list[int]:
    """The non-zero values of ``labelmap``, ascending."""
    if labelmap.size and labelmap.dtype.kind == "u":
        highest = int(labelmap.max())
        if highest <= FEW_LABELS:
            # np.unique sorts or hashes every voxel (10^8 in a large CT): a few passes are cheaper.
            return [value for value in range(1, highest + 1) if (labelmap == value).any()]
    return [int(v) for v in np.unique(labelmap) if v != 0]


def segment_numbers(prediction: Prediction, manifest: ModelManifest) -> dict[int, int]:
    """Label number → segment number for every label present in ``prediction.labelmap``.

    Raises ``ValueError`` if the label map holds a value the manifest does not declare: a
    model that does that is broken, and a segment without a meaning must not reach a PACS.
    """
    present = labels_present(prediction.labelmap)
    declared = {spec.number for spec in manifest.labels}
    unknown = sorted(set(present) - declared)
    if unknown:
        raise ValueError(f"label map of model {manifest.name!r} holds undeclared labels {unknown}")
    return {label: number for number, label in enumerate(sorted(present), start=1)}


def algorithm_identification(manifest: ModelManifest) -> hd.AlgorithmIdentificationSequence:
    """Segmentation Algorithm Identification (PS3.3 Table 10-19): name, version, family."""
    return hd.AlgorithmIdentificationSequence(
        name=manifest.name[:64],
        family=coded(manifest.algorithm_family),
        version=manifest.version[:64],
        source=MANUFACTURER,
    )


def software_versions(manifest: ModelManifest) -> list[str]:
    """Software Versions (PS3.3 C.7.5.1): the node's, then the model's name and version."""
    return [f"pacs-ai {pacs_ai.__version__}", f"{manifest.name} {manifest.version}"[-64:]]


def _check_sources(source_images: Sequence[Dataset], prediction: Prediction) -> None:
    shape = prediction.labelmap.shape
    if len(shape) != 3:
        raise ValueError(f"label map must be 3D (slices, rows, columns), not shape {shape}")
    if len(source_images) != shape[0]:
        raise ValueError(f"{len(source_images)} source images for a label map of {shape[0]} slices")
    for k, image in enumerate(source_images):
        if (int(image.Rows), int(image.Columns)) != shape[1:]:
            raise ValueError(
                f"source image {k} ({image.SOPInstanceUID}) is {image.Rows}x{image.Columns}, "
                f"the label map slices are {shape[1]}x{shape[2]}"
            )
    if len({image.SeriesInstanceUID for image in source_images}) != 1:
        raise ValueError("source images must all belong to one series")


def _relabel(labelmap: NDArray[np.uint8], numbers: dict[int, int]) -> NDArray[np.uint8]:
    """``labelmap`` with each label replaced by its segment number, as uint8."""
    if labelmap.dtype == np.uint8 and all(label == n for label, n in numbers.items()):
        # The usual manifest (labels 1..N, all found): already segment numbers, and a lookup
        # would copy every voxel. highdicom reads the array without writing to it.
        return labelmap
    lut = np.zeros(max(numbers) + 1, dtype=np.uint8)
    for label, number in numbers.items():
        lut[label] = number
    relabelled: NDArray[np.uint8] = lut[labelmap]
    return relabelled


def build_seg(
    source_images: Sequence[Dataset],
    prediction: Prediction,
    manifest: ModelManifest,
    job_id: str | int,
    series_number: int = 9001,
    *,
    device_serial_number: str = DEFAULT_DEVICE_SERIAL_NUMBER,
    numbers: dict[int, int] | None = None,
) -> hd.seg.Segmentation:
    """Encode ``prediction.labelmap`` as a BINARY SEG in the study of ``source_images``.

    ``source_images`` must be in volume order: slice ``k`` of the label map was computed from
    ``source_images[k]``. That is how highdicom pairs mask frames with source frames when no
    plane positions are given, so a wrong order would put every mask on the wrong image.
    The SOP Instance and Series Instance UIDs derive from ``job_id`` (:mod:`.uids`).

    ``numbers`` is :func:`segment_numbers` of the prediction when the caller has it already
    (it scans the whole label map).

    Raises ``ValueError`` if the label map is empty (a SEG needs at least one segment; report
    a negative result in the SR alone) or does not match the source images or the manifest.
    """
    _check_sources(source_images, prediction)
    if numbers is None:
        numbers = segment_numbers(prediction, manifest)
    if not numbers:
        raise ValueError(f"label map of job {job_id} is empty: there is no segment to encode")
    specs: dict[int, LabelSpec] = {spec.number: spec for spec in manifest.labels}
    algorithm = algorithm_identification(manifest)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=specs[label].name[:64],
            segmented_property_category=coded(specs[label].category),
            segmented_property_type=coded(specs[label].type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for label, number in numbers.items()
    ]
    # A label map of segment numbers: highdicom reads a 3D integer array as "one segment per
    # value", which avoids a (slices, rows, columns, segments) copy.
    relabelled = _relabel(prediction.labelmap, numbers)

    seg = hd.seg.Segmentation(
        source_images=source_images,
        pixel_array=relabelled,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=uids.result_uid(job_id, uids.SEG_SERIES),
        series_number=series_number,
        sop_instance_uid=uids.result_uid(job_id, uids.SEG_INSTANCE),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=manifest.name[:64],
        # A list, not the tuple highdicom's hint names: pydicom refuses a tuple for an LO.
        software_versions=software_versions(manifest),  # type: ignore[arg-type]
        device_serial_number=device_serial_number,
        content_label=content_label(manifest),
        content_description=manifest.description.replace("\\", "/")[:64] or None,
        series_description=series_description(manifest, "SEG"),
        content_qualification="RESEARCH" if manifest.research_only else "PRODUCT",
        omit_empty_frames=True,
    )
    logger.info(
        "built SEG %s for job %s: %d segments, %d frames",
        seg.SOPInstanceUID,
        job_id,
        len(descriptions),
        seg.NumberOfFrames,
    )
    return seg

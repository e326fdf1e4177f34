"""A model's findings as a Comprehensive 3D SR (PS3.3 A.35.13) holding a TID 1500 report.

Content tree, per PS3.16:

- TID 1001 Observation Context with a TID 1004 device observer: the model, not a person,
  made these observations, and a viewer must be able to say so;
- Procedure Reported from CID 100, chosen from the source modality;
- TID 1600 Image Library listing the images the SCOORDs point at;
- per :class:`~pacs_ai.models.base.Finding`, sharing one TID 4108 Tracking Identifier:

  * a TID 1411 Volumetric ROI group referencing the finding's SEG segment and the source
    series, with the measurements (TID 300): volume, longest diameter, certainty;
  * a TID 1410 Planar ROI group with a POINT image region on the finding's centre slice.
    OHIF draws only groups that carry coordinates (DESIGN.md), so this key-slice group is
    what makes the finding visible there;
  * a finding whose label has no segment gets a TID 1501 group for its measurements instead;

- a TID 1501 group with the study-level presence (Present / Absent) of detection models.

Every group names the model in a TID 4019 Algorithm Identification.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Final

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from pacs_ai.models.base import Code, Finding, LabelSpec, ModelManifest, Prediction
from pacs_ai.results import uids
from pacs_ai.results.seg import (
    DEFAULT_DEVICE_SERIAL_NUMBER,
    coded,
    segment_numbers,
    series_description,
    software_versions,
)
from pacs_ai.results.uids import MANUFACTURER

logger = logging.getLogger(__name__)

# TID 300 concept names: Volume from CID 7472 Volume Measurements, Long Axis (the longest
# diameter) from CID 7470 Linear Measurements. Certainty of Finding is the DCM concept the
# CAD templates use (CID 6048) for how sure an algorithm is; we report it in percent, 0-100.
VOLUME: Final = Code("118565006", "SCT", "Volume")
LONG_AXIS: Final = Code("103339001", "SCT", "Long axis")
CERTAINTY_OF_FINDING: Final = Code("111012", "DCM", "Certainty of Finding")
MILLILITER: Final = Code("ml", "UCUM", "milliliter")
MILLIMETER: Final = Code("mm", "UCUM", "millimeter")
PERCENT: Final = Code("%", "UCUM", "percent")

# Study-level presence: DCM "Presence of property" answered with DCM Present / Absent (the
# DCM concepts made for each other). Not "Finding" (121071): highdicom already names the
# group's finding type with that concept, and a reader would take "Present" for the type.
PRESENCE: Final = Code("121052", "DCM", "Presence of property")
PRESENT: Final = Code("121053", "DCM", "Present")
ABSENT: Final = Code("121054", "DCM", "Absent")

# CID 100 Quantitative Diagnostic Imaging Procedures, by source Modality. Models run on any
# body region, so the "unspecified body region" LOINC codes are the honest choice.
PROCEDURES: Final = {
    "CT": Code("25045-6", "LN", "CT unspecified body region"),
    "MR": Code("25056-3", "LN", "MRI unspecified body region"),
    "PT": Code("44136-0", "LN", "PET unspecified body region"),
    "NM": Code("49118-3", "LN", "NM unspecified body region"),
}
IMAGING_PROCEDURE: Final = Code("363679005", "SCT", "Imaging procedure")

MeasurementGroup = (
    hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    | hd.sr.MeasurementsAndQualitativeEvaluations
)


def tracking_uid(job_id: str | int, finding_index: int) -> str:
    """Tracking Unique Identifier of finding ``finding_index`` (0-based) of job ``job_id``."""
    return uids.result_uid(job_id, f"finding-{finding_index + 1}")


def _measurements(finding: Finding) -> list[hd.sr.Measurement]:
    values = [
        (VOLUME, finding.volume_ml, MILLILITER),
        (LONG_AXIS, finding.longest_diameter_mm, MILLIMETER),
        (
            CERTAINTY_OF_FINDING,
            None if finding.certainty is None else finding.certainty * 100,
            PERCENT,
        ),
    ]
    return [
        hd.sr.Measurement(name=coded(name), value=float(value), unit=coded(unit))
        for name, value, unit in values
        if value is not None
    ]


def _bounds(source_images: Sequence[Dataset]) -> list[Dataset]:
    """The image library of a report without key slices (a negative one, say): the first and
    last slice of the volume the model read.

    TID 1600 must list at least one image, and lists the images the report refers to. Such
    a report points at no image, so listing every slice (as its evidence does) would say
    nothing more, and highdicom builds 14 content items per entry: 300 slices took 5.3 s
    to build and 1.3 s to write, for the most common result of a screening model. The two
    ends of the stack still describe what was read: its geometry and its extent.
    """
    return list({ds.SOPInstanceUID: ds for ds in (source_images[0], source_images[-1])}.values())


def _key_slice(source_images: Sequence[Dataset], center: tuple[int, int, int]) -> Dataset:
    k = center[0]
    if not 0 <= k < len(source_images):
        raise ValueError(f"finding centre slice {k} is outside the {len(source_images)} slices")
    return source_images[k]


def _key_slice_region(image: Dataset, center: tuple[int, int, int]) -> hd.sr.ImageRegion:
    """A POINT at the centre of voxel (row, column) of ``image``.

    SCOORD pixel coordinates are (column, row) with (0, 0) at the outer corner of the first
    pixel (PS3.3 C.18.6.1.1), so the centre of pixel (r, c) is (c + 0.5, r + 0.5).
    """
    _, row, column = center
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POINT,
        graphic_data=np.array([[column + 0.5, row + 0.5]], dtype=np.float64),
        source_image=hd.sr.SourceImageForRegion.from_source_image(image),
    )


def _finding_groups(
    index: int,
    finding: Finding,
    spec: LabelSpec,
    segment: hd.sr.ReferencedSegment | None,
    source_images: Sequence[Dataset],
    algorithm: hd.sr.AlgorithmIdentification,
    job_id: str | int,
) -> list[MeasurementGroup]:
    """The groups of one finding: its measurements (by segment, else plain) and key slice."""
    common: dict[str, Any] = {
        "finding_type": coded(spec.type),
        "finding_category": coded(spec.category),
        "algorithm_id": algorithm,
    }

    def tracking() -> hd.sr.TrackingIdentifier:
        # One tracking identity per finding across its groups: that is how TID 1500 says
        # "these groups describe the same thing". A fresh object per group, as content items
        # must not be shared between parents.
        return hd.sr.TrackingIdentifier(
            uid=tracking_uid(job_id, index), identifier=f"{finding.name} {index + 1}"[:64]
        )

    measurements = _measurements(finding) or None
    groups: list[MeasurementGroup] = []
    if segment is not None:
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking(),
                referenced_segment=segment,
                measurements=measurements,
                **common,
            )
        )
    elif measurements or finding.center is None:
        # No segment to hang the measurements on (a detection model, or a label absent from
        # the label map): a TID 1501 group keeps them, and keeps the finding in the report.
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking(), measurements=measurements, **common
            )
        )
    if finding.center is not None:
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking(),
                referenced_region=_key_slice_region(
                    _key_slice(source_images, finding.center), finding.center
                ),
                **common,
            )
        )
    return groups


def _referenced_segment(
    seg: hd.seg.Segmentation, segment_number: int, source_series_uid: str
) -> hd.sr.ReferencedSegment:
    return hd.sr.ReferencedSegment(
        sop_class_uid=seg.SOPClassUID,
        sop_instance_uid=seg.SOPInstanceUID,
        segment_number=segment_number,
        # The series, not its hundreds of images: the SEG itself says which source image each
        # of its frames came from.
        source_series=hd.sr.SourceSeriesForSegmentation(source_series_uid),
    )


def _presence_group(
    present: bool,
    manifest: ModelManifest,
    algorithm: hd.sr.AlgorithmIdentification,
    job_id: str | int,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group with the study-level answer of a detection model."""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uids.result_uid(job_id, "presence"), identifier="Study-level result"
        ),
        algorithm_id=algorithm,
        # The property whose presence is reported: the model's first label.
        finding_type=coded(manifest.labels[0].type) if manifest.labels else None,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=coded(PRESENCE), value=coded(PRESENT if present else ABSENT)
            )
        ],
    )


def build_sr(
    source_images: Sequence[Dataset],
    seg: hd.seg.Segmentation | None,
    prediction: Prediction,
    manifest: ModelManifest,
    job_id: str | int,
    series_number: int = 9002,
    *,
    procedure_reported: Code | None = None,
    device_serial_number: str = DEFAULT_DEVICE_SERIAL_NUMBER,
    numbers: dict[int, int] | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Report ``prediction``'s findings as a TID 1500 Comprehensive 3D SR beside ``seg``.

    ``source_images`` are in volume order, as for :func:`~pacs_ai.results.seg.build_seg`;
    ``seg`` is what that function built from the same prediction, or ``None`` when the label
    map is empty (a negative result has no SEG but still gets its report).
    ``procedure_reported`` defaults to the CID 100 code of the source modality. The SOP
    Instance and Series Instance UIDs derive from ``job_id``. ``numbers``: as for
    :func:`~pacs_ai.results.seg.build_seg`.

    Raises ``ValueError`` when there is nothing to report (no finding and no presence) or the
    inputs do not belong together.
    """
    if not source_images:
        raise ValueError("at least one source image is required")
    study_uid = source_images[0].StudyInstanceUID
    if numbers is None:
        numbers = segment_numbers(prediction, manifest)
    n_segments = 0 if seg is None else len(seg.SegmentSequence)
    if len(numbers) != n_segments:
        raise ValueError(f"the SEG has {n_segments} segments, the prediction {len(numbers)}")
    if seg is not None and seg.StudyInstanceUID != study_uid:
        raise ValueError("the SEG belongs to another study than the source images")
    specs = {spec.number: spec for spec in manifest.labels}
    algorithm = hd.sr.AlgorithmIdentification(
        name=manifest.name[:64],
        version=manifest.version[:64],
        family=coded(manifest.algorithm_family),
        manufacturer=MANUFACTURER,
    )

    groups: list[MeasurementGroup] = []
    for index, finding in enumerate(prediction.findings):
        if finding.label not in specs:
            raise ValueError(f"finding {finding.name!r} has undeclared label {finding.label}")
        number = numbers.get(finding.label)
        segment = None
        if seg is not None and number is not None:
            segment = _referenced_segment(seg, number, source_images[0].SeriesInstanceUID)
        groups += _finding_groups(
            index, finding, specs[finding.label], segment, source_images, algorithm, job_id
        )
    if prediction.present is not None:
        groups.append(_presence_group(prediction.present, manifest, algorithm, job_id))
    if not groups:
        raise ValueError(f"job {job_id} has no finding and no presence result to report")
    centres = [f.center for f in prediction.findings if f.center is not None]
    key_images = {i.SOPInstanceUID: i for i in (_key_slice(source_images, c) for c in centres)}

    procedure = procedure_reported or PROCEDURES.get(source_images[0].Modality, IMAGING_PROCEDURE)
    observer = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=uids.device_uid(manifest.name),
            name=manifest.name[:64],
            manufacturer_name=MANUFACTURER,
            model_name=f"{manifest.name} {manifest.version}"[-64:],
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=coded(procedure),
        imaging_measurements=groups,
        title=codes.cid7021.ImagingMeasurementReport,
        referenced_images=list(key_images.values()) or _bounds(source_images),
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*source_images, *([] if seg is None else [seg])],
        content=report,
        series_instance_uid=uids.result_uid(job_id, uids.SR_SERIES),
        series_number=series_number,
        sop_instance_uid=uids.result_uid(job_id, uids.SR_INSTANCE),
        instance_number=1,
        manufacturer=MANUFACTURER,
        # Complete, but preliminary and unverified until a radiologist has reviewed it.
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=series_description(manifest, "SR"),
        manufacturer_model_name=manifest.name[:64],
        software_versions=software_versions(manifest),
        device_serial_number=device_serial_number,
        content_qualification="RESEARCH" if manifest.research_only else "PRODUCT",
    )
    logger.info(
        "built SR %s for job %s: %d measurement groups", sr.SOPInstanceUID, job_id, len(groups)
    )
    return sr

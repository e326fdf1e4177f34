"""The encode stage's SEG: built from a real phantom series, written, read back, validated.

The helpers here (phantom sources, a threshold "model", dciodvfy) are shared with
``test_results_sr.py``.
"""

from __future__ import annotations

import dataclasses
import subprocess
from collections.abc import Sequence
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from pacs_ai.models.base import (
    ANATOMICAL_STRUCTURE,
    ARTIFICIAL_INTELLIGENCE,
    TISSUE,
    Code,
    Finding,
    LabelSpec,
    ModelManifest,
    Prediction,
)
from pacs_ai.phantoms.chest_ct import Geometry, write_chest_ct
from pacs_ai.results import uids
from pacs_ai.results.seg import (
    FEW_LABELS,
    build_seg,
    labels_present,
    segment_numbers,
    series_description,
)

DCIODVFY = Path("/usr/bin/dciodvfy")
LUNG = Code("39607008", "SCT", "Lung")
BONE = Code("272673000", "SCT", "Bone structure")
MANIFEST = ModelManifest(
    name="Chest HU thresholds",
    version="0.3.1",
    task="segmentation",
    description="Lungs and bone by Hounsfield thresholds",
    labels=(
        LabelSpec(1, "Lung", ANATOMICAL_STRUCTURE, LUNG),
        LabelSpec(2, "Bone", TISSUE, BONE),
    ),
)
# 128×128 pixels of 2.8 mm cover the phantom's 320 mm body; 20 slices of 10 mm, its lungs.
GEOMETRY = Geometry(rows=128, columns=128, pixel_spacing_mm=2.8, slices=20, slice_thickness_mm=10)


def chest_sources(out_dir: Path) -> list[Dataset]:
    """The phantom's axial series, sorted along z (foot to head) as the volume stage would."""
    write_chest_ct(out_dir, GEOMETRY, seed=3, with_lung_series=False, with_scout=False)
    images: list[Dataset] = [pydicom.dcmread(p) for p in sorted((out_dir / "002").glob("*.dcm"))]
    images.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    # The phantom is symmetric along z; a series that stops short of the lung apices is not,
    # so a mask put on the mirrored slice cannot pass for the right one.
    return images[:14]


def threshold_prediction(sources: Sequence[Dataset]) -> Prediction:
    """A classical "model": lungs are air inside the body, bone is above 300 HU."""
    hu = np.stack([ds.pixel_array for ds in sources]).astype(np.float32)
    tissue = hu > -500
    # Inside the body = between the first and last tissue pixel of each image row.
    inside = (
        np.maximum.accumulate(tissue, axis=2)
        & np.maximum.accumulate(tissue[..., ::-1], 2)[..., ::-1]
    )
    labelmap = np.zeros(hu.shape, dtype=np.uint8)
    labelmap[(hu < -500) & inside] = 1
    labelmap[hu > 300] = 2
    spacing = [float(v) for v in sources[0].PixelSpacing]
    voxel_ml = spacing[0] * spacing[1] * float(sources[0].SliceThickness) / 1000
    findings = []
    for label, name, certainty in ((1, "Lungs", 0.97), (2, "Spine", 0.61)):
        where = np.argwhere(labelmap == label)
        # The labelled voxel nearest the centroid: the lungs' centroid lies between them.
        nearest = where[np.argmin(((where - where.mean(axis=0)) ** 2).sum(axis=1))]
        s, r, c = (int(v) for v in nearest)
        findings.append(
            Finding(
                label=label,
                name=name,
                volume_ml=round(len(where) * voxel_ml, 3),
                longest_diameter_mm=123.4 if label == 1 else None,
                certainty=certainty,
                center=(s, r, c),
            )
        )
    return Prediction(labelmap=labelmap, findings=findings, present=True)


def dciodvfy_errors(path: Path) -> tuple[list[str], str]:
    """dciodvfy's "Error" lines for ``path``, and its whole output for assertion messages."""
    run = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=60)
    output = run.stdout + run.stderr
    return [line for line in output.splitlines() if line.startswith("Error")], output


def roundtrip(ds: Dataset) -> Dataset:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(BytesIO(buffer.getvalue()))


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    return chest_sources(tmp_path_factory.mktemp("chest"))


@pytest.fixture(scope="module")
def prediction(sources: list[Dataset]) -> Prediction:
    return threshold_prediction(sources)


@pytest.fixture(scope="module")
def seg_file(
    sources: list[Dataset], prediction: Prediction, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    path = tmp_path_factory.mktemp("seg") / "seg.dcm"
    build_seg(sources, prediction, MANIFEST, job_id=17).save_as(path, enforce_file_format=True)
    return path


def test_the_phantom_prediction_holds_both_labels(prediction: Prediction) -> None:
    # Guards the fixture: a threshold that found nothing would make the tests below vacuous.
    counts = np.bincount(prediction.labelmap.ravel(), minlength=3)
    assert counts[1] > 10_000 and counts[2] > 1_000
    # The lungs end inside the series: some slices hold no lung, so there are empty frames.
    assert (prediction.labelmap == 1).any(axis=(1, 2)).sum() < len(prediction.labelmap)
    assert not np.array_equal(prediction.labelmap, prediction.labelmap[::-1])


def test_seg_is_binary_in_the_source_study(seg_file: Path, sources: list[Dataset]) -> None:
    seg = pydicom.dcmread(seg_file)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation, not LABELMAP
    assert seg.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert seg.SegmentationType == "BINARY"
    assert seg.BitsAllocated == 1
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.PatientID == sources[0].PatientID
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.SeriesDescription == "Chest HU thresholds SEG RESEARCH USE ONLY"
    assert seg.SeriesNumber == 9001
    assert seg.InstanceNumber == 1
    assert seg.Manufacturer == "pacs-ai"
    assert seg.ManufacturerModelName == "Chest HU thresholds"
    assert "Chest HU thresholds 0.3.1" in seg.SoftwareVersions
    assert seg.ContentLabel == "CHEST_HU_THRESHO"
    assert seg.ContentQualification == "RESEARCH"


def test_segments_carry_labels_codes_and_the_algorithm(seg_file: Path) -> None:
    seg = hd.seg.segread(seg_file)
    assert seg.segment_numbers == [1, 2]
    expected = {1: ("Lung", ANATOMICAL_STRUCTURE, LUNG), 2: ("Bone", TISSUE, BONE)}
    for number, (label, category, kind) in expected.items():
        item = seg.get_segment_description(number)
        assert item.segment_label == label
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == category.value
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodingSchemeDesignator == "SCT"
        assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == kind.value
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "Chest HU thresholds"
        assert algorithm.AlgorithmVersion == "0.3.1"
        family = algorithm.AlgorithmFamilyCodeSequence[0]
        assert (family.CodeValue, family.CodingSchemeDesignator) == ("123110", "DCM")
        assert family.CodeMeaning == ARTIFICIAL_INTELLIGENCE.meaning


def test_masks_sit_on_the_frames_they_came_from(
    seg_file: Path, sources: list[Dataset], prediction: Prediction
) -> None:
    seg = hd.seg.segread(seg_file)
    source_uids = [ds.SOPInstanceUID for ds in sources]
    for number, label in ((1, 1), (2, 2)):
        masks: NDArray[np.uint8] = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=source_uids, segment_numbers=[number]
        )
        expected = prediction.labelmap == label
        assert masks.shape == (*expected.shape, 1)
        np.testing.assert_array_equal(masks[..., 0].astype(bool), expected)
    # Per frame, on the raw file: each stored frame's derivation names the source instance
    # whose slice of the label map it holds.
    raw = pydicom.dcmread(seg_file)
    by_uid = {uid: k for k, uid in enumerate(source_uids)}
    pixels = raw.pixel_array.reshape(-1, raw.Rows, raw.Columns)
    for frame, item in zip(pixels, raw.PerFrameFunctionalGroupsSequence, strict=True):
        number = item.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        k = by_uid[source.ReferencedSOPInstanceUID]
        np.testing.assert_array_equal(frame.astype(bool), prediction.labelmap[k] == number)


def test_empty_frames_are_not_stored(seg_file: Path, prediction: Prediction) -> None:
    seg = pydicom.dcmread(seg_file)
    occupied = sum(int((prediction.labelmap == label).any(axis=(1, 2)).sum()) for label in (1, 2))
    assert seg.NumberOfFrames == occupied < 2 * len(prediction.labelmap)


def test_uids_are_deterministic_per_job(sources: list[Dataset], prediction: Prediction) -> None:
    first = build_seg(sources, prediction, MANIFEST, job_id=17)
    again = build_seg(sources, prediction, MANIFEST, job_id="17")
    other = build_seg(sources, prediction, MANIFEST, job_id=18)
    assert first.SOPInstanceUID == again.SOPInstanceUID == uids.result_uid(17, uids.SEG_INSTANCE)
    assert first.SeriesInstanceUID == again.SeriesInstanceUID
    assert other.SOPInstanceUID != first.SOPInstanceUID
    assert other.SeriesInstanceUID != first.SeriesInstanceUID
    assert first.SOPInstanceUID.startswith("2.25.") and len(first.SOPInstanceUID) <= 64
    assert roundtrip(first).SOPInstanceUID == first.SOPInstanceUID


def test_result_uids_differ_by_kind_and_reject_ambiguous_kinds() -> None:
    kinds = [uids.SEG_INSTANCE, uids.SEG_SERIES, uids.SR_INSTANCE, uids.SR_SERIES]
    assert len({uids.result_uid(5, kind) for kind in kinds}) == 4
    assert uids.device_uid("a") != uids.result_uid("device", "a")
    with pytest.raises(ValueError, match="kind"):
        uids.result_uid("a", "b:c")


def test_series_description_keeps_the_warning_within_64_characters() -> None:
    long = dataclasses.replace(MANIFEST, name="A" * 80)
    description = series_description(long, "SEG")
    assert len(description) == 64 and description.endswith(" SEG RESEARCH USE ONLY")
    product = dataclasses.replace(MANIFEST, research_only=False)
    assert series_description(product, "SR") == "Chest HU thresholds SR"


def test_seg_passes_dciodvfy(seg_file: Path) -> None:
    errors, output = dciodvfy_errors(seg_file)
    assert not errors, output


def test_absent_labels_are_left_out_and_numbers_stay_contiguous(
    sources: list[Dataset], prediction: Prediction
) -> None:
    # Only bone found: BINARY segments must be numbered from 1, so bone becomes segment 1.
    bone_only = Prediction(np.where(prediction.labelmap == 2, 2, 0).astype(np.uint8))
    assert segment_numbers(bone_only, MANIFEST) == {2: 1}
    seg = roundtrip(build_seg(sources, bone_only, MANIFEST, job_id=3))
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Bone"]


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.int64, np.bool_])
@pytest.mark.parametrize("highest", [1, 3, FEW_LABELS, FEW_LABELS + 1, 200])
def test_labels_present_are_the_non_zero_values(dtype: type, highest: int) -> None:
    rng = np.random.default_rng(highest)
    labelmap = rng.choice([0, 1, highest // 2, highest], size=(4, 8, 8)).astype(dtype)
    if np.issubdtype(dtype, np.signedinteger):
        labelmap[0, 0, 0] = -1
    expected = [int(v) for v in np.unique(labelmap) if v != 0]
    assert labels_present(labelmap) == expected
    assert labels_present(np.zeros((0, 4, 4), dtype=dtype)) == []


def test_bad_inputs_are_refused(sources: list[Dataset], prediction: Prediction) -> None:
    with pytest.raises(ValueError, match="empty"):
        build_seg(sources, Prediction(np.zeros_like(prediction.labelmap)), MANIFEST, 1)
    with pytest.raises(ValueError, match="undeclared"):
        build_seg(sources, Prediction(prediction.labelmap * 3), MANIFEST, 1)
    with pytest.raises(ValueError, match="source images"):
        build_seg(sources[1:], prediction, MANIFEST, 1)

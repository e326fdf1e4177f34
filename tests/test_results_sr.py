"""The encode stage's TID 1500 SR: built beside a real SEG, written, read back, validated."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from pacs_ai.models.base import Finding, Prediction
from pacs_ai.results import uids
from pacs_ai.results.seg import build_seg, coded
from pacs_ai.results.sr import (
    ABSENT,
    CERTAINTY_OF_FINDING,
    LONG_AXIS,
    PRESENCE,
    PRESENT,
    VOLUME,
    build_sr,
    tracking_uid,
)
from tests.test_results_seg import (
    MANIFEST,
    chest_sources,
    dciodvfy_errors,
    roundtrip,
    threshold_prediction,
)

JOB = "job-0042"


def items(ds: Dataset) -> Iterator[Dataset]:
    """Every content item of an SR tree, depth first."""
    for item in ds.get("ContentSequence", []):
        yield item
        yield from items(item)


def texts(ds: Dataset, concept: str) -> list[str]:
    return [
        i.TextValue
        for i in items(ds)
        if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == concept
    ]


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    return chest_sources(tmp_path_factory.mktemp("chest"))


@pytest.fixture(scope="module")
def prediction(sources: list[Dataset]) -> Prediction:
    return threshold_prediction(sources)


@pytest.fixture(scope="module")
def seg(sources: list[Dataset], prediction: Prediction) -> hd.seg.Segmentation:
    return build_seg(sources, prediction, MANIFEST, JOB)


@pytest.fixture(scope="module")
def sr_file(
    sources: list[Dataset],
    seg: hd.seg.Segmentation,
    prediction: Prediction,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    path = tmp_path_factory.mktemp("sr") / "sr.dcm"
    build_sr(sources, seg, prediction, MANIFEST, JOB).save_as(path, enforce_file_format=True)
    return path


def read_report(path: Path) -> hd.sr.MeasurementReport:
    sr = hd.sr.srread(path)
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    content = sr.content
    assert isinstance(content, hd.sr.MeasurementReport)
    return content


@pytest.fixture(scope="module")
def report(sr_file: Path) -> hd.sr.MeasurementReport:
    return read_report(sr_file)


def test_sr_header_is_in_the_source_study(sr_file: Path, sources: list[Dataset]) -> None:
    sr = pydicom.dcmread(sr_file)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.StudyInstanceUID == sources[0].StudyInstanceUID
    assert sr.PatientID == sources[0].PatientID
    assert sr.SeriesDescription == "Chest HU thresholds SR RESEARCH USE ONLY"
    assert (sr.SeriesNumber, sr.InstanceNumber) == (9002, 1)
    assert sr.SOPInstanceUID == uids.result_uid(JOB, uids.SR_INSTANCE)
    assert sr.SeriesInstanceUID == uids.result_uid(JOB, uids.SR_SERIES)
    assert (sr.CompletionFlag, sr.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    assert (sr.Manufacturer, sr.ContentQualification) == ("pacs-ai", "RESEARCH")
    assert "Chest HU thresholds 0.3.1" in sr.SoftwareVersions
    template = sr.ContentTemplateSequence[0]
    assert (template.MappingResource, template.TemplateIdentifier) == ("DCMR", "1500")


def test_device_observer_and_algorithm_are_named(
    sr_file: Path, report: hd.sr.MeasurementReport
) -> None:
    (observer,) = report.get_observer_contexts()
    assert observer.observer_type == codes.cid270.Device
    attributes = observer.observer_identifying_attributes
    assert isinstance(attributes, hd.sr.DeviceObserverIdentifyingAttributes)
    assert attributes.uid == uids.device_uid(MANIFEST.name)
    assert attributes.name == MANIFEST.name
    assert attributes.manufacturer_name == "pacs-ai"
    sr = pydicom.dcmread(sr_file)
    groups = sum(1 for i in items(sr) if i.ConceptNameCodeSequence[0].CodeValue == "125007")
    # Every measurement group names the algorithm (TID 4019), with its version.
    assert texts(sr, "111001") == [MANIFEST.name] * groups
    assert texts(sr, "111003") == [MANIFEST.version] * groups


def test_measurements_read_back_as_written(
    report: hd.sr.MeasurementReport, prediction: Prediction, seg: hd.seg.Segmentation
) -> None:
    volumetric = report.get_volumetric_roi_measurement_groups()
    assert len(volumetric) == len(prediction.findings) == 2
    for index, (group, finding) in enumerate(zip(volumetric, prediction.findings, strict=True)):
        assert group.tracking_uid == tracking_uid(JOB, index)
        spec = MANIFEST.labels[finding.label - 1]
        assert group.finding_type == coded(spec.type)
        assert group.finding_category == coded(spec.category)
        (volume,) = group.get_measurements(name=coded(VOLUME))
        assert volume.value == pytest.approx(finding.volume_ml)
        assert volume.unit.value == "ml"
        (certainty,) = group.get_measurements(name=coded(CERTAINTY_OF_FINDING))
        assert certainty.value == pytest.approx(100 * (finding.certainty or 0))
        assert certainty.unit.value == "%"
        diameters = group.get_measurements(name=coded(LONG_AXIS))
        if finding.longest_diameter_mm is None:
            assert diameters == []
        else:
            assert [d.value for d in diameters] == [pytest.approx(finding.longest_diameter_mm)]
            assert diameters[0].unit.value == "mm"


def test_volumetric_groups_reference_their_segment_and_the_source_series(
    sr_file: Path, seg: hd.seg.Segmentation, sources: list[Dataset], prediction: Prediction
) -> None:
    report = read_report(sr_file)
    for finding, group in zip(
        prediction.findings, report.get_volumetric_roi_measurement_groups(), strict=True
    ):
        reference = group.referenced_segment
        assert reference is not None
        segment_item = reference[0].ReferencedSOPSequence[0]
        assert segment_item.ReferencedSOPInstanceUID == seg.SOPInstanceUID
        assert segment_item.ReferencedSOPClassUID == seg.SOPClassUID
        number = segment_item.ReferencedSegmentNumber
        assert seg.get_segment_description(number).segment_label == (
            MANIFEST.labels[finding.label - 1].name
        )
        assert reference[1].value == sources[0].SeriesInstanceUID
    # The SEG is in the evidence, so a PACS can fetch what the SR points at.
    evidence = pydicom.dcmread(sr_file).CurrentRequestedProcedureEvidenceSequence[0]
    series = {s.SeriesInstanceUID: s for s in evidence.ReferencedSeriesSequence}
    assert seg.SeriesInstanceUID in series
    assert sources[0].SeriesInstanceUID in series


def test_key_slice_points_at_the_centre_slice(
    report: hd.sr.MeasurementReport, sources: list[Dataset], prediction: Prediction
) -> None:
    planar = report.get_planar_roi_measurement_groups(graphic_type=hd.sr.GraphicTypeValues.POINT)
    assert len(planar) == len(prediction.findings)
    for index, (group, finding) in enumerate(zip(planar, prediction.findings, strict=True)):
        assert finding.center is not None
        k, row, column = finding.center
        assert group.tracking_uid == tracking_uid(JOB, index)
        region = group.roi
        assert isinstance(region, hd.sr.ImageRegion)
        source = region.ContentSequence[0].ReferencedSOPSequence[0]
        assert source.ReferencedSOPInstanceUID == sources[k].SOPInstanceUID
        np.testing.assert_allclose(region.value, [[column + 0.5, row + 0.5]])
        # The point lies on the finding's label in that very slice.
        assert prediction.labelmap[k, row, column] == finding.label


def test_presence_is_reported(report: hd.sr.MeasurementReport) -> None:
    (group,) = report.get_image_measurement_groups()
    (evaluation,) = group.get_qualitative_evaluations(name=coded(PRESENCE))
    assert evaluation.value == coded(PRESENT)


def test_sr_uids_are_deterministic_per_job(
    sources: list[Dataset], seg: hd.seg.Segmentation, prediction: Prediction
) -> None:
    first = build_sr(sources, seg, prediction, MANIFEST, JOB)
    again = roundtrip(build_sr(sources, seg, prediction, MANIFEST, JOB))
    assert again.SOPInstanceUID == first.SOPInstanceUID
    assert again.SeriesInstanceUID == first.SeriesInstanceUID
    other_seg = build_seg(sources, prediction, MANIFEST, "job-0043")
    other = build_sr(sources, other_seg, prediction, MANIFEST, "job-0043")
    assert other.SOPInstanceUID != first.SOPInstanceUID
    assert len({first.SOPInstanceUID, other.SOPInstanceUID, seg.SOPInstanceUID}) == 3


def test_sr_passes_dciodvfy(sr_file: Path) -> None:
    errors, output = dciodvfy_errors(sr_file)
    assert not errors, output


def test_a_negative_result_is_reported_without_a_seg(
    sources: list[Dataset], tmp_path: Path
) -> None:
    empty = np.zeros((len(sources), sources[0].Rows, sources[0].Columns), dtype=np.uint8)
    negative = Prediction(empty, [Finding(1, "Nodule", certainty=0.05)], present=False)
    path = tmp_path / "negative.dcm"
    build_sr(sources, None, negative, MANIFEST, "job-7").save_as(path, enforce_file_format=True)
    report = read_report(path)
    assert report.get_volumetric_roi_measurement_groups() == []
    finding, presence = report.get_image_measurement_groups()
    (certainty,) = finding.get_measurements(name=coded(CERTAINTY_OF_FINDING))
    assert certainty.value == pytest.approx(5.0)
    (evaluation,) = presence.get_qualitative_evaluations(name=coded(PRESENCE))
    assert evaluation.value == coded(ABSENT)
    errors, output = dciodvfy_errors(path)
    assert not errors, output
    # No key slice to list: the image library holds the two ends of the volume, and the
    # evidence every slice the model read.
    assert library_images(pydicom.dcmread(path)) == [
        sources[0].SOPInstanceUID,
        sources[-1].SOPInstanceUID,
    ]
    evidence = pydicom.dcmread(path).CurrentRequestedProcedureEvidenceSequence
    referenced = [
        item.ReferencedSOPInstanceUID
        for study in evidence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    ]
    assert sorted(referenced) == sorted(ds.SOPInstanceUID for ds in sources)


def test_the_image_library_lists_the_key_slices(
    sr_file: Path, sources: list[Dataset], prediction: Prediction
) -> None:
    centres = [f.center for f in prediction.findings if f.center is not None]
    assert centres
    expected = {sources[k].SOPInstanceUID for k, _, _ in centres}
    listed = library_images(pydicom.dcmread(sr_file))
    assert sorted(listed) == sorted(expected)


def library_images(sr: Dataset) -> list[str]:
    """The SOP Instance UIDs of the IMAGE items of the report's Image Library (TID 1600)."""
    (library,) = [
        item
        for item in items(sr)
        if item.ValueType == "CONTAINER"
        and item.ConceptNameCodeSequence[0].CodeValue == "111028"  # Image Library
    ]
    return [
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for item in items(library)
        if item.ValueType == "IMAGE"
    ]


def test_inputs_that_do_not_belong_together_are_refused(
    sources: list[Dataset], seg: hd.seg.Segmentation, prediction: Prediction
) -> None:
    with pytest.raises(ValueError, match="segments"):
        build_sr(sources, None, prediction, MANIFEST, JOB)
    nothing = Prediction(np.zeros_like(prediction.labelmap))
    with pytest.raises(ValueError, match="no finding"):
        build_sr(sources, None, nothing, MANIFEST, JOB)
    outside = Prediction(prediction.labelmap, [Finding(1, "Lungs", center=(99, 0, 0))])
    with pytest.raises(ValueError, match="outside"):
        build_sr(sources, seg, outside, MANIFEST, JOB)

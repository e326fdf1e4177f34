"""The AI path end to end: a real PACS pushes a study, results come back into the same study.

Orthanc (a real PACS) sends a generated chest CT to the node; the node assembles it, the
default rule runs ct-organs-threshold on each axial series in a real Celery worker over the
node's embedded Redis, and the SEG and SR go back to Orthanc by C-STORE.
"""

from __future__ import annotations

import io
import subprocess
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread

from pacs_ai.phantoms.chest_ct import ChestTruth
from tests.peers import (
    NodeProcess,
    OrthancProcess,
    orthanc_as_peer,
    pacs_and_node,
    results_in,
    running_job_worker,
    wait_for,
)

pytestmark = pytest.mark.slow

# SEG label -> truth mask. The model's labels are exclusive, so its Body is body_rest.
LABELS = {"Body": "body_rest", "Lungs": "lungs", "Bone": "bone"}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(a, b).sum() / total)


def dciodvfy_errors(data: bytes, tmp_path: Path, name: str) -> list[str]:
    path = tmp_path / name
    path.write_bytes(data)
    result = subprocess.run(["/usr/bin/dciodvfy", str(path)], capture_output=True, text=True)
    return [
        line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")
    ]


def setup_pacs_and_node(
    node_factory: type[NodeProcess],
    orthanc_factory: type[OrthancProcess],
    tmp_path: Path,
    **node_kwargs: Any,
) -> tuple[OrthancProcess, NodeProcess]:
    orthanc = orthanc_factory(tmp_path / "orthanc")
    node = node_factory(
        tmp_path / "node", peers=[orthanc_as_peer(orthanc)], ai_worker=True, **node_kwargs
    )
    return pacs_and_node(orthanc, node)


def test_study_from_orthanc_comes_back_with_seg_and_sr(
    node_factory: type[NodeProcess],
    orthanc_factory: type[OrthancProcess],
    tmp_path: Path,
    chest_ct: ChestTruth,
) -> None:
    # A quiet period long enough that the assembler surely sees the study quiet before it
    # is complete, however loaded the machine: the worker reads both series meanwhile.
    orthanc, node = setup_pacs_and_node(node_factory, orthanc_factory, tmp_path, quiet_period_s=3.0)
    orthanc.upload(chest_ct.files)
    (study_id,) = orthanc.get("/studies")
    orthanc.post("/modalities/pacsai/store", {"Resources": [study_id], "Synchronous": True})

    axial = [chest_ct.series["AXIAL 1.25 SOFT TISSUE"], chest_ct.series["AXIAL 2.5 LUNG"]]

    def both_back() -> bool:
        found = results_in(orthanc, chest_ct.study_instance_uid)
        return len(found["SEG"]) == 2 and len(found["SR"]) == 2

    wait_for(both_back, 240, "a SEG and an SR per axial series in Orthanc", interval=2)
    jobs = node.cli_json("jobs", "list")
    assert sorted(j["state"] for j in jobs) == ["DELIVERED", "DELIVERED"]
    assert {j["model"] for j in jobs} == {"ct-organs-threshold"}
    # Each job took the series its worker read while the study was quiet
    # (pacs_ai.pipeline.prepare): the checks below are of results built from those volumes.
    for job in jobs:
        assert "prepared" in node.cli_json("jobs", "show", str(job["id"]))["timings"]
    found = results_in(orthanc, chest_ct.study_instance_uid)

    for raw in found["SEG"]:
        seg = hd.seg.segread(io.BytesIO(raw))
        assert seg.StudyInstanceUID == chest_ct.study_instance_uid
        assert "RESEARCH USE ONLY" in seg.SeriesDescription
        assert dciodvfy_errors(raw, tmp_path, "seg.dcm") == []
        source_series = seg.ReferencedSeriesSequence[0].SeriesInstanceUID
        assert source_series in axial
        truth = chest_ct.masks(source_series)
        # Source instances in slice order (the phantom's files are written feet to head).
        sources = sorted(
            (dcmread(f, stop_before_pixels=True) for f in chest_ct.files),
            key=lambda ds: float(ds.ImagePositionPatient[2]),
        )
        order = [ds.SOPInstanceUID for ds in sources if ds.SeriesInstanceUID == source_series]
        for description in seg.SegmentSequence:
            name = LABELS[description.SegmentLabel]
            mask = _mask_by_source(seg, description.SegmentNumber, order)
            score = dice(mask, truth[name])
            assert score >= 0.99, f"{name} Dice {score:.4f} on {source_series}"

    for raw in found["SR"]:
        sr = hd.sr.srread(io.BytesIO(raw))
        assert dciodvfy_errors(raw, tmp_path, "sr.dcm") == []
        assert "RESEARCH USE ONLY" in sr.SeriesDescription
        series_uid = _sr_source_series(sr)
        volumes = _sr_volumes(sr)
        geometry = chest_ct.geometries[series_uid]
        voxel_ml = geometry.pixel_spacing_mm**2 * geometry.slice_thickness_mm / 1000
        truth = chest_ct.masks(series_uid)
        assert set(volumes) == {"body_rest", "lungs", "bone"}
        for label, reported in volumes.items():
            truth_ml = float(truth[label].sum()) * voxel_ml
            assert abs(reported - truth_ml) / truth_ml <= 0.05, (label, reported, truth_ml)


def _mask_by_source(seg: Any, segment_number: int, order: list[str]) -> np.ndarray:
    """The segment as a (slice, row, column) array in the given source order."""
    mask = np.zeros((len(order), seg.Rows, seg.Columns), dtype=bool)
    index = {uid: k for k, uid in enumerate(order)}
    pixels = seg.pixel_array
    shared = seg.SharedFunctionalGroupsSequence[0]
    for frame, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        # With one segment, highdicom puts its identification in the shared groups.
        ident = item if "SegmentIdentificationSequence" in item else shared
        number = ident.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        if number != segment_number:
            continue
        source = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        frame_pixels = pixels[frame] if pixels.ndim == 3 else pixels
        mask[index[source]] = frame_pixels > 0
    return mask


def _sr_source_series(sr: Any) -> str:
    for item in sr.CurrentRequestedProcedureEvidenceSequence:
        for series in item.ReferencedSeriesSequence:
            for ref in series.ReferencedSOPSequence:
                if ref.ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.2":
                    return str(series.SeriesInstanceUID)
    raise AssertionError("the SR references no CT series")


def _sr_volumes(sr: Any) -> dict[str, float]:
    """Volume (SCT 118565006) per finding, keyed like the phantom's truth (body, lungs, bone)."""
    volumes: dict[str, float] = {}
    for group in sr.content.get_volumetric_roi_measurement_groups():
        # The tracking identifier reads "<finding name> <n>".
        name = str(group.tracking_identifier).split()[0]
        for measurement in group.get_measurements():
            if measurement.name.value == "118565006":
                volumes[LABELS[name]] = float(measurement.value)
    return volumes


def test_worker_killed_mid_job_is_retried_and_delivers_once(
    node_factory: type[NodeProcess],
    orthanc_factory: type[OrthancProcess],
    tmp_path: Path,
    chest_ct: ChestTruth,
) -> None:
    import os
    import signal

    orthanc, node = setup_pacs_and_node(
        node_factory,
        orthanc_factory,
        tmp_path,
        extra_worker={"lease_s": 3, "reconcile_interval_s": 0.5},
    )
    axial = [f for f in chest_ct.files if f.parent.name == "002"]
    orthanc.upload(axial)
    (study_id,) = orthanc.get("/studies")
    orthanc.post("/modalities/pacsai/store", {"Resources": [study_id], "Synchronous": True})

    running: tuple[int, int] | None = None

    def job_running() -> bool:
        nonlocal running
        running = running_job_worker(node)
        return running is not None

    wait_for(job_running, 120, "a RUNNING job", interval=0.05)
    assert running is not None
    job_id, pid = running
    os.kill(pid, signal.SIGKILL)  # the pool process doing the work, mid-job

    wait_for(
        lambda: node.cli_json("jobs", "show", str(job_id))["state"] == "DELIVERED",
        180,
        "the job to be retried and delivered",
        interval=1,
    )
    job = node.cli_json("jobs", "show", str(job_id))
    assert job["attempts"] == 2, job
    found = results_in(orthanc, chest_ct.study_instance_uid)
    # Exactly one SEG and one SR: the retry wrote the same SOP Instance UIDs.
    assert (len(found["SEG"]), len(found["SR"])) == (1, 1)


NODULE_RULES = """
[[rules]]
name = "organs"
models = ["ct-organs-threshold"]
match = { Modality = "CT", NumberOfSeriesRelatedInstances = { min = 20 } }

[[rules]]
name = "nodules"
priority = "STAT"
models = ["lung-nodule-demo"]
match.Modality = "CT"
match.BodyPartExamined = "CHEST"
match.NumberOfSeriesRelatedInstances = { min = 20 }
"""


def test_both_models_on_a_chest_with_nodules(
    node_factory: type[NodeProcess], orthanc_factory: type[OrthancProcess], tmp_path: Path
) -> None:
    from pacs_ai.phantoms.chest_ct import Geometry, Nodule, write_chest_ct

    truth = write_chest_ct(
        tmp_path / "study",
        Geometry(slices=96),
        seed=7,
        with_lung_series=False,
        with_scout=False,
        nodules=(Nodule((-72.0, -5.0, -140.0), 6.0), Nodule((70.0, 20.0, -130.0), 4.5)),
    )
    orthanc, node = setup_pacs_and_node(
        node_factory, orthanc_factory, tmp_path, extra_toml=NODULE_RULES
    )
    orthanc.upload(truth.files)
    (study_id,) = orthanc.get("/studies")
    orthanc.post("/modalities/pacsai/store", {"Resources": [study_id], "Synchronous": True})

    def all_back() -> bool:
        found = results_in(orthanc, truth.study_instance_uid)
        return len(found["SEG"]) == 2 and len(found["SR"]) == 2

    wait_for(all_back, 300, "a SEG and an SR from each model in Orthanc", interval=2)
    jobs = {j["model"]: j for j in node.cli_json("jobs", "list")}
    assert {m: j["state"] for m, j in jobs.items()} == {
        "ct-organs-threshold": "DELIVERED",
        "lung-nodule-demo": "DELIVERED",
    }
    assert jobs["lung-nodule-demo"]["priority"] == "STAT"
    assert jobs["lung-nodule-demo"]["findings"]["present"] is True

    series_uid = next(iter(truth.geometries))
    order = [
        ds.SOPInstanceUID
        for ds in sorted(
            (dcmread(f, stop_before_pixels=True) for f in truth.files),
            key=lambda ds: float(ds.ImagePositionPatient[2]),
        )
    ]
    found = results_in(orthanc, truth.study_instance_uid)
    nodule_seg = next(
        seg
        for seg in (hd.seg.segread(io.BytesIO(raw)) for raw in found["SEG"])
        if seg.SegmentSequence[0].SegmentLabel == "Nodule"
    )
    mask = _mask_by_source(nodule_seg, 1, order)
    score = dice(mask, truth.masks(series_uid)["nodules"])
    assert score >= 0.8, f"nodule Dice {score:.3f}"
    for raw in found["SR"]:
        assert dciodvfy_errors(raw, tmp_path, "sr.dcm") == []
    for raw in found["SEG"]:
        assert dciodvfy_errors(raw, tmp_path, "seg.dcm") == []
    reported = sorted(f["volume_ml"] for f in jobs["lung-nodule-demo"]["findings"]["findings"])
    expected = sorted(n.volume_ml for n in truth.nodules)
    assert len(reported) == 2
    for got, want in zip(reported, expected, strict=True):
        assert abs(got - want) / want <= 0.25, (got, want)

"""The radiologist's worklist in-process: priority and escalation, filters, paging, reviews,
export, the key-slice preview and the pages, over a real spool and database.

Studies are indexed through the node's own recorder (or, for the preview, stored through
its ingest path and run through the real worker code with ct-organs-threshold); jobs are
made by the dispatcher and finished with the job functions the worker uses.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import Engine

from pacs_ai.config import Settings
from pacs_ai.dicom.header import InstanceHeader
from pacs_ai.errors import InvalidArgument, NotFound
from pacs_ai.phantoms.chest_ct import Geometry, write_chest_ct
from pacs_ai.pipeline import jobs
from pacs_ai.pipeline.dispatch import Dispatcher
from pacs_ai.pipeline.infer import ModelCache, WorkerContext, run_job
from pacs_ai.pipeline.route import Escalation, Priority, RuleSettings
from pacs_ai.storage import index
from pacs_ai.storage.recorder import InstanceRecorder
from pacs_ai.web.context import WebContext
from pacs_ai.worklist import priority, reviews
from pacs_ai.worklist.findings import JobFindings, JobView, parse
from pacs_ai.worklist.queries import WorklistFilter, study_detail, worklist
from tests.web import bearer, web_client

RULES = """
[[rules]]
name = "nodules"
models = ["lung-nodule-demo"]
match = { Modality = "CT", SeriesDescription = { regex = "NODULE" } }
escalate = [{ finding = "nodule", min_certainty = 0.8, priority = "STAT" }]

[[rules]]
name = "urgent"
priority = "HIGH"
models = ["ct-organs-threshold"]
match = { Modality = "CT", StudyDescription = "URGENT CHEST" }

[[rules]]
name = "organs"
models = ["ct-organs-threshold"]
match = { Modality = "CT", SeriesDescription = "AXIAL 1.25 SOFT TISSUE" }
"""

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
BASE = InstanceHeader(
    sop_class_uid=CT,
    sop_instance_uid="",
    study_instance_uid="",
    series_instance_uid="",
    transfer_syntax_uid="1.2.840.10008.1.2.1",
    instance_number=1,
    patient_id="",
    patient_name="",
    patient_birth_date="19600101",
    patient_sex="O",
    accession_number="",
    study_date="20260115",
    study_time="093000",
    study_description="CT CHEST",
    referring_physician_name="",
    modality="CT",
    series_number=2,
    series_description="AXIAL",
    body_part_examined="CHEST",
    protocol_name="",
    manufacturer="ACME",
    slice_thickness=1.25,
    image_type="ORIGINAL\\PRIMARY\\AXIAL",
)


def nodule(diameter: float, certainty: float) -> dict[str, Any]:
    return {
        "name": "Nodule",
        "volume_ml": round(diameter**3 * 0.000524, 2),
        "longest_diameter_mm": diameter,
        "certainty": certainty,
    }


@dataclass
class Site:
    """A node's HTTP service and database, with helpers to make studies and finish jobs."""

    client: TestClient
    ctx: WebContext
    count: int = 0

    @property
    def engine(self) -> Engine:
        return self.ctx.engine

    @property
    def settings(self) -> Settings:
        return self.ctx.settings

    def study(
        self,
        received_at: float,
        *,
        series_description: str = "AXIAL",
        complete: bool = True,
        **fields: Any,
    ) -> int:
        """Index a one-series study (no files: the worklist reads the index only)."""
        self.count += 1
        n = self.count
        values = {
            "sop_instance_uid": f"1.2.826.0.1.3680043.10.1411.7.{n}.1.1",
            "study_instance_uid": f"1.2.826.0.1.3680043.10.1411.7.{n}",
            "series_instance_uid": f"1.2.826.0.1.3680043.10.1411.7.{n}.1",
            "patient_id": f"PID{n:03d}",
            "patient_name": f"DOE^PATIENT{n}",
            "accession_number": f"ACC{n:03d}",
            "series_description": series_description,
        }
        header = replace(BASE, **{**values, **fields})
        InstanceRecorder(self.engine).record(header, "TESTSCU", f"{n}.dcm", 1, received_at)
        (summary,) = index.find_studies(self.engine, header.study_instance_uid)
        if complete:
            self.complete(summary.id, received_at)
        return summary.id

    def complete(self, study_id: int, now: float) -> None:
        done = index.mark_complete(self.engine, study_id, now, now)
        assert done is not None
        Dispatcher(
            self.settings, self.engine, lambda *_: None, clock=lambda: now
        ).on_study_complete(done)

    def job_ids(self, study_id: int) -> list[int]:
        return [j["job_id"] for j in study_detail(self.engine, study_id)["jobs"]]

    def finish(
        self, job_id: int, findings: list[dict[str, Any]], present: bool | None = None
    ) -> None:
        """What a worker does when a model has run: ENCODED with findings, then refresh."""
        now = time.time()
        claimed = jobs.claim(self.engine, job_id, "test-worker", 60, now)
        assert claimed is not None
        jobs.encoded(
            self.engine,
            job_id,
            [],
            (),
            {},
            json.dumps({"present": present, "findings": findings}),
            claimed.study_id,
            1,
            now,
        )
        priority.refresh(self.engine, self.settings.rules, claimed.study_id)

    def get(self, path: str, role: str = "radiologist", **params: Any) -> Any:
        response = self.client.get(path, params=params, headers=bearer(self.ctx, role))
        assert response.status_code == 200, response.text
        return response.json()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    with web_client(tmp_path, RULES) as (client, ctx):
        yield Site(client, ctx)


@pytest.fixture
def queue(site: Site) -> dict[str, int]:
    """Five studies: escalated to STAT, HIGH by rule, ROUTINE twice (one finding below the
    escalation threshold), and an MR no rule takes."""
    ids = {
        "routine_early": site.study(100.0, series_description="NODULE AXIAL"),
        "stat": site.study(200.0, series_description="NODULE AXIAL", study_date="20260110"),
        "high": site.study(300.0, study_description="URGENT CHEST", study_date="20260120"),
        "below": site.study(400.0, series_description="NODULE AXIAL"),
        "mr": site.study(
            50.0, modality="MR", sop_class_uid=MR, study_date="20251231", study_description="MR"
        ),
    }
    (stat_job,) = site.job_ids(ids["stat"])
    site.finish(stat_job, [nodule(14.2, 0.93), nodule(6.0, 0.55)], present=True)
    (below_job,) = site.job_ids(ids["below"])
    site.finish(below_job, [nodule(9.0, 0.6)], present=True)
    return ids


def order(page: dict[str, Any]) -> list[int]:
    return [item["study_id"] for item in page["items"]]


# --- priority ---------------------------------------------------------------------------------


def test_stat_before_high_before_routine_then_oldest_first(site: Site, queue: dict[str, int]):
    page = site.get("/api/worklist")
    assert page["total"] == 5
    assert order(page) == [
        queue["stat"],
        queue["high"],
        queue["routine_early"],
        queue["below"],
        queue["mr"],
    ]
    by_id = {item["study_id"]: item for item in page["items"]}
    stat = by_id[queue["stat"]]
    assert (stat["priority"], stat["priority_rank"]) == ("STAT", 9)
    assert stat["findings_summary"] == "lung-nodule-demo: 2 nodules, largest 14 mm (0.93)"
    assert stat["ai"] == [
        {
            "job_id": stat["ai"][0]["job_id"],
            "model": "lung-nodule-demo",
            "state": "done",
            "reason": "no destination: results kept on the node",
        }
    ]
    assert stat["patient_name"] == "DOE^PATIENT2" and stat["modality"] == "CT"
    # Below the rule's min_certainty the finding shows, but the study stays ROUTINE.
    below = by_id[queue["below"]]
    assert (below["priority"], below["findings_summary"]) == (
        "ROUTINE",
        "lung-nodule-demo: 1 nodule, largest 9 mm (0.60)",
    )
    assert by_id[queue["high"]]["ai"][0]["state"] == "queued"
    mr = by_id[queue["mr"]]
    assert (mr["priority"], mr["priority_rank"], mr["ai"]) == ("", 0, [])


def view(priority_: Priority, findings: list[dict[str, Any]], rule: str = "r") -> JobView:
    return JobView(
        id=1,
        series_id=1,
        model="m",
        rule=rule,
        priority=priority_,
        state="DELIVERED",
        reason="",
        completion=1,
        started_at=0.0,
        findings=parse(json.dumps({"present": True, "findings": findings})),
    )


def test_escalation_needs_the_finding_and_its_certainty_and_never_lowers():
    rule = RuleSettings(
        name="r",
        models=("m",),
        escalate=(
            Escalation(finding="nodule", min_certainty=0.8, priority=Priority.STAT),
            Escalation(finding="effusion", priority=Priority.HIGH),
        ),
    )
    compute = priority.compute
    assert compute([view(Priority.ROUTINE, [nodule(5, 0.79)])], [rule]).priority == "ROUTINE"
    assert compute([view(Priority.ROUTINE, [nodule(5, 0.8)])], [rule]).priority == "STAT"
    # No threshold: any certainty, even none, escalates.
    effusion = {"name": "Pleural effusion", "volume_ml": 80.0}
    assert compute([view(Priority.ROUTINE, [effusion])], [rule]).priority == "HIGH"
    # An escalation to HIGH leaves a STAT rule STAT.
    assert compute([view(Priority.STAT, [effusion])], [rule]).priority == "STAT"
    # A job made by a rule that is gone keeps its priority, without escalation.
    assert compute([view(Priority.ROUTINE, [nodule(5, 0.99)], "gone")], [rule]).rank == 3
    assert compute([], [rule]).rank == 0


def test_summary_lists_structures_with_volumes():
    organs = JobFindings(
        None,
        parse(
            json.dumps(
                {
                    "present": None,
                    "findings": [
                        {"name": "Body", "volume_ml": 20011.4},
                        {"name": "Lungs", "volume_ml": 4200.2},
                    ],
                }
            )
        ).findings,
    )
    from pacs_ai.worklist.findings import summarize

    assert summarize("ct-organs-threshold", organs) == (
        "ct-organs-threshold: body 20011 mL, lungs 4200 mL"
    )
    assert (
        summarize("lung-nodule-demo", JobFindings(False, ())) == "lung-nodule-demo: nothing found"
    )


# --- filters and paging -----------------------------------------------------------------------


def test_every_filter(site: Site, queue: dict[str, int]):
    receiving = site.study(500.0, complete=False)

    def ids(**params: Any) -> set[int]:
        return set(order(site.get("/api/worklist", **params)))

    everything = set(queue.values()) | {receiving}
    assert ids() == everything
    assert ids(state="RECEIVING") == {receiving}
    assert ids(state="COMPLETE") == set(queue.values())
    assert ids(state="done") == {queue["stat"], queue["below"]}
    assert ids(state="queued") == {queue["routine_early"], queue["high"]}
    assert ids(priority="STAT") == {queue["stat"]}
    assert ids(priority="routine") == {queue["routine_early"], queue["below"]}
    assert ids(priority="NONE") == {queue["mr"], receiving}
    assert ids(modality="MR") == {queue["mr"]}
    assert ids(modality="ct") == everything - {queue["mr"]}
    assert ids(date_from="20260110", date_to="20260110") == {queue["stat"]}
    assert ids(date_from="20260111") == everything - {queue["stat"], queue["mr"]}
    assert ids(date_to="2025-12-31") == {queue["mr"]}  # the HTML date input's form too
    assert ids(model="lung-nodule-demo") == {
        queue["routine_early"],
        queue["stat"],
        queue["below"],
    }
    assert ids(model="ct-organs-threshold") == {queue["high"]}
    assert ids(review_state="UNREVIEWED") == everything
    assert ids(review_state="ACCEPTED") == set()
    assert ids(priority="ROUTINE", model="lung-nodule-demo", state="done") == {queue["below"]}


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"state": "FINISHED"}, "state must be one of"),
        ({"priority": "URGENT"}, "priority must be one of"),
        ({"date_from": "2026011"}, "date_from must be a date as YYYYMMDD"),
        ({"review_state": "MAYBE"}, "review_state must be one of"),
    ],
)
def test_bad_filters_say_what_is_allowed(site: Site, params: dict[str, str], message: str):
    response = site.client.get(
        "/api/worklist", params=params, headers=bearer(site.ctx, "radiologist")
    )
    assert response.status_code == 422
    assert message in response.json()["detail"]


def test_limit_and_offset_are_checked(site: Site):
    for params in ({"limit": 0}, {"limit": 501}, {"offset": -1}, {"limit": "ten"}):
        response = site.client.get(
            "/api/worklist", params=params, headers=bearer(site.ctx, "radiologist")
        )
        assert response.status_code == 422, params
    with pytest.raises(InvalidArgument, match="limit must be between"):
        worklist(site.engine, WorklistFilter(limit=0))


def test_paging_walks_the_same_order(site: Site, queue: dict[str, int]):
    full = order(site.get("/api/worklist"))
    pages = [site.get("/api/worklist", limit=2, offset=offset) for offset in (0, 2, 4)]
    assert [p["total"] for p in pages] == [5, 5, 5]
    assert [len(p["items"]) for p in pages] == [2, 2, 1]
    assert [i for p in pages for i in order(p)] == full
    assert site.get("/api/worklist", offset=10)["items"] == []


def test_worklist_needs_a_token_with_the_worklist_permission(site: Site):
    assert site.client.get("/api/worklist").status_code == 401
    response = site.client.get("/api/worklist", headers=bearer(site.ctx, "integration"))
    assert response.status_code == 403
    assert site.client.get("/api/worklist", headers=bearer(site.ctx, "admin")).status_code == 200


# --- reviews ----------------------------------------------------------------------------------


def post_review(site: Site, study_id: int, headers: dict[str, str], **body: Any) -> Any:
    return site.client.post(f"/api/studies/{study_id}/reviews", json=body, headers=headers)


def test_reviews_per_finding_and_study_change_the_state_and_keep_history(
    site: Site, queue: dict[str, int]
):
    study = queue["stat"]
    (job,) = site.job_ids(study)
    dr = bearer(site.ctx, "radiologist", name="dr-grey")

    def state() -> str:
        return str(site.get(f"/api/studies/{study}")["study"]["review_state"])

    response = post_review(site, study, dr, job_id=job, finding="Nodule 1", action="accept")
    assert response.status_code == 201, response.text
    review = response.json()
    assert (review["reviewer"], review["action"], review["finding"]) == (
        "dr-grey",
        "ACCEPT",
        "Nodule 1",
    )
    assert review["review_state"] == "PARTIAL" == state()

    post_review(site, study, dr, job_id=job, finding="Nodule 2", action="reject", comment="vessel")
    assert state() == "PARTIAL"  # one accepted, one rejected
    detail = site.get(f"/api/studies/{study}")
    findings = {f["key"]: f for f in detail["jobs"][0]["findings"]}
    assert findings["Nodule 2"]["rejected"] is True
    assert findings["Nodule 2"]["verdict"]["reviewer"] == "dr-grey"
    assert findings["Nodule 1"]["rejected"] is False

    # A comment is history only.
    post_review(site, study, dr, action="comment", comment="compare with prior CT")
    assert state() == "PARTIAL"

    # A change of mind is a new row; the latest verdict counts.
    post_review(site, study, dr, job_id=job, finding="Nodule 2", action="accept")
    assert state() == "ACCEPTED"
    assert site.get("/api/worklist", review_state="ACCEPTED")["items"][0]["study_id"] == study

    # A whole-study verdict covers every finding.
    post_review(site, study, dr, action="reject", comment="motion artefacts")
    assert state() == "REJECTED"
    detail = site.get(f"/api/studies/{study}")
    assert [(r["action"], r["finding"]) for r in detail["reviews"]] == [
        ("ACCEPT", "Nodule 1"),
        ("REJECT", "Nodule 2"),
        ("COMMENT", ""),
        ("ACCEPT", "Nodule 2"),
        ("REJECT", ""),
    ]
    assert all(f["rejected"] for f in detail["jobs"][0]["findings"])
    assert detail["reviews"][1]["comment"] == "vessel"


def test_a_job_that_found_nothing_is_reviewed_as_a_whole(site: Site):
    study = site.study(10.0, series_description="NODULE AXIAL")
    (job,) = site.job_ids(study)
    dr = bearer(site.ctx, "radiologist")
    # Before the model reports, only the study as a whole can be judged.
    assert post_review(site, study, dr, action="accept").json()["review_state"] == "ACCEPTED"
    site.finish(job, [], present=False)
    # The model ran after that verdict: its (negative) result has not been seen yet.
    detail = site.get(f"/api/studies/{study}")
    assert detail["study"]["review_state"] == "UNREVIEWED"
    assert detail["study"]["findings_summary"] == "lung-nodule-demo: nothing found"
    response = post_review(site, study, dr, job_id=job, action="accept")
    assert response.json()["review_state"] == "ACCEPTED"


def test_bad_reviews_are_refused_with_reasons(site: Site, queue: dict[str, int]):
    study = queue["stat"]
    (job,) = site.job_ids(study)
    (other_job,) = site.job_ids(queue["below"])
    dr = bearer(site.ctx, "radiologist")
    cases = [
        (404, 9999, {"action": "accept"}, "no study with id 9999"),
        (404, study, {"action": "accept", "job_id": other_job}, f"has no job {other_job}"),
        (422, study, {"action": "accept", "job_id": job, "finding": "Nodule 9"}, "its findings"),
        (422, study, {"action": "approve"}, "action"),
        (422, study, {"action": "comment"}, "needs a comment"),
        (422, study, {"action": "accept", "finding": "Nodule 1"}, "give job_id"),
        (422, study, {"action": "accept", "verdict": "yes"}, "verdict"),
        (422, study, {"action": "comment", "comment": "x" * 2001}, "comment"),
    ]
    for status, study_id, body, message in cases:
        response = post_review(site, study_id, dr, **body)
        assert response.status_code == status, (body, response.text)
        assert message in json.dumps(response.json()["detail"]), (body, response.text)
    assert post_review(site, study, {}, action="accept").status_code == 401
    integration = bearer(site.ctx, "integration")
    assert post_review(site, study, integration, action="accept").status_code == 403
    assert site.get(f"/api/studies/{study}")["reviews"] == []
    assert site.client.get("/api/studies/9999", headers=dr).status_code == 404


def test_export_csv_and_json_for_precision(site: Site, queue: dict[str, int]):
    study = queue["stat"]
    (job,) = site.job_ids(study)
    dr = bearer(site.ctx, "radiologist", name="dr-who")
    post_review(site, study, dr, job_id=job, finding="Nodule 1", action="accept")
    post_review(site, study, dr, job_id=job, finding="Nodule 2", action="accept")
    post_review(site, study, dr, job_id=job, finding="Nodule 2", action="reject", comment="=1+1")
    post_review(site, queue["high"], dr, action="comment", comment="no AI yet")

    response = site.client.get("/api/reviews/export", params={"format": "csv"}, headers=dr)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert [(r["finding"], r["action"]) for r in rows] == [
        ("Nodule 1", "ACCEPT"),
        ("Nodule 2", "ACCEPT"),
        ("Nodule 2", "REJECT"),
        ("", "COMMENT"),
    ]
    assert rows[0]["model"] == "lung-nodule-demo" and rows[0]["reviewer"] == "dr-who"
    assert (
        rows[0]["study_instance_uid"]
        == study_detail(site.engine, study)["study"]["study_instance_uid"]
    )
    assert rows[2]["comment"] == "'=1+1"  # a formula in a spreadsheet would run
    assert "DOE" not in response.text  # no patient names in the export

    data = site.get("/api/reviews/export", format="json")
    assert len(data["reviews"]) == 4
    # The latest verdict per finding: one accepted, one rejected.
    assert data["by_model"] == {
        "lung-nodule-demo": {"ACCEPT": 1, "REJECT": 1, "accepted_share": 0.5}
    }
    assert site.get("/api/reviews/export", format="json", since="2999-01-01")["reviews"] == []
    assert len(site.get("/api/reviews/export", format="json", since="0")["reviews"]) == 4
    bad = site.client.get("/api/reviews/export", params={"since": "yesterday"}, headers=dr)
    assert bad.status_code == 422
    bad = site.client.get("/api/reviews/export", params={"format": "xml"}, headers=dr)
    assert bad.status_code == 422
    integration = bearer(site.ctx, "integration")
    assert site.client.get("/api/reviews/export", headers=integration).status_code == 403


# --- a real study through the worker: preview and hooks ---------------------------------------


SMALL = Geometry(rows=96, columns=96, pixel_spacing_mm=4.0, slices=24, slice_thickness_mm=5.0)


def store_and_run(site: Site, tmp_path: Path) -> tuple[int, int]:
    """Store a small phantom CT through the ingest path, dispatch it, run its job for real."""
    truth = write_chest_ct(
        tmp_path / "phantom",
        SMALL,
        seed=3,
        with_lung_series=False,
        with_scout=False,
        patient_id="PH-1",
        accession="ACCPH1",
    )
    for path in truth.files:
        assert site.ctx.ingest.store(path.read_bytes(), "TESTSCU").status == 0
    (summary,) = index.find_studies(site.engine, truth.study_instance_uid)
    site.complete(summary.id, time.time())
    (job_id,) = site.job_ids(summary.id)
    worker = WorkerContext(
        site.settings, site.engine, ModelCache("cpu"), lambda _: None, lambda _: None
    )
    assert run_job(worker, job_id) == "ENCODED"
    return summary.id, job_id


def test_preview_draws_the_seg_over_its_key_slice(site: Site, tmp_path: Path):
    study, job = store_and_run(site, tmp_path)
    # The worker's hook refreshed the worklist with the model's findings.
    item = site.get("/api/worklist")["items"][0]
    assert item["study_id"] == study and item["priority"] == "ROUTINE"
    assert item["findings_summary"].startswith("ct-organs-threshold: body ")
    assert "lungs" in item["findings_summary"] and item["ai"][0]["state"] == "done"

    response = site.client.get(
        f"/api/studies/{study}/preview.png",
        params={"job": job},
        headers=bearer(site.ctx, "radiologist"),
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    image = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB")).astype(int)
    assert image.shape == (SMALL.rows, SMALL.columns, 3)

    key = response.headers["x-source-sop-instance-uid"]
    seg = pydicom.dcmread(site.settings.node.data_dir / "results" / str(job) / "SEG.dcm")
    masks = seg_masks_for(seg, key)
    assert masks, "the key slice should carry segments"
    # The key slice shows the lungs (the segment that varies along the body).
    labels = {int(s.SegmentNumber): s.SegmentLabel for s in seg.SegmentSequence}
    assert "Lungs" in {labels[n] for n in masks}
    covered = np.zeros(image.shape[:2], dtype=bool)
    for number, mask in masks.items():
        covered |= mask
        inside = image[mask]
        # Coloured where the SEG has pixels: not grey, and leaning to the segment's colour.
        assert (inside.max(axis=1) - inside.min(axis=1) > 20).mean() > 0.95, labels[number]
        from pacs_ai.worklist.preview import colour

        channel = int(np.argmax(colour(number)))
        assert inside[:, channel].mean() > inside.mean(), labels[number]
    outside = image[~covered]
    assert outside.size and (outside.max(axis=1) == outside.min(axis=1)).all()  # grey

    detail = site.get(f"/api/studies/{study}")
    assert detail["jobs"][0]["outputs"].keys() >= {"SEG", "SR"}
    assert any(s["result"] for s in detail["series"])
    # Our own SEG/SR series are not the study's modalities.
    assert site.get("/api/worklist")["items"][0]["modality"] == "CT"

    # Without its SEG here (a worker with its own disk), the preview is the plain image.
    seg_file = site.settings.node.data_dir / "results" / str(job) / "SEG.dcm"
    seg_file.rename(seg_file.with_suffix(".moved"))
    plain = site.client.get(
        f"/api/studies/{study}/preview.png",
        params={"job": job},
        headers=bearer(site.ctx, "radiologist"),
    )
    assert plain.status_code == 200
    grey = np.asarray(Image.open(io.BytesIO(plain.content)).convert("RGB")).astype(int)
    assert (grey.max(axis=2) == grey.min(axis=2)).all() and grey.max() > 0

    # A job's preview asked for under another study is not there.
    other = site.study(1.0)
    assert (
        site.client.get(
            f"/api/studies/{other}/preview.png",
            params={"job": job},
            headers=bearer(site.ctx, "radiologist"),
        ).status_code
        == 404
    )
    from pacs_ai.worklist.preview import render

    with pytest.raises(NotFound, match="has no job 999"):
        render(site.engine, site.settings.spool_dir, site.settings.node.data_dir, study, 999)
    # An indexed study whose files are not on this node's disk: 404 with the reason.
    missing = site.study(2.0, series_description="NODULE AXIAL")
    (missing_job,) = site.job_ids(missing)
    with pytest.raises(NotFound, match="cannot be read on this node"):
        render(
            site.engine, site.settings.spool_dir, site.settings.node.data_dir, missing, missing_job
        )


def seg_masks_for(seg: Any, source_uid: str) -> dict[int, np.ndarray]:
    """Segment number -> mask of the SEG frames that reference ``source_uid``."""
    pixels = seg.pixel_array
    pixels = pixels[None] if pixels.ndim == 2 else pixels
    found: dict[int, np.ndarray] = {}
    shared = seg.SharedFunctionalGroupsSequence[0]
    for frame, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        source = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        if source != source_uid:
            continue
        ident = item if "SegmentIdentificationSequence" in item else shared
        number = int(ident.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        found[number] = found.get(number, np.zeros(pixels.shape[1:], bool)) | (pixels[frame] > 0)
    return found


# --- pages ------------------------------------------------------------------------------------


def login(site: Site, role: str = "radiologist", name: str = "") -> Any:
    token = bearer(site.ctx, role, name=name)["Authorization"].split()[1]
    return site.client.post(
        "/login",
        content=f"token={token}&next=/",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        follow_redirects=False,
    )


def test_pages_redirect_to_login_then_show_the_worklist(site: Site, queue: dict[str, int]):
    site.client.cookies.clear()
    response = site.client.get("/studies/1?job=2", follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/login?next=%2Fstudies%2F1%3Fjob%3D2"
    assert "Token" in site.client.get("/login").text

    bad = site.client.post(
        "/login",
        content="token=pai_nonsense",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert bad.status_code == 401 and "not valid" in bad.text
    assert login(site, "integration").status_code == 403

    response = login(site, name="dr-page")
    assert response.status_code == 303 and response.headers["location"] == "/"
    cookie = response.headers["set-cookie"]
    assert "pacs_ai_token=" in cookie and "HttpOnly" in cookie
    assert "SameSite=strict" in cookie and "Secure" not in cookie

    page = site.client.get("/")
    assert page.status_code == 200
    assert page.headers["cache-control"] == "no-store"
    assert "script-src 'self'" in page.headers["content-security-policy"]
    html = page.text
    assert 'data-refresh-s="10.0"' in html and "dr-page" in html
    first_row = html[html.index("<tbody>") :]
    assert first_row.index(f'data-study-id="{queue["stat"]}"') < first_row.index(
        f'data-study-id="{queue["high"]}"'
    )
    assert 'class="study prio-stat"' in html
    assert "DOE, PATIENT2" in html

    study = site.client.get(f"/studies/{queue['stat']}")
    assert study.status_code == 200
    assert f'src="/api/studies/{queue["stat"]}/preview.png?job=' in study.text
    assert 'data-finding="Nodule 2"' in study.text and 'data-action="reject"' in study.text
    assert site.client.get("/studies/9999").status_code == 404

    js = site.client.get("/static/worklist.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert site.client.get("/static/../pages.py").status_code == 404

    site.client.post("/logout", follow_redirects=False)
    assert site.client.get("/", follow_redirects=False).status_code == 303


def test_pages_escape_what_senders_wrote(site: Site):
    site.study(1.0, patient_name="<script>alert(1)</script>^X", study_description="<b>CT</b>")
    login(site)
    html = site.client.get("/").text
    assert "<script>alert(1)" not in html and "<b>CT</b>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;, X" in html


def test_secure_cookie_when_configured(tmp_path: Path):
    with web_client(tmp_path, "[http]\nsecure_cookies = true\n") as (client, ctx):
        response = login(Site(client, ctx))
        assert "Secure" in response.headers["set-cookie"]


# --- both databases ---------------------------------------------------------------------------


def test_refresh_query_and_reviews_on_each_database(engine: Engine):
    """The worklist's SQL on SQLite and PostgreSQL: refresh, filters, paging, reviews."""
    rules = (
        RuleSettings(
            name="nodules",
            models=("lung-nodule-demo",),
            escalate=(Escalation(finding="nodule", min_certainty=0.8),),
        ),
    )
    recorder = InstanceRecorder(engine)
    study_ids = []
    for n in range(3):
        header = replace(
            BASE,
            sop_instance_uid=f"1.2.3.{n}.1.1",
            study_instance_uid=f"1.2.3.{n}",
            series_instance_uid=f"1.2.3.{n}.1",
            patient_name=f"DB^{n}",
        )
        recorder.record(header, "TESTSCU", f"{n}.dcm", 1, 10.0 + n)
        (summary,) = index.find_studies(engine, header.study_instance_uid)
        study_ids.append(summary.id)
    from pacs_ai.pipeline.facts import series_facts
    from pacs_ai.pipeline.route import evaluate

    job_of = {}
    for study_id in study_ids:
        facts = series_facts(engine, study_id)
        specs, _ = jobs.plan(evaluate(rules, facts), facts, rules, study_id, "TESTSCU", 1, [])
        ((job_id, _),), _ = jobs.create(engine, specs, [], 2, 2, 20.0)
        job_of[study_id] = job_id
        priority.refresh(engine, rules, study_id)
    last = study_ids[-1]
    assert jobs.claim(engine, job_of[last], "w", 60, 30.0) is not None
    findings = json.dumps({"present": True, "findings": [nodule(12.0, 0.91)]})
    jobs.encoded(engine, job_of[last], [], (), {}, findings, last, 1, 31.0)
    result = priority.refresh(engine, rules, last)
    assert result is not None and result.priority == "STAT"
    assert priority.refresh(engine, rules, 9999) is None

    page = worklist(engine, WorklistFilter(limit=2))
    assert page["total"] == 3 and order(page) == [last, study_ids[0]]
    assert order(worklist(engine, WorklistFilter(limit=2, offset=2))) == [study_ids[1]]
    assert order(worklist(engine, WorklistFilter(state="done", modality="CT"))) == [last]
    assert order(worklist(engine, WorklistFilter(model="lung-nodule-demo", priority="STAT"))) == [
        last
    ]
    assert worklist(engine, WorklistFilter(date_from="20260101", date_to="20261231"))["total"] == 3

    _, state = reviews.record(engine, last, "accept", "dr", 40.0, job_of[last], "Nodule 1")
    assert state == "ACCEPTED"
    assert order(worklist(engine, WorklistFilter(review_state="ACCEPTED"))) == [last]
    assert [r["finding"] for r in reviews.export(engine)] == ["Nodule 1"]

"""Deliveries to real peers: C-STORE to Orthanc, STOW-RS to Orthanc's DICOMweb, and a peer
that is down, which backs off, fails visibly, and never holds up the others."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from pydicom import dcmread

from pacs_ai.config import Settings, load_settings
from pacs_ai.dicom.header import read_header
from pacs_ai.pipeline import jobs
from pacs_ai.pipeline.deliver import run_delivery
from pacs_ai.pipeline.infer import ModelCache, WorkerContext
from pacs_ai.storage import index
from pacs_ai.storage.db import open_database
from pacs_ai.storage.recorder import InstanceRecorder
from tests.peers import OrthancProcess, free_port
from tests.realdata import real_file

pytestmark = pytest.mark.slow


def settings_for(tmp_path: Path, orthanc: OrthancProcess, database_url: str) -> Settings:
    config = tmp_path / "pacs-ai.toml"
    config.write_text(
        f"""
[node]
data_dir = "{tmp_path / "data"}"
[database]
url = "{database_url}"
[delivery]
max_attempts = 3
backoff_s = 1
timeout_s = 10
[[peers]]
name = "pacs"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = {orthanc.dicom_port}
[[peers]]
name = "web"
ae_title = "ORTHANCWEB"
host = "127.0.0.1"
protocol = "dicomweb"
dicomweb_url = "{orthanc.url}/dicom-web"
[[peers]]
name = "down"
ae_title = "NOBODY"
host = "127.0.0.1"
port = {free_port()}
"""
    )
    return load_settings(config)


def test_deliveries_to_up_and_down_peers(
    orthanc_factory: type[OrthancProcess],
    tmp_path: Path,
    database_url: str,
    request: pytest.FixtureRequest,
) -> None:
    orthanc = orthanc_factory(tmp_path / "orthanc", dicomweb=True).start()
    settings = settings_for(tmp_path, orthanc, database_url)
    engine = open_database(settings.database_url)
    request.addfinalizer(engine.dispose)
    clock = [1000.0]
    ctx = WorkerContext(
        settings,
        engine,
        ModelCache("cpu"),
        enqueue_delivery=lambda _: None,
        enqueue_job_retry=lambda *_: None,
        clock=lambda: clock[0],
    )

    # A study the node holds, and two "results" of a job on it (real objects: an SR and a CT).
    header = read_header(real_file("CT_small.dcm").read_bytes())
    InstanceRecorder(engine).record(header, "PACS", "x.dcm", 1, clock[0])
    (study,) = index.list_studies(engine)
    results = settings.node.data_dir / "results" / "1"
    results.mkdir(parents=True)
    shutil.copy(real_file("CT_small.dcm"), results / "SEG.dcm")
    shutil.copy(real_file("test-SR.dcm"), results / "SR.dcm")
    spec = jobs.JobSpec(study.id, 1, "m", "r", jobs.Priority.ROUTINE, ("pacs", "web", "down"), 1)
    ((job_id, _),), _ = jobs.create(engine, [spec], [], 3, 3, clock[0])
    job = jobs.claim(engine, job_id, "w", 60, clock[0])
    assert job is not None
    outputs = [
        jobs.Output("SEG", "results/1/SEG.dcm", "1"),
        jobs.Output("SR", "results/1/SR.dcm", "2"),
    ]
    ids = jobs.encoded(engine, job_id, outputs, job.destinations, {}, "{}", study.id, 3, clock[0])
    by_peer = {(r.peer, r.kind): r.id for r in jobs.delivery_rows(engine)}
    assert len(ids) == 6

    # The down peer is tried first: it fails fast and does not stop the others.
    assert run_delivery(ctx, by_peer[("down", "SEG")]) == "PENDING"
    for peer in ("pacs", "web"):
        for kind in ("SEG", "SR"):
            assert run_delivery(ctx, by_peer[(peer, kind)]) == "DONE", (peer, kind)
    # Orthanc received each object once over DIMSE and once over STOW-RS (the same instance).
    stored = {
        orthanc.get(f"/instances/{i}/simplified-tags")["SOPInstanceUID"]
        for i in orthanc.get("/instances")
    }
    assert stored == {
        dcmread(results / "SEG.dcm").SOPInstanceUID,
        dcmread(results / "SR.dcm").SOPInstanceUID,
    }

    # The down peer: retried with growing delays, then FAILED with the reason.
    down = by_peer[("down", "SEG")]
    (row,) = [r for r in jobs.delivery_rows(engine) if r.id == down]
    assert row.state == "PENDING" and "no association" in row.last_error
    assert row.next_attempt_at == pytest.approx(clock[0] + 1)
    for _ in range(2):
        clock[0] += 100
        assert down in jobs.reconcile(engine, clock[0], 600).deliveries
        run_delivery(ctx, down)
    (row,) = [r for r in jobs.delivery_rows(engine) if r.id == down]
    assert (row.state, row.attempts) == ("FAILED", 3)
    (job_row,) = jobs.job_rows(engine)
    assert job_row.state == "ENCODED"  # not DELIVERED while a destination is missing it
    assert jobs.retry_delivery(engine, down, clock[0])


def test_a_forward_with_a_missing_file_fails_and_sends_nothing(
    orthanc_factory: type[OrthancProcess],
    tmp_path: Path,
    database_url: str,
    request: pytest.FixtureRequest,
) -> None:
    orthanc = orthanc_factory(tmp_path / "orthanc").start()
    settings = settings_for(tmp_path, orthanc, database_url)
    engine = open_database(settings.database_url)
    request.addfinalizer(engine.dispose)
    ctx = WorkerContext(settings, engine, ModelCache("cpu"), lambda _: None, lambda _: None)
    # A series of two instances, one of whose files has gone from the spool.
    data = real_file("CT_small.dcm").read_bytes()
    header = read_header(data)
    recorder = InstanceRecorder(engine)
    for n in (1, 2):
        relative = f"{header.study_instance_uid}/{header.series_instance_uid}/{n}.dcm"
        recorder.record(replace(header, sop_instance_uid=f"1.2.3.{n}"), "PACS", relative, 1, 1.0)
    (settings.spool_dir / header.study_instance_uid / header.series_instance_uid).mkdir(
        parents=True
    )
    (
        settings.spool_dir / f"{header.study_instance_uid}/{header.series_instance_uid}/1.dcm"
    ).write_bytes(data)
    (study,) = index.list_studies(engine)
    forward = jobs.ForwardSpec(study.id, "pacs", "SERIES", header.series_instance_uid)
    _, (delivery_id,) = jobs.create(engine, [], [forward], 3, 3, 10.0)

    assert run_delivery(ctx, delivery_id) == "PENDING"
    (row,) = jobs.delivery_rows(engine)
    assert "1 of 2 file(s) cannot be read, nothing sent" in row.last_error
    assert "2.dcm" in row.last_error
    assert orthanc.get("/instances") == []  # no partial forward

"""Workers that share no disk with the node: the worker API, and a node with two workers.

The first tests drive :class:`~pacs_ai.pipeline.node_client.RemoteLink` against the node's
HTTP service on a real loopback port: a real model runs, the series comes over WADO-RS and
the SEG and SR go back over the worker API. The last runs the node, two ``pacs-ai worker``
processes in their own working directories (no config, no data dir, only the broker URL,
the node's URL and a token) and Orthanc, which sends the studies and receives the results.
"""

from __future__ import annotations

import json
import subprocess
import sys
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from pacs_ai.pipeline import jobs
from pacs_ai.pipeline.infer import ModelCache, RemoteWorkerContext, run_job
from pacs_ai.pipeline.link import LeaseLost
from pacs_ai.pipeline.node_client import NodeRefused, RemoteLink
from pacs_ai.pipeline.queues import INFER_TASK, SEND_TASK
from pacs_ai.results.uids import SR_INSTANCE, SR_SERIES, result_uid
from pacs_ai.storage.schema import RESULT
from tests.peers import (
    NodeProcess,
    OrthancProcess,
    RedisServer,
    children,
    free_port,
    kill_tree,
    orthanc_as_peer,
    results_in,
    wait_for,
    without_node_settings,
)
from tests.test_faults import small_study
from tests.web import Remote


def test_a_remote_worker_runs_a_job_through_the_node_api(remote: Remote, tmp_path: Path):
    job_id = remote.job(tmp_path)
    ctx = RemoteWorkerContext(remote.ctx.settings, ModelCache("cpu"), remote.link("gpu-1:7"))

    assert run_job(ctx, job_id) == "ENCODED"

    row = jobs.job_row(remote.ctx.engine, job_id)
    assert row is not None and row.state == "ENCODED" and row.worker == "gpu-1:7"
    assert json.loads(row.findings)["findings"], "the model's findings reached the node"
    # The node stored the SEG and SR itself, indexed as results of the study...
    data_dir = remote.ctx.settings.node.data_dir
    for kind in ("SEG", "SR"):
        stored = pydicom.dcmread(data_dir / "results" / str(job_id) / f"{kind}.dcm")
        assert stored.Modality == kind
    with remote.ctx.engine.connect() as conn:
        kinds = conn.exec_driver_sql(
            "SELECT count(*) FROM instances WHERE kind = ?"
            if remote.ctx.engine.dialect.name == "sqlite"
            else "SELECT count(*) FROM instances WHERE kind = %s",
            (RESULT,),
        ).scalar_one()
    assert kinds == 2
    # ...and put one delivery per result on the send queue, for its own workers.
    deliveries = jobs.delivery_rows(remote.ctx.engine)
    assert len(deliveries) == 2
    assert sorted(remote.sent) == sorted((SEND_TASK, d.id, "send", 5) for d in deliveries)


def test_a_second_worker_cannot_take_or_finish_a_held_job(remote: Remote, tmp_path: Path):
    job_id = remote.job(tmp_path)
    first, second = remote.link("w-1"), remote.link("w-2")
    job = first.claim(job_id)
    assert job is not None and job.attempt == 1
    assert second.claim(job_id) is None  # 409: held, lease running
    assert first.renew(job_id) and not second.renew(job_id)
    with pytest.raises(LeaseLost):
        second.fail(job, "not mine")
    with pytest.raises(LeaseLost):
        second.encoded(job, [jobs.Output("SR", "x", "1.2")], {}, "")

    # The series over WADO-RS is the series the node holds, all of it.
    datasets = first.series(job)
    assert len(datasets) == 24
    assert {d.SeriesInstanceUID for d in datasets} == {job.series_instance_uid}

    # A failed attempt goes back on the infer queue through the node's broker.
    assert first.fail(job, "CUDA out of memory") == "QUEUED"
    # At the job's own priority (ROUTINE here), not a default.
    assert remote.sent == [(INFER_TASK, job_id, "infer", job.priority.celery_priority)]
    assert job.priority.celery_priority != 5
    row = jobs.job_row(remote.ctx.engine, job_id)
    assert row is not None and row.reason == "CUDA out of memory"
    # The job is no longer the first worker's.
    with pytest.raises(LeaseLost):
        first.skip(job, "late")


def _result(
    job: jobs.ClaimedJob,
    sop: str,
    study: str,
    series: str = "",
    sop_class: str = "1.2.840.10008.5.1.4.1.1.88.34",
    patient: str = "PHANTOM-000",
) -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series or result_uid(job.id, SR_SERIES)
    ds.Modality = "SR"
    ds.PatientID = patient
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_the_node_takes_only_the_jobs_own_results(remote: Remote, tmp_path: Path):
    job_id = remote.job(tmp_path)
    link = remote.link("w-1")
    job = link.claim(job_id)
    assert job is not None
    own_uid = result_uid(job_id, SR_INSTANCE)

    with pytest.raises(NodeRefused, match="must have SOP Instance UID"):
        link.store(job, "SR", _result(job, "1.2.3.999", job.study_instance_uid))
    with pytest.raises(NodeRefused, match="belongs in study"):
        link.store(job, "SR", _result(job, own_uid, "1.2.3.5"))
    with pytest.raises(NodeRefused, match="result kind"):
        link.store(job, "PDF", _result(job, own_uid, job.study_instance_uid))
    with pytest.raises(NodeRefused, match="not a readable DICOM"):
        link.store(job, "SR", b"\x00" * 300)
    # Not into a source series, not as another SOP Class, not for another patient.
    study = job.study_instance_uid
    with pytest.raises(NodeRefused, match="its own series"):
        link.store(job, "SR", _result(job, own_uid, study, series=job.series_instance_uid))
    with pytest.raises(NodeRefused, match="SOP Class"):
        link.store(
            job, "SR", _result(job, own_uid, study, sop_class="1.2.840.10008.5.1.4.1.1.88.11")
        )
    with pytest.raises(NodeRefused, match="another patient"):
        link.store(job, "SR", _result(job, own_uid, study, patient="SOMEONE-ELSE"))
    with pytest.raises(NodeRefused, match="never uploaded"):
        link.encoded(job, [jobs.Output("SR", "x", "1.2")], {}, "")
    assert not (remote.ctx.settings.node.data_dir / "results").exists()

    # Another worker may not write into a job it does not hold.
    with pytest.raises(LeaseLost):
        remote.link("w-2").store(job, "SR", _result(job, own_uid, job.study_instance_uid))

    output = link.store(job, "SR", _result(job, own_uid, job.study_instance_uid))
    assert output.sop_instance_uid == own_uid and output.path == f"results/{job_id}/SR.dcm"
    with pytest.raises(NodeRefused, match="kinds must name the SR"):
        link.encoded(job, [output, output], {}, "{}")
    assert link.encoded(job, [output], {"inference": 1.0}, "{}") == 1


def test_only_worker_tokens_reach_the_worker_api(remote: Remote, tmp_path: Path):
    job_id = remote.job(tmp_path)
    for role in ("radiologist", "integration"):
        with pytest.raises(NodeRefused, match="403"):
            remote.link("w", role).claim(job_id)
    with pytest.raises(NodeRefused, match="401"):
        RemoteLink(remote.url, "not-a-token", "w").claim(job_id)
    # A worker token is no admin token, and cannot store studies.
    import urllib.error
    import urllib.request

    token = remote.token()
    for path, method in (
        ("/api/admin/jobs", "GET"),
        ("/dicomweb/studies", "POST"),
        ("/dicomweb/studies", "GET"),
    ):
        request = urllib.request.Request(
            remote.url + path, method=method, headers={"Authorization": f"Bearer {token}"}
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 403, path
    assert jobs.job_row(remote.ctx.engine, job_id).state == "QUEUED"  # type: ignore[union-attr]


# --- the node, two workers elsewhere, Orthanc -------------------------------------------------


def start_remote_worker(
    workdir: Path,
    broker_url: str,
    node_url: str,
    token: str,
    *args: str,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """``pacs-ai worker`` as a GPU server runs it: no config file, no data dir, own cwd;
    ``args`` and ``env`` added to its command line and environment."""
    workdir.mkdir(parents=True)
    environment = without_node_settings(
        PACS_AI_BROKER__URL=broker_url,
        PACS_AI_WORKER__NODE_URL=node_url,
        PACS_AI_WORKER__TOKEN=token,
        PACS_AI_WORKER__DEVICE="cpu",
    )
    with (workdir / "worker.log").open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "pacs_ai", "worker", *args],
            cwd=workdir,
            env=environment | (env or {}),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


@pytest.mark.slow
def test_two_workers_without_the_nodes_disk_process_studies_from_orthanc(
    tmp_path: Path, orthanc_factory: type[OrthancProcess]
) -> None:
    redis = RedisServer(free_port())
    orthanc = orthanc_factory(tmp_path / "orthanc")
    node = NodeProcess(
        tmp_path / "node",
        peers=[orthanc_as_peer(orthanc)],
        ai_worker=True,
        # The node's own worker only delivers; inference is the remote workers' alone.
        extra_worker={"queues": ["send"]},
        extra_toml=f'[broker]\nurl = "{redis.url}"\n',
    )
    orthanc.modalities["pacsai"] = [node.ae_title, "127.0.0.1", node.port]
    studies = [small_study(tmp_path / f"study{i}", seed=40 + i) for i in range(4)]
    workers: list[subprocess.Popen[bytes]] = []
    try:
        redis.start()
        orthanc.start()
        node.start()
        token = node.token("worker")
        homes = [tmp_path / f"gpu{i}" for i in range(2)]
        workers = [start_remote_worker(h, redis.url, node.url, token) for h in homes]
        wait_for(
            lambda: all(b"ready" in (h / "worker.log").read_bytes() for h in homes),
            120,
            "both remote workers ready",
        )
        # Orthanc holds the studies and sends them to the node, as a PACS routing rule would.
        for study in studies:
            orthanc.upload(study.files)
        for orthanc_id in orthanc.get("/studies"):
            orthanc.post("/modalities/pacsai/store", {"Resources": [orthanc_id]})

        def states() -> list[str]:
            return sorted(j["state"] for j in node.cli_json("jobs", "list"))

        wait_for(lambda: states() == ["DELIVERED"] * 4, 300, "4 jobs delivered", interval=2)
        job_rows = node.cli_json("jobs", "list")
        # Both remote workers ran jobs (a worker signs its claims host:pid).
        pids = {int(j["worker"].rsplit(":", 1)[1]) for j in job_rows}
        pools = [set(children(w.pid)) for w in workers]
        assert all(pids & pool for pool in pools), (pids, pools)
        for study in studies:
            found = results_in(orthanc, study.study_instance_uid)
            assert (len(found["SEG"]), len(found["SR"])) == (1, 1), study.study_instance_uid
            sr = pydicom.dcmread(BytesIO(found["SR"][0]))
            assert sr.StudyInstanceUID == study.study_instance_uid
        # The workers never saw the node's files: nothing DICOM in their working directories.
        for home in homes:
            assert not [p for p in home.rglob("*") if p.suffix == ".dcm"], home
            assert not (home / "pacs-ai-data").exists()
        log = node.log.read_text()
        assert "claimed by remote worker" in log
    finally:
        for worker in workers:
            kill_tree(worker.pid)
            worker.wait()
        node.stop()
        orthanc.stop()
        redis.kill()

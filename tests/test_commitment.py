"""Storage commitment (PS3.4 Annex J) against a real Storage Commitment SCP: Orthanc.

Orthanc answers every request on a new association to the node's listener, so the listener
is what records the reports; a peer that answers on the request's own association is a small
pynetdicom SCP below. Retention with ``require_commitment`` keeps a study's sources until
each of its deliveries is committed, and never purges on a failed or missing answer.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.dimse_messages import N_ACTION_RSP
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import P_DATA_TF
from sqlalchemy import Engine, select

from pacs_ai.config import NodeSettings, PeerSettings, Settings, StorageSettings, load_settings
from pacs_ai.dicom import commitment
from pacs_ai.dicom.commitment import Reference
from pacs_ai.dicom.contexts import STORAGE_COMMITMENT_PUSH_MODEL
from pacs_ai.dicom.scp import Receiver
from pacs_ai.phantoms.chest_ct import Geometry, write_chest_ct
from pacs_ai.pipeline import jobs
from pacs_ai.pipeline.deliver import run_delivery
from pacs_ai.pipeline.infer import WorkerContext
from pacs_ai.pipeline.route import Priority
from pacs_ai.storage import commitments, index, retention
from pacs_ai.storage.db import open_database
from pacs_ai.storage.ingest import Ingest
from pacs_ai.storage.schema import instances, series, studies
from pacs_ai.storage.spool import Spool
from tests.peers import NodeProcess, OrthancProcess, free_port, orthanc_as_peer, send_as, wait_for
from tests.realdata import real_file
from tests.records import local_worker

CT = "1.2.840.10008.5.1.4.1.1.2"
A, B, C = Reference(CT, "1.2.3.1"), Reference(CT, "1.2.3.2"), Reference(CT, "1.2.3.3")


# --- the datasets, pure -----------------------------------------------------------------------


def _through_bytes(ds: Dataset) -> Dataset:
    """Encoded as on the wire (implicit VR little endian) and read back."""
    raw = encode(ds, True, True)
    assert raw is not None
    return decode(BytesIO(raw), True, True)


def test_request_and_report_round_trip_through_bytes() -> None:
    uid = commitment.new_transaction_uid()
    assert uid.startswith("2.25.") and len(uid) <= 64 and uid != commitment.new_transaction_uid()
    action = _through_bytes(commitment.action_information(uid, [A, B]))
    assert action.TransactionUID == uid
    assert [i.ReferencedSOPInstanceUID for i in action.ReferencedSOPSequence] == [
        "1.2.3.1",
        "1.2.3.2",
    ]

    report = commitment.parse_report(
        commitment.FAILURES_EXIST,
        _through_bytes(commitment.event_information(uid, [A], [(B, 0x0112)])),
    )
    assert report == commitment.Report(uid, 2, (A,), ((B, 0x0112),))
    assert commitment.judge(report, [A]) == ""
    why = commitment.judge(report, [A, B, C])
    assert "1 of 3 not committed, e.g. 1.2.3.2: 0x0112 (no such object instance)" in why
    assert "1 not mentioned in the report, e.g. 1.2.3.3" in why
    # "All committed" that leaves one out commits nothing for retention.
    partial = commitment.parse_report(1, commitment.event_information(uid, [A], []))
    assert commitment.judge(partial, [A, B]) != ""


@pytest.mark.parametrize(
    ("event_type", "info", "message"),
    [
        (3, commitment.event_information("2.25.1", [A], []), "Event Type ID"),
        (1, commitment.event_information("", [A], []), "Transaction UID"),
        (2, commitment.event_information("2.25.1", [A], []), "Failed SOP Sequence"),
    ],
)
def test_a_malformed_report_is_refused_by_name(
    event_type: int, info: Dataset, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        commitment.parse_report(event_type, info)


def test_storage_commitment_needs_dimse() -> None:
    with pytest.raises(ValueError, match="DIMSE service"):
        PeerSettings(
            name="web",
            ae_title="WEB",
            host="127.0.0.1",
            protocol="dicomweb",
            dicomweb_url="http://127.0.0.1/dicom-web",
            storage_commitment=True,
        )


# --- a node's worker and listener against Orthanc, in this process ----------------------------


@dataclass
class Rig:
    settings: Settings
    engine: Engine
    spool: Spool
    ingest: Ingest
    orthanc: OrthancProcess
    clock: list[float]

    def now(self) -> float:
        return self.clock[0]

    def worker(self, ae_title: str = "") -> WorkerContext:
        settings = self.settings
        if ae_title:
            node = settings.node.model_copy(update={"ae_title": ae_title})
            settings = settings.model_copy(update={"node": node})
        return local_worker(settings, self.engine, self.now)

    def study_with_result(self, source: str) -> tuple[int, int, Path]:
        """A COMPLETE study from one real file and a job whose SR result awaits delivery.

        Returns (study id, the SR delivery's id, the SR file).
        """
        outcome = self.ingest.store(real_file(source).read_bytes(), "ORTHANC")
        assert outcome.header is not None
        uid = outcome.header.study_instance_uid
        with self.engine.connect() as conn:
            study_id, series_id = conn.execute(
                select(studies.c.id, series.c.id)
                .join(series, series.c.study_id == studies.c.id)
                .where(studies.c.study_instance_uid == uid)
            ).one()
        assert index.mark_complete(self.engine, study_id, self.now(), self.now()) is not None
        sr = dcmread(real_file("test-SR.dcm"))
        sr.StudyInstanceUID = uid
        sr.SOPInstanceUID = sr.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        relative = f"results/{study_id}/SR.dcm"
        path = self.settings.node.data_dir / relative
        path.parent.mkdir(parents=True)
        sr.save_as(path, enforce_file_format=True)
        spec = jobs.JobSpec(study_id, series_id, "m", "r", Priority.ROUTINE, ("pacs",), 1)
        ((job_id, _),), _ = jobs.create(self.engine, [spec], [], 3, 3, self.now())
        assert jobs.claim(self.engine, job_id, "w", 60, self.now()) is not None
        (delivery_id,) = jobs.encoded(
            self.engine, job_id, [jobs.Output("SR", relative, sr.SOPInstanceUID)], ("pacs",),
            {}, "{}", study_id, 3, self.now(),
        )  # fmt: skip
        return study_id, delivery_id, path

    def delivery(self, delivery_id: int) -> Any:
        row = jobs.delivery_row(self.engine, delivery_id)
        assert row is not None
        return row

    def commitment_of(self, delivery_id: int) -> str:
        return str(self.delivery(delivery_id).commitment)

    def candidates(self, **policy: Any) -> list[int]:
        settings = self.settings.model_copy(
            update={"retention": self.settings.retention.model_copy(update=policy)}
        )
        return [c.study_id for c in retention.candidates(self.engine, settings, self.now())]


@pytest.fixture
def rig(tmp_path: Path, orthanc_factory: type[OrthancProcess], database_url: str) -> Iterator[Rig]:
    listener_port = free_port()
    orthanc = orthanc_factory(
        tmp_path / "orthanc",
        # Orthanc opens its report associations to the modality the request came from.
        modalities={"pacsai": ["PACSAI", "127.0.0.1", listener_port]},
    ).start()
    config = tmp_path / "pacs-ai.toml"
    config.write_text(
        f"""
[node]
ae_title = "PACSAI"
bind = "127.0.0.1"
dicom_port = {listener_port}
data_dir = "{tmp_path / "data"}"
[database]
url = "{database_url}"
[delivery]
timeout_s = 10
[retention]
keep_days = 0
require_commitment = true
[[peers]]
name = "pacs"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = {orthanc.dicom_port}
storage_commitment = true
commitment_timeout_s = 60
commitment_max_requests = 2
"""
    )
    settings = load_settings(config)
    engine = open_database(settings.database_url)
    spool = Spool(settings.node.data_dir, 0)
    spool.prepare(clean_tmp=True)
    clock = [time.time()]
    ingest = Ingest(spool, engine, clock=lambda: clock[0])
    yield Rig(settings, engine, spool, ingest, orthanc, clock)
    ingest.close()


def _orthanc_delete(orthanc: OrthancProcess, sop_instance_uid: str) -> None:
    (found,) = orthanc.post("/tools/lookup", sop_instance_uid.encode())
    request = urllib.request.Request(f"{orthanc.url}/instances/{found['ID']}", method="DELETE")
    with urllib.request.urlopen(request, timeout=30):
        pass


def _sources(rig: Rig, study_id: int) -> list[Path]:
    with rig.engine.connect() as conn:
        paths = conn.execute(
            select(instances.c.path).where(
                instances.c.study_id == study_id, instances.c.kind == "source"
            )
        ).scalars()
        return [rig.spool.path_of(p) for p in paths]


def _commitment_jobs(orthanc: OrthancProcess) -> list[str]:
    """The states of Orthanc's storage commitment report jobs."""
    jobs_ = orthanc.get("/jobs?expand")
    return sorted(j["State"] for j in jobs_ if j["Type"] == "StorageCommitmentScp")


@pytest.mark.slow
def test_orthanc_commits_or_fails_and_retention_waits_for_it(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "pacs_ai.dicom.commitment")
    worker = rig.worker()
    kept, kept_delivery, _ = rig.study_with_result("CT_small.dcm")
    lost, lost_delivery, lost_sr = rig.study_with_result("MR_small.dcm")
    kept_files = _sources(rig, kept)
    rig.clock[0] += 1  # keep_days = 0: past it once a second has gone by

    # The listener is down: both deliveries succeed, both requests go out, Orthanc's reports
    # find nobody. Delivered, but not committed: retention keeps both studies.
    for delivery_id in (kept_delivery, lost_delivery):
        assert run_delivery(worker, delivery_id) == "DONE"
        row = rig.delivery(delivery_id)
        assert (row.state, row.commitment, row.commitment_requests) == ("DONE", "REQUESTED", 1)
        assert row.commitment_uid.startswith("2.25.") and row.committed_at is None
        assert row.commitment_requested_at == rig.now()
    assert rig.candidates() == []
    assert sorted(rig.candidates(require_commitment=False)) == sorted([kept, lost])
    # Not due yet: a duplicate message asks nothing.
    assert run_delivery(worker, kept_delivery) == "NOT_CLAIMED"
    assert kept_delivery not in jobs.reconcile(rig.engine, rig.now(), 600).deliveries

    # Orthanc reports from jobs of its own: both must have given up on the absent listener
    # before it comes up, or a late first report would reach it.
    wait_for(lambda: _commitment_jobs(rig.orthanc) == ["Failure", "Failure"], 60, "reports lost")
    # The PACS loses one object meanwhile; the listener comes up.
    _orthanc_delete(rig.orthanc, dcmread(lost_sr).SOPInstanceUID)
    receiver = Receiver(rig.settings, rig.ingest)
    receiver.start()
    try:
        # Unanswered past commitment_timeout_s: the reconciler hands both to a worker again.
        rig.clock[0] += 61
        due = jobs.reconcile(rig.engine, rig.now(), 600).deliveries
        assert {kept_delivery, lost_delivery} <= set(due)
        for delivery_id in (kept_delivery, lost_delivery):
            assert run_delivery(worker, delivery_id) == "COMMITMENT_REQUESTED"
        wait_for(lambda: rig.commitment_of(kept_delivery) == "COMMITTED", 30, "the commitment")
        wait_for(lambda: rig.commitment_of(lost_delivery) == "FAILED", 30, "the failure report")
    finally:
        receiver.stop(1)

    # Orthanc answered on associations of its own, which the listener took.
    reports = [r.getMessage() for r in caplog.records if "commitment report" in r.getMessage()]
    assert len(reports) == 2
    assert all("from ORTHANC on a new association" in r for r in reports)
    committed = rig.delivery(kept_delivery)
    assert committed.committed_at == rig.now() and committed.commitment_requests == 2
    failed = rig.delivery(lost_delivery)
    assert failed.committed_at is None
    assert "0x0112 (no such object instance)" in failed.commitment_error
    assert dcmread(lost_sr).SOPInstanceUID in failed.commitment_error
    # Each request has its own Transaction UID; only the second was answered, as the report
    # on the listener says (Event Type 1: all committed, 2: failures exist).
    first, second = commitments.transactions(rig.engine, kept_delivery)
    assert first["answered_at"] is None and first["event_type"] is None
    assert second["transaction_uid"] == committed.commitment_uid
    assert (second["answered_at"], second["event_type"]) == (rig.now(), 1)
    assert commitments.transactions(rig.engine, lost_delivery)[-1]["event_type"] == 2
    # Answered one way or the other: neither is asked again.
    assert not {kept_delivery, lost_delivery} & set(
        jobs.reconcile(rig.engine, rig.now() + 3600, 600).deliveries
    )

    # Committed: purged. Failed: kept, unless the admin gives up on it with purge_failed.
    assert rig.candidates() == [kept]
    assert rig.candidates(purge_failed=True) == sorted([kept, lost])
    (purged,) = retention.purge(rig.engine, rig.settings, rig.spool, rig.now())
    assert purged.study_id == kept
    assert not any(p.exists() for p in kept_files)
    assert all(p.exists() for p in _sources(rig, lost))


@pytest.mark.slow
def test_refused_requests_are_retried_a_bounded_number_of_times(rig: Rig) -> None:
    # Orthanc does not know this calling AE: it stores what it is sent (DicomAlwaysAllowStore)
    # but aborts the N-ACTION, so no request of this node's ever gets an answer.
    stranger = rig.worker("STRANGER")
    study, delivery_id, _ = rig.study_with_result("JPEG2000.dcm")
    rig.clock[0] += 1
    assert run_delivery(stranger, delivery_id) == "DONE"
    row = rig.delivery(delivery_id)
    assert (row.commitment, row.commitment_requests) == ("REQUESTED", 1)
    assert row.commitment_error.startswith("request 1: ORTHANC did not answer the N-ACTION")
    assert rig.candidates() == []

    rig.clock[0] += 61
    assert delivery_id in jobs.reconcile(rig.engine, rig.now(), 600).deliveries
    assert run_delivery(stranger, delivery_id) == "COMMITMENT_REQUEST_FAILED"
    assert rig.delivery(delivery_id).commitment_error.startswith("request 2:")
    rig.clock[0] += 61
    # commitment_max_requests = 2: the third time it gives up, visibly, and stops asking.
    assert run_delivery(stranger, delivery_id) == "UNANSWERED"
    row = rig.delivery(delivery_id)
    assert row.commitment == "UNANSWERED" and row.next_attempt_at is None
    assert row.commitment_error == (
        f"no report after 2 request(s) (last Transaction UID {row.commitment_uid})"
    )
    assert delivery_id not in jobs.reconcile(rig.engine, rig.now() + 3600, 600).deliveries
    assert len(commitments.transactions(rig.engine, delivery_id)) == 2
    assert rig.candidates() == []
    assert rig.candidates(purge_failed=True) == [study]


# --- a peer that reports on the request's own association -----------------------------------


class SameAssociationScp:
    """A Storage Commitment SCP that answers right away on the requesting association,
    as some PACS do while it is open: it commits all but ``lose``."""

    def __init__(self, lose: set[str]) -> None:
        self.port = free_port()
        self.lose = lose
        self.ae = AE(ae_title="SAMEPACS")
        self.ae.add_supported_context(STORAGE_COMMITMENT_PUSH_MODEL)
        self.threads: list[threading.Thread] = []
        self.answering = False  # the N-ACTION response is encoded, its P-DATA on the way
        self.answered = threading.Event()  # and on the wire
        self.report_status = -1  # the requester's answer to the report; -1: none came

    def __enter__(self) -> SameAssociationScp:
        handlers: list[Any] = [
            (evt.EVT_N_ACTION, self._on_action),
            (evt.EVT_DIMSE_SENT, self._on_dimse_sent),
            (evt.EVT_PDU_SENT, self._on_pdu_sent),
        ]
        server = self.ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)
        assert server is not None
        self.server = server
        return self

    def __exit__(self, *_: object) -> None:
        for thread in self.threads:
            thread.join(10)
        self.server.shutdown()

    def _on_dimse_sent(self, event: Any) -> None:
        if isinstance(event.message, N_ACTION_RSP):
            self.answering = True

    def _on_pdu_sent(self, event: Any) -> None:
        if self.answering and isinstance(event.pdu, P_DATA_TF):
            self.answered.set()

    def _on_action(self, event: Any) -> tuple[int, None]:
        info = event.action_information
        refs = [
            Reference(str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID))
            for i in info.ReferencedSOPSequence
        ]
        ok = [r for r in refs if r.sop_instance_uid not in self.lose]
        failed = [(r, 0x0110) for r in refs if r.sop_instance_uid in self.lose]
        report = commitment.event_information(str(info.TransactionUID), ok, failed)
        assoc = event.assoc

        def send() -> None:
            # After the N-ACTION response (which returning sends) has gone, as the standard
            # orders it: a report sent first would be taken by the requester as its answer.
            self.answered.wait(10)
            status, _ = assoc.send_n_event_report(
                report, 2 if failed else 1, STORAGE_COMMITMENT_PUSH_MODEL,
                commitment.STORAGE_COMMITMENT_INSTANCE,
            )  # fmt: skip
            self.report_status = int(status.get("Status", -1))

        self.threads.append(threading.Thread(target=send))
        self.threads[-1].start()
        return 0x0000, None


def test_a_report_on_the_request_association_is_recorded() -> None:
    got: list[commitment.Report] = []
    with SameAssociationScp(lose={"1.2.3.2"}) as scp:
        peer = PeerSettings(
            name="same", ae_title="SAMEPACS", host="127.0.0.1", port=scp.port,
            storage_commitment=True, commitment_wait_s=20,
        )  # fmt: skip
        started = time.monotonic()
        commitment.request(peer, "PACSAI", "2.25.42", [A, B], got.append, timeout_s=10)
        # The wait ends when the report comes, not after commitment_wait_s.
        assert time.monotonic() - started < 10
    # The report was answered before the requester released (it once released first, and
    # both sides then waited out their timeouts).
    assert scp.report_status == 0x0000
    (report,) = got
    assert report == commitment.Report("2.25.42", 2, (A,), ((B, 0x0110),))


# --- the whole node: pacs-ai serve, its worker and listener, Orthanc ------------------------


@pytest.mark.slow
def test_node_results_committed_by_orthanc_then_purged(
    tmp_path: Path, orthanc_factory: type[OrthancProcess]
) -> None:
    orthanc = orthanc_factory(tmp_path / "orthanc")
    node = NodeProcess(
        tmp_path / "node",
        peers=[{**orthanc_as_peer(orthanc), "storage_commitment": True}],
        ai_worker=True,
        extra_toml=(
            "[retention]\nrequire_commitment = true\n"
            '[[rules]]\nname = "ct"\nmodels = ["ct-organs-threshold"]\nresults_to = ["orthanc"]\n'
            'match = { Modality = "CT", NumberOfSeriesRelatedInstances = { min = 20 } }\n'
        ),
    )
    # Orthanc learns the node (AE, host, listener port) to open its report associations.
    orthanc.modalities["pacsai"] = [node.ae_title, "127.0.0.1", node.port]
    orthanc.start()
    study = write_chest_ct(
        tmp_path / "study",
        Geometry(rows=128, columns=128, pixel_spacing_mm=2.8, slices=24, slice_thickness_mm=5),
        seed=5,
        with_lung_series=False,
        with_scout=False,
    )
    node.start()
    try:
        send_as(node, orthanc.ae_title, study.files)

        def deliveries() -> list[dict[str, Any]]:
            return list(node.cli_json("deliveries", "list"))

        def committed() -> bool:
            rows = deliveries()
            return len(rows) == 2 and all(d["commitment"] == "COMMITTED" for d in rows)

        wait_for(committed, 240, "SEG and SR delivered and committed", interval=1)
        rows = deliveries()
        assert sorted(d["kind"] for d in rows) == ["SEG", "SR"]
        assert all(d["state"] == "DONE" and d["committed_at"] for d in rows)
        engine = open_database(node.index_url, run_migrations=False)
        try:
            for row in rows:
                (request,) = commitments.transactions(engine, row["id"])
                assert request["transaction_uid"] == row["commitment_uid"]
                assert request["event_type"] == 1
        finally:
            engine.dispose()
        # Orthanc reported on an association of its own, to the node's listener.
        assert "storage commitment report from ORTHANC on a new association" in node.log.read_text()
        listed = node.cli("deliveries", "list")
        assert listed.returncode == 0 and "COMMITTED" in listed.stdout

        purged = node.cli("purge", "--keep-days", "0", "--json")
        assert purged.returncode == 0, purged.stderr
        (gone,) = json.loads(purged.stdout)["studies"]
        assert gone["study_instance_uid"] == study.study_instance_uid
        assert not node.stored_path(study.files[0]).exists()
    finally:
        node.stop()


@pytest.mark.parametrize(
    "event_type, status",
    [
        (3, 0x0113),  # no such event type
        (2, 0x0115),  # "failures exist" without a Failed SOP Sequence: a bad argument
        (1, 0x0000),  # a well-formed report (for no known transaction: logged, kept)
    ],
)
def test_a_report_gets_the_status_its_fault_deserves(
    tmp_path: Path, engine: Engine, event_type: int, status: int
) -> None:
    settings = Settings(
        node=NodeSettings(bind="127.0.0.1", dicom_port=free_port(), data_dir=tmp_path),
        storage=StorageSettings(reserve_mb=0),
    )
    spool = Spool(tmp_path, reserve_bytes=0)
    spool.prepare()
    ingest = Ingest(spool, engine)
    receiver = Receiver(settings, ingest)
    receiver.start()
    try:
        ae = AE(ae_title="ORTHANC")
        ae.add_requested_context(STORAGE_COMMITMENT_PUSH_MODEL)
        role = build_role(STORAGE_COMMITMENT_PUSH_MODEL, scp_role=True)
        assoc = ae.associate(
            "127.0.0.1", settings.node.dicom_port, ae_title="PACSAI", ext_neg=[role]
        )
        assert assoc.is_established
        ref = Reference("1.2.840.10008.5.1.4.1.1.2", generate_uid())
        info = commitment.event_information(generate_uid(), [ref], [])
        answer, _ = assoc.send_n_event_report(
            info, event_type, STORAGE_COMMITMENT_PUSH_MODEL, commitment.STORAGE_COMMITMENT_INSTANCE
        )
        assoc.release()
        assert answer.Status == status
    finally:
        receiver.stop(1)
        ingest.close()

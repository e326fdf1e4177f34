"""Deliveries to real peers: C-STORE to Orthanc, STOW-RS to Orthanc's DICOMweb, and a peer
that is down, which backs off, fails visibly, and never holds up the others."""

from __future__ import annotations

import os
import shutil
import socket
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from pacs_ai.config import PeerSettings, Settings, load_settings
from pacs_ai.dicom import scu
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


def _nodelay_of_sockets_connected_to(port: int) -> list[int]:
    """TCP_NODELAY, read with getsockopt, of each socket of this process connected to
    127.0.0.1:``port``.

    Found through /proc/self/fd rather than through pynetdicom's objects, so what is read is
    the kernel's option on the very socket the SCU talks over: each socket fd is duplicated
    (the duplicate shares the socket, and closing it leaves the original open).
    """
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            dup = os.dup(int(name))
        except OSError:
            continue  # closed since it was listed (the listing's own fd, a finished thread)
        with socket.socket(fileno=dup) as sock:
            if sock.family != socket.AF_INET or sock.type != socket.SOCK_STREAM:
                continue
            try:
                peer = sock.getpeername()
            except OSError:
                continue  # a listening or unconnected socket
            if peer == ("127.0.0.1", port):
                found.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
    return found


def test_the_store_scu_turns_nagle_off_on_its_association_socket() -> None:
    """pynetdicom leaves Nagle on, and every small DIMSE message then waits for a delayed ACK
    (~40 images/s instead of ~150 on loopback). Seen from inside a real peer while the SCU's
    association is open: the socket the SCU sends over has TCP_NODELAY set, for C-STORE and
    for C-ECHO; the peer's own socket (plain pynetdicom) shows the probe reads a real 0."""
    port = free_port()
    seen: list[tuple[str, list[int], int]] = []

    def probe(event: Any, what: str) -> None:
        own = event.assoc.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        seen.append((what, _nodelay_of_sockets_connected_to(port), own))

    def on_store(event: Any) -> int:
        probe(event, "C-STORE")
        return 0x0000

    def on_echo(event: Any) -> int:
        probe(event, "C-ECHO")
        return 0x0000

    ae = AE(ae_title="PEER")
    ae.add_supported_context(CTImageStorage, "1.2.840.10008.1.2.1")
    ae.add_supported_context(Verification)
    server = ae.start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_C_ECHO, on_echo)],
    )
    assert server is not None
    try:
        peer = PeerSettings(name="peer", ae_title="PEER", host="127.0.0.1", port=port)
        report = scu.send(scu.scan([real_file("CT_small.dcm")], scu.SendReport()), peer, "NODE")
        assert report.ok and report.sent == 1
        assert scu.echo(peer, "NODE") == 0x0000
    finally:
        server.shutdown()
    # One SCU socket to the peer each time, Nagle off on it; pynetdicom's own left on.
    assert seen == [("C-STORE", [1], 0), ("C-ECHO", [1], 0)]

"""The audit trail: append-only in the database, recorded by a real node for DICOM and HTTP
traffic and configuration changes, exported, and sent as ATNA syslog messages over UDP."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import httpx
import pytest
from pydicom import dcmread
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError

from pacs_ai.audit.atna import audit_message, syslog_frame
from pacs_ai.audit.events import AuditEvent, Kind
from pacs_ai.audit.trail import Auditor, rows
from pacs_ai.config import Settings
from tests.peers import NodeProcess, dcmtk, wait_for
from tests.realdata import real_file


def test_the_audit_table_refuses_update_and_delete(engine: Engine, tmp_path: Path) -> None:
    auditor = Auditor(engine, Settings())
    auditor.record(AuditEvent(Kind.QUERY, actor="someone", target="/dicomweb/studies"))
    (row,) = rows(engine)
    assert (row["kind"], row["event_id"], row["actor"]) == ("query", "110112", "someone")
    for statement in ("UPDATE audit SET actor = 'nobody'", "DELETE FROM audit"):
        with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
            conn.execute(text(statement))
    assert rows(engine) == [row]
    # A long detail (a peer's error text) is shortened, and still reads back as JSON.
    auditor.record(AuditEvent(Kind.INSTANCES_SENT, actor="PACS", detail={"error": "x" * 5000}))
    assert rows(engine)[-1]["detail"] == {"error": "x" * 200}


def test_audit_message_follows_the_dicom_schema() -> None:
    event = AuditEvent(
        Kind.INSTANCES_RECEIVED,
        actor="CT_SCANNER",
        address="10.0.0.7",
        target="1.2.3.4",
        detail={"instances": 3},
    )
    xml = audit_message(event, 1_700_000_000.0, "PACSAI")
    root = ET.fromstring(xml)
    ident = root.find("EventIdentification")
    assert ident is not None
    assert ident.get("EventActionCode") == "C"
    assert ident.get("EventOutcomeIndicator") == "0"
    assert ident.get("EventDateTime", "").startswith("2023-11-14T22:13:20")
    event_id = ident.find("EventID")
    assert event_id is not None and event_id.get("csd-code") == "110104"
    participants = root.findall("ActiveParticipant")
    roles = {
        p.get("UserID"): p.find("RoleIDCode").get("csd-code")  # type: ignore[union-attr]
        for p in participants
    }
    assert roles == {"CT_SCANNER": "110153", "PACSAI": "110152"}  # source, destination
    obj = root.find("ParticipantObjectIdentification")
    assert obj is not None and obj.get("ParticipantObjectID") == "1.2.3.4"
    frame = syslog_frame(xml, 1_700_000_000.0)
    assert frame.startswith(b"<85>1 2023-11-14T22:13:20.000+00:00 ")
    assert b" pacs-ai " in frame and b" IHE+RFC-3881 - <?xml" in frame


def _collector() -> tuple[socket.socket, int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)
    return sock, sock.getsockname()[1]


def _drain(sock: socket.socket) -> list[bytes]:
    got = []
    while True:
        try:
            got.append(sock.recv(65536))
        except TimeoutError:
            return got


def _audit(node: NodeProcess) -> list[dict[str, Any]]:
    result = node.cli("audit", "export")
    assert result.returncode == 0, result.stderr
    return list(json.loads(result.stdout))


@pytest.mark.slow
def test_a_node_audits_dicom_http_and_configuration(tmp_path: Path) -> None:
    collector, port = _collector()
    node = NodeProcess(
        tmp_path / "node",
        extra_toml=f'[audit]\nsyslog = "udp://127.0.0.1:{port}"\n',
    )
    source = real_file("CT_small.dcm")
    study_uid = dcmread(source).StudyInstanceUID
    node.start()
    try:
        sent = dcmtk(
            "storescu", "-aet", "CT_SCANNER", "-aec", "PACSAI", "127.0.0.1", str(node.port),
            str(source),
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        refused = dcmtk("echoscu", "-aet", "ROGUE", "-aec", "NOTUS", "127.0.0.1", str(node.port))
        assert refused.returncode != 0
        admin = node.token("admin", name="auditor")
        with httpx.Client(base_url=node.url, timeout=30) as client:
            assert client.get("/api/admin/jobs").status_code == 401
            headers = {"Authorization": f"Bearer {admin}"}
            assert client.get("/api/admin/audit", headers=headers).status_code == 200

        def audited() -> bool:
            kinds = {r["kind"] for r in _audit(node)}
            return {"instances-received", "association-refused"} <= kinds

        wait_for(audited, 60, "the association's audit events")
        trail = _audit(node)
        by_kind: dict[str, list[dict[str, Any]]] = {}
        for row in trail:
            by_kind.setdefault(row["kind"], []).append(row)
        assert by_kind["application-start"][0]["actor"] == "PACSAI"
        (received,) = by_kind["instances-received"]
        assert (received["actor"], received["address"]) == ("CT_SCANNER", "127.0.0.1")
        assert received["target"] == study_uid
        assert received["detail"] == {"instances": 1, "protocol": "DIMSE"}
        (rogue,) = by_kind["association-refused"]
        assert rogue["actor"] == "ROGUE" and rogue["outcome"] == 4
        assert "NOTUS" in rogue["detail"]["reason"]
        (token,) = by_kind["security-attributes-changed"]
        assert token["target"] == "token:auditor"
        (denied,) = by_kind["authentication-failed"]
        assert denied["target"] == "/api/admin/jobs"
        (query,) = by_kind["query"]
        assert query["actor"] == "auditor"
        # No patient name or ID anywhere in the trail or the log.
        patient = dcmread(source)
        everything = json.dumps(trail) + node.log.read_text()
        assert str(patient.PatientName) not in everything
        assert str(patient.PatientID) not in everything

        # The same events went to the syslog collector as DICOM audit messages.
        messages: list[bytes] = []

        def syslog_has_the_transfer() -> bool:
            messages.extend(_drain(collector))
            return any(b'csd-code="110104"' in m for m in messages)

        wait_for(syslog_has_the_transfer, 10, "syslog messages")
        received_xml = [m for m in messages if b'csd-code="110104"' in m]
        assert study_uid.encode() in received_xml[0]
        for message in messages:
            assert message.startswith(b"<85>1 ")
            ET.fromstring(message[message.index(b"<?xml") :])

        # Restart unchanged: no configuration alert. Change the configuration: an alert.
        node.stop()
        node.start()
        assert not [r for r in _audit(node) if r["kind"] == "configuration-changed"]
        node.stop()
        node.quiet_period_s = 7
        node.write_config()
        node.start()
        (changed,) = [r for r in _audit(node) if r["kind"] == "configuration-changed"]
        assert changed["detail"]["previous_sha256"] != changed["detail"]["settings_sha256"]
        starts = [r for r in _audit(node) if r["kind"] == "application-start"]
        stops = [r for r in _audit(node) if r["kind"] == "application-stop"]
        assert (len(starts), len(stops)) == (3, 2)

        csv_out = tmp_path / "audit.csv"
        exported = node.cli("audit", "export", "--format", "csv", "--out", str(csv_out))
        assert exported.returncode == 0, exported.stderr
        lines = csv_out.read_text().splitlines()
        assert lines[0].startswith("id,at,kind,event_id")
        assert len(lines) == len(_audit(node)) + 1
    finally:
        node.stop()
        collector.close()


def test_audit_settings_reject_a_bad_syslog_address(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "n", extra_toml='[audit]\nsyslog = "tcp://collector"\n')
    result = node.cli("config", "check")
    assert result.returncode == 2
    assert "audit.syslog" in result.stderr


def test_failed_page_logins_and_repeated_reads_are_audited_once_per_minute(
    tmp_path: Path,
) -> None:
    from tests.web import bearer, web_client

    with web_client(tmp_path) as (client, ctx):
        for _ in range(3):
            page = client.post("/login", content="token=pai_wrong", follow_redirects=False)
            assert page.status_code == 401
        headers = bearer(ctx, "admin", name="reader")
        for _ in range(5):
            assert client.get("/dicomweb/studies", headers=headers).status_code == 204
        trail = rows(ctx.engine)
    failed = [r for r in trail if r["kind"] == "authentication-failed"]
    assert [(r["target"], r["detail"]["reason"]) for r in failed] == [
        ("/login", "bad or revoked token")
    ]
    (query,) = [r for r in trail if r["kind"] == "query"]  # five queries, one minute: one row
    assert (query["actor"], query["target"]) == ("reader", "/dicomweb/studies")


def test_stow_uploads_and_study_pages_are_audited_by_study_uid(tmp_path: Path) -> None:
    from tests.web import bearer, web_client

    source = real_file("CT_small.dcm")
    study_uid = dcmread(source).StudyInstanceUID
    boundary = "auditBOUNDARY"
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + source.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    with web_client(tmp_path) as (client, ctx):
        stored = client.post(
            "/dicomweb/studies",
            content=body,
            headers={
                **bearer(ctx, "integration", name="ris"),
                "Content-Type": f"multipart/related; type=application/dicom; boundary={boundary}",
            },
        )
        assert stored.status_code == 200
        reader = bearer(ctx, "radiologist", name="dr-who")
        assert client.get("/api/studies/1", headers=reader).status_code == 200
        trail = rows(ctx.engine)
    (received,) = [r for r in trail if r["kind"] == "instances-received"]
    assert (received["actor"], received["target"]) == ("ris", study_uid)
    assert received["detail"] == {"instances": 1, "protocol": "STOW-RS"}
    (opened,) = [r for r in trail if r["kind"] == "instances-accessed"]
    assert (opened["actor"], opened["target"]) == ("dr-who", study_uid)

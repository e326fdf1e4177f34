"""What a broken or hostile sender gets: the right status, a quarantined object, a live node."""

from __future__ import annotations

import json
import os
import socket
import struct
from pathlib import Path

import pytest
from pydicom import dcmread

from pacs_ai.dicom.part10 import part10
from tests.dicom_peer import association, store, store_all
from tests.peers import NodeProcess, echoscu_ok
from tests.realdata import dataset_bytes, real_file

pytestmark = pytest.mark.slow


def quarantined(node: NodeProcess) -> list[dict[str, object]]:
    assert node.data_dir is not None
    return [
        json.loads(p.read_text()) for p in sorted((node.data_dir / "quarantine").glob("*.json"))
    ]


def spooled(node: NodeProcess) -> list[Path]:
    assert node.data_dir is not None
    return sorted((node.data_dir / "studies").rglob("*.dcm"))


def assert_no_half_files(node: NodeProcess) -> None:
    assert node.data_dir is not None
    assert list((node.data_dir / "tmp").iterdir()) == []


def variant(tmp_path: Path, name: str, **changes: str) -> Path:
    ds = dcmread(real_file("CT_small.dcm"))
    for keyword, value in changes.items():
        if value == "":
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path


def relabelled(tmp_path: Path, name: str, sop_class: str = "", sop_instance: str = "") -> Path:
    """CT_small's data set under a file meta that claims another SOP class or instance.

    pynetdicom takes the request's Affected SOP Class/Instance UID from the file meta, so the
    request and the data set it carries disagree, as with a buggy sender.
    """
    source = real_file("CT_small.dcm")
    ds = dcmread(source, stop_before_pixels=True)
    path = tmp_path / name
    path.write_bytes(
        part10(
            sop_class or ds.SOPClassUID,
            sop_instance or ds.SOPInstanceUID,
            ds.file_meta.TransferSyntaxUID,
            "",
            dataset_bytes(source.read_bytes()),
        ).joined()
    )
    return path


def test_each_bad_object_gets_its_status_and_is_quarantined(
    node: NodeProcess, tmp_path: Path
) -> None:
    good = real_file("CT_small.dcm")
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(good.read_bytes()[:-5000])  # cut inside the pixel data
    cases = {
        truncated: (0xC000, "truncated"),
        variant(tmp_path, "no_study.dcm", StudyInstanceUID="", SeriesInstanceUID=""): (
            0xC001,
            "Missing StudyInstanceUID, SeriesInstanceUID",
        ),
        variant(tmp_path, "traversal.dcm", StudyInstanceUID="../../../../escape"): (
            0xC002,
            "Invalid StudyInstanceUID",
        ),
        relabelled(tmp_path, "mismatch.dcm", sop_instance="1.2.3.999"): (
            0xC003,
            "SOPInstanceUID differs from request",
        ),
        relabelled(tmp_path, "wrong_class.dcm", sop_class="1.2.840.10008.5.1.4.1.1.4"): (
            0xA900,
            "SOPClassUID differs from request",
        ),
    }
    results = store_all(node.port, [*cases, good])
    for path, status, comment in results[:-1]:
        expected_status, expected_comment = cases[path]
        assert hex(status) == hex(expected_status), path.name
        assert expected_comment in comment and len(comment) <= 64, path.name
    assert results[-1][1] == 0x0000  # the same association still stores a good object

    reasons = quarantined(node)
    assert len(reasons) == len(cases)
    assert sorted(r["status"] for r in reasons) == sorted(f"0x{s:04X}" for s, _ in cases.values())
    assert all(r["calling_ae"] == "TESTSCU" and r["reason"] for r in reasons)
    assert [p.name for p in spooled(node)] == [f"{dcmread(good).SOPInstanceUID}.dcm"]
    assert node.data_dir is not None
    assert not (node.data_dir.parent / "escape").exists()
    assert not any(p.name == "escape" for p in node.data_dir.parent.rglob("escape"))
    assert_no_half_files(node)
    assert echoscu_ok("PACSAI", node.port)


def test_a_peer_that_aborts_mid_association_loses_nothing_acknowledged(node: NodeProcess) -> None:
    files = [real_file("CT_small.dcm"), real_file("MR_small.dcm"), real_file("rtplan.dcm")]
    with association(node.port, files) as assoc:
        assert store(assoc, files[0])[0] == 0 and store(assoc, files[1])[0] == 0
        assoc.abort()
    assert echoscu_ok("PACSAI", node.port)
    stored = {p.name for p in spooled(node)}
    assert stored == {f"{dcmread(f).SOPInstanceUID}.dcm" for f in files[:2]}
    assert node.cli_json("status")["counts"]["instances"] == 2
    assert_no_half_files(node)


def test_a_peer_that_dies_inside_a_pdu_is_survived(node: NodeProcess) -> None:
    files = [real_file("CT_small.dcm")]
    with association(node.port, files) as assoc:
        raw = assoc.dul.socket.socket
        # A P-DATA-TF PDU announcing 1 MiB, of which only 1000 bytes ever come.
        raw.sendall(struct.pack(">BBI", 0x04, 0, 1 << 20) + os.urandom(1000))
        raw.shutdown(socket.SHUT_RDWR)
        raw.close()
        assoc.is_established = False  # nothing left to release
    assert echoscu_ok("PACSAI", node.port)
    assert spooled(node) == []
    assert_no_half_files(node)


def test_garbage_instead_of_dicom_is_survived(node: NodeProcess) -> None:
    payloads = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        os.urandom(5000),
        # An A-ASSOCIATE-RQ header announcing a 4 GiB PDU: must not make the node allocate it.
        b"\x01\x00" + b"\xff" * 4 + os.urandom(100),
    ]
    for payload in payloads:
        with socket.create_connection(("127.0.0.1", node.port), timeout=10) as conn:
            conn.sendall(payload)
        assert echoscu_ok("PACSAI", node.port)
    assert node.process is not None and node.process.poll() is None
    rss_kib = int(
        Path(f"/proc/{node.process.pid}/status").read_text().split("VmRSS:")[1].split()[0]
    )
    assert rss_kib < 1_000_000

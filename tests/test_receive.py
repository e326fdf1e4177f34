"""The node receiving from dcmtk's storescu: real files, real transfer syntaxes, real studies."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from pacs_ai.phantoms.chest_ct import ChestTruth
from tests.dicom_peer import store_all
from tests.peers import NodeProcess, dcmtk, echoscu_ok, wait_for
from tests.realdata import TRANSFER_SYNTAX_SAMPLES, dataset_bytes, real_file

pytestmark = pytest.mark.slow


# dcmtk storescu proposes a compressed syntax only when told which.
STORESCU_PROPOSAL = {
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
}


def wait_complete(
    node: NodeProcess, count: int = 1, timeout: float = 60
) -> list[dict[str, object]]:
    found: list[dict[str, object]] = []

    def done() -> bool:
        nonlocal found
        found = node.studies()
        return len(found) == count and all(s["state"] == "COMPLETE" for s in found)

    wait_for(done, timeout, f"{count} COMPLETE studies", interval=0.3)
    return found


def send_study_folder(node: NodeProcess, chest_ct: ChestTruth) -> list[dict[str, object]]:
    """storescu the whole phantom study (+sd +r) and wait for it to complete."""
    folder = chest_ct.files[0].parent.parent
    result = dcmtk(
        "storescu",
        "+sd",
        "+r",
        "-aec",
        "PACSAI",
        "127.0.0.1",
        str(node.port),
        str(folder),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return wait_complete(node)


def test_echo_from_dcmtk(node: NodeProcess) -> None:
    result = dcmtk(
        "echoscu", "-v", "-aet", "MODALITY", "-aec", "PACSAI", "127.0.0.1", str(node.port)
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Received Echo Response (Success)" in result.stdout + result.stderr


def test_wrong_called_ae_is_rejected_not_aborted(node: NodeProcess) -> None:
    result = dcmtk("echoscu", "-aec", "SOMEONE_ELSE", "127.0.0.1", str(node.port))
    assert result.returncode != 0
    assert "Called AE Title Not Recognized" in result.stdout + result.stderr
    assert echoscu_ok("PACSAI", node.port)


def _unique_copies(tmp_path: Path) -> list[Path]:
    # Several samples are one data set in different encodings (same SOP Instance UID); give
    # each copy its own UID so each is stored rather than counted as a duplicate.
    sources = []
    for name, syntax in TRANSFER_SYNTAX_SAMPLES.items():
        ds = dcmread(real_file(name))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        copy = tmp_path / "send" / name
        copy.parent.mkdir(exist_ok=True)
        ds.save_as(copy, enforce_file_format=True)
        assert dcmread(copy, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
        sources.append(copy)
    return sources


def _elements(ds: Dataset) -> dict[int, object]:
    # Group lengths and trailing padding are optional, and dcmtk drops both when it sends.
    return {int(e.tag): e.value for e in ds if e.tag.element != 0x0000 and e.tag != 0xFFFCFFFC}


def test_every_common_transfer_syntax_from_dcmtk(node: NodeProcess, tmp_path: Path) -> None:
    sources = _unique_copies(tmp_path)
    for source in sources:
        # +C puts the compressed syntax and the native ones in one context, so the node must
        # pick the sender's first choice (the file's own syntax) for the file to go unchanged.
        flag = STORESCU_PROPOSAL[TRANSFER_SYNTAX_SAMPLES[source.name]]
        result = dcmtk(
            "storescu", "-R", "+C", flag, "-aec", "PACSAI", "127.0.0.1", str(node.port), str(source)
        )
        assert result.returncode == 0, source.name + result.stdout + result.stderr
    for source in sources:
        stored = node.stored_path(source)
        assert stored.exists(), f"{source.name} was not stored"
        kept, sent = dcmread(stored), dcmread(source)
        # dcmtk re-encodes what it sends (group lengths, padding), so compare element by
        # element; the compressed pixel data must arrive untouched, in the file's syntax.
        assert kept.file_meta.TransferSyntaxUID == TRANSFER_SYNTAX_SAMPLES[source.name]
        assert kept.PixelData == sent.PixelData, source.name
        assert _elements(kept) == _elements(sent), source.name
        assert kept.file_meta.SourceApplicationEntityTitle == "STORESCU"
    instances = sum(int(s["instance_count"]) for s in node.studies())
    assert instances == len(sources)


def test_data_sets_are_kept_byte_for_byte(node: NodeProcess, tmp_path: Path) -> None:
    # pynetdicom in chunked mode sends a file's data set bytes exactly as they are on disk.
    sources = _unique_copies(tmp_path)
    results = store_all(node.port, sources, calling_ae="RAWSENDER")
    assert [status for _, status, _ in results] == [0] * len(sources)
    for source in sources:
        kept = node.stored_path(source).read_bytes()
        assert dataset_bytes(kept) == dataset_bytes(source.read_bytes()), source.name
        meta = dcmread(node.stored_path(source), stop_before_pixels=True).file_meta
        assert meta.TransferSyntaxUID == TRANSFER_SYNTAX_SAMPLES[source.name]


def test_resent_instances_are_stored_once_and_counted(node: NodeProcess) -> None:
    files = [str(real_file("CT_small.dcm")), str(real_file("MR_small.dcm"))]
    for _ in range(3):
        assert (
            dcmtk("storescu", "-aec", "PACSAI", "127.0.0.1", str(node.port), *files).returncode == 0
        )
    status = node.cli_json("status")
    assert status["counts"]["instances"] == 2
    assert status["counts"]["duplicates"] == 4


def test_multi_series_ct_study_is_assembled(node: NodeProcess, chest_ct: ChestTruth) -> None:
    (study,) = send_study_folder(node, chest_ct)
    assert study["study_instance_uid"] == chest_ct.study_instance_uid
    assert (study["series_count"], study["instance_count"]) == (3, 451)
    assert study["calling_ae"] == "STORESCU" and study["modalities"] == "CT"
    assert study["accession_number"] == "ACC0001"
    (shown,) = node.cli_json("studies", "show", chest_ct.study_instance_uid)
    series = {s["series_description"]: s["instance_count"] for s in shown["series"]}
    assert series == {"SCOUT": 1, "AXIAL 1.25 SOFT TISSUE": 300, "AXIAL 2.5 LUNG": 150}


def test_late_instance_reopens_a_complete_study(node: NodeProcess, chest_ct: ChestTruth) -> None:
    first, late = chest_ct.files[1:40], chest_ct.files[40]
    assert (
        dcmtk(
            "storescu", "-aec", "PACSAI", "127.0.0.1", str(node.port), *map(str, first)
        ).returncode
        == 0
    )
    wait_complete(node)
    assert (
        dcmtk("storescu", "-aec", "PACSAI", "127.0.0.1", str(node.port), str(late)).returncode == 0
    )
    (study,) = node.studies()
    assert study["reopened"] == 1
    (study,) = wait_complete(node)
    assert study["instance_count"] == 40 and study["completions"] == 2


def test_several_receiver_processes_share_one_port(
    node_factory: type[NodeProcess], tmp_path: Path, chest_ct: ChestTruth
) -> None:
    node = node_factory(tmp_path / "multi", receivers=2).start()
    # The port answers as soon as one receiver is up: wait for the node to say both are.
    wait_for(lambda: b"receiver processes share" in node.log.read_bytes(), 30, "receivers up")
    receivers = node.receiver_pids()
    assert len(receivers) == 2, "expected two receiver processes"
    _assert_split_evenly(node, receivers)
    files = [str(f) for f in chest_ct.files if f.parent.name == "002"]
    senders = [
        subprocess.Popen(
            ["/usr/bin/storescu", "-aec", "PACSAI", "127.0.0.1", str(node.port), *files[k::4]],
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        for k in range(4)
    ]
    assert [p.wait(300) for p in senders] == [0, 0, 0, 0]
    (study,) = wait_complete(node)
    assert study["instance_count"] == 300 and study["series_count"] == 1
    # Every file landed once, whichever process took its association.
    assert len(list((node.data_dir / "studies").rglob("*.dcm"))) == 300  # type: ignore[operator]
    assert time.time() - float(study["last_received_at"]) >= 1.0  # type: ignore[arg-type]


def test_a_receiver_that_dies_is_replaced_and_shares_the_work_again(
    node_factory: type[NodeProcess], tmp_path: Path, chest_ct: ChestTruth
) -> None:
    node = node_factory(tmp_path / "replace", receivers=2).start()
    wait_for(lambda: b"receiver processes share" in node.log.read_bytes(), 30, "receivers up")
    first = node.receiver_pids()
    os.kill(first[0], signal.SIGKILL)
    wait_for(lambda: b"restarting" in node.log.read_bytes(), 30, "the node to notice")
    wait_for(lambda: len(set(node.receiver_pids()) - {first[0]}) == 2, 60, "a new receiver")
    # The survivor answers the port meanwhile; wait for the new one to say it listens too.
    wait_for(lambda: node.log.read_bytes().count(b"listening for DICOM") >= 3, 60, "listening")
    _assert_split_evenly(node, node.receiver_pids())
    files = [f for f in chest_ct.files if f.parent.name == "002"][:20]
    assert (
        dcmtk(
            "storescu", "-aec", "PACSAI", "127.0.0.1", str(node.port), *map(str, files)
        ).returncode
        == 0
    )
    (study,) = wait_complete(node)
    assert study["instance_count"] == 20
    # And it still stops by itself on SIGTERM: nothing waits for the receiver that was killed
    # (a multiprocessing Event it had been waiting on hung the stop until the node was killed).
    assert node.stop(timeout=60) == 0
    assert b"pacs-ai stopped" in node.log.read_bytes()


def _assert_split_evenly(node: NodeProcess, receivers: list[int]) -> None:
    """Associations go to the least busy receiver, not wherever a hash sends them: four
    opened one after another end up two and two."""
    ae = AE(ae_title="BALANCE")
    ae.add_requested_context(Verification)
    held = [ae.associate("127.0.0.1", node.port, ae_title="PACSAI") for _ in range(4)]
    try:
        assert all(a.is_established for a in held)
        assert sorted(_connections_held(receivers, node.port).values()) == [2, 2]
    finally:
        for assoc in held:
            assoc.release()


def _connections_held(pids: list[int], port: int) -> dict[int, int]:
    """How many established TCP connections on ``port`` each process holds (from /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == "01":  # 01: ESTABLISHED
                inodes.add(f"socket:[{fields[9]}]")
    held = {}
    for pid in pids:
        links = []
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                links.append(os.readlink(fd))
        held[pid] = sum(link in inodes for link in links)
    return held


@pytest.mark.postgres
def test_node_on_postgresql(
    node_factory: type[NodeProcess], tmp_path: Path, postgres_url: str, chest_ct: ChestTruth
) -> None:
    node = node_factory(tmp_path / "pg", receivers=2, database_url=postgres_url).start()
    (study,) = send_study_folder(node, chest_ct)
    assert (study["series_count"], study["instance_count"]) == (3, 451)
    assert node.data_dir is not None
    assert not (node.data_dir / "index.sqlite3").exists()  # the index really is in PostgreSQL

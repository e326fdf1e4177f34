"""Stopping the node while a modality is sending loses nothing it acknowledged."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from pacs_ai.phantoms.chest_ct import ChestTruth
from tests.dicom_peer import send_until_refused
from tests.peers import NodeProcess, dcmtk, kill_tree, wait_for
from tests.realdata import dataset_bytes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def five_hundred(chest_ct: ChestTruth, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """500 instances of the chest CT study: both axial series (450) and a 50-slice thick-slab
    series made from the lung-kernel slices, with UIDs of its own."""
    files = [f for f in chest_ct.files if f.parent.name in ("002", "003")]
    folder = tmp_path_factory.mktemp("slab")
    series_uid = generate_uid(entropy_srcs=[chest_ct.study_instance_uid, "slab"])
    lung = [f for f in files if f.parent.name == "003"]
    for i, source in enumerate(lung[:50]):
        ds = dcmread(source)
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 4
        ds.SeriesDescription = "LUNG SLAB"
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[series_uid, str(i)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = folder / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


@pytest.mark.parametrize(
    "receivers, signum",
    [(1, signal.SIGTERM), (2, signal.SIGTERM), (2, signal.SIGKILL)],
    ids=["sigterm-1-receiver", "sigterm-2-receivers", "sigkill-2-receivers"],
)
def test_stopping_or_killing_during_ingest_keeps_every_acknowledged_instance(
    node_factory: type[NodeProcess],
    tmp_path: Path,
    five_hundred: list[Path],
    receivers: int,
    signum: signal.Signals,
) -> None:
    node = node_factory(
        tmp_path / "node", receivers=receivers, extra_node={"drain_timeout_s": 0.1}
    ).start()
    # 500 instances of one study over four associations at once: more than the node can take
    # in during the short drain.
    files = five_hundred
    assert len(files) == 500
    acked: list[Path] = []
    lock = threading.Lock()
    senders = [
        threading.Thread(target=send_until_refused, args=(node.port, files[k::4], acked, lock))
        for k in range(4)
    ]
    for t in senders:
        t.start()
    wait_for(lambda: len(acked) >= 40, 60, "40 acknowledged instances")
    assert node.process is not None
    if signum == signal.SIGKILL:
        # Kill the whole node at once, receivers included: no handler runs, nothing drains.
        kill_tree(node.process.pid)
        node.process.wait(30)
    else:
        node.signal(signal.SIGTERM)
        assert node.process.wait(30) == 0
    for t in senders:
        t.join(60)
    node.stop()
    assert 40 <= len(acked) < len(files), "the stop should have interrupted the senders"

    # Every acknowledged instance is on disk, whole, and indexed; no half-written file anywhere.
    assert node.data_dir is not None
    for path in acked:
        kept = node.stored_path(path)
        assert dataset_bytes(kept.read_bytes()) == dataset_bytes(path.read_bytes())
    if signum != signal.SIGKILL:
        assert list((node.data_dir / "tmp").iterdir()) == []
    # No half-written file ever stands under its final name: every .dcm in the spool is whole.
    for path in (node.data_dir / "studies").rglob("*.dcm"):
        dcmread(path)
    node.start()
    assert list((node.data_dir / "tmp").iterdir()) == []  # a restart clears what was never acked
    indexed = node.cli_json("status")["counts"]["instances"]
    assert indexed >= len(acked)

    # The modality retries what was not acknowledged; the study then completes whole.
    rest = [f for f in files if f not in set(acked)]
    again: list[Path] = []
    send_until_refused(node.port, rest, again, lock)
    assert len(again) == len(rest)
    wait_for(lambda: node.studies()[0]["state"] == "COMPLETE", 60, "completion")
    (study,) = node.studies()
    assert study["instance_count"] == len(files)


def test_receivers_of_a_killed_node_stop_and_free_the_port(
    node_factory: type[NodeProcess], tmp_path: Path, chest_ct: ChestTruth
) -> None:
    node = node_factory(tmp_path / "node", receivers=2).start()
    assert node.process is not None
    pid = node.process.pid
    children, receivers = node.children(), node.receiver_pids()
    assert len(receivers) == 2
    # Only the node itself, as the OOM killer would: no handler runs, nobody tells the
    # receivers to stop.
    os.kill(pid, signal.SIGKILL)
    node.process.wait(30)
    wait_for(lambda: not any(_alive(kid) for kid in receivers), 15, "the receivers to stop")
    for kid in children:  # the rest of the tree (embedded worker, Redis) is not under test
        if _alive(kid):
            kill_tree(kid)
    # The port is free again: the node starts on it and takes images.
    node.process = None
    node.log_file.close()
    node.start()
    files = [f for f in chest_ct.files if f.parent.name == "002"][:5]
    stored = dcmtk("storescu", "-aec", "PACSAI", "127.0.0.1", str(node.port), *map(str, files))
    assert stored.returncode == 0, stored.stderr


def _alive(pid: int) -> bool:
    """Running, not a zombie left for a parent that is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status

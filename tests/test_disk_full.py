"""A real full disk: a small tmpfs as the data dir (needs root to mount; CI runs as root)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pacs_ai.phantoms.chest_ct import ChestTruth
from tests.dicom_peer import association, store
from tests.peers import NodeProcess, dcmtk, echoscu_ok

pytestmark = pytest.mark.slow


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_answers_a700_then_resumes_when_space_is_freed(
    node_factory: type[NodeProcess], tmp_path: Path, small_disk: Path, chest_ct: ChestTruth
) -> None:
    node = node_factory(tmp_path / "node", data_dir=small_disk / "data", reserve_mb=4).start()
    files = [f for f in chest_ct.files if f.parent.name == "002"][:60]  # 60 x 512 KiB > 24 MiB

    with association(node.port, files) as assoc:
        statuses = [(path, store(assoc, path)) for path in files]
    codes = [status for _, (status, _) in statuses]
    stored = [path for path, (status, _) in statuses if status == 0x0000]
    refused = [path for path, (status, _) in statuses if status == 0xA700]
    assert len(stored) + len(refused) == len(files), set(codes)
    assert len(stored) >= 20 and refused, "the disk should have filled part-way"
    # Once full, everything after is refused: nothing slips in below the reserve.
    assert codes == [0x0000] * len(stored) + [0xA700] * len(refused)
    assert all("retry later" in comment for _, (status, comment) in statuses if status == 0xA700)
    assert list((small_disk / "data" / "tmp").iterdir()) == []  # nothing half-written

    # Fill the rest of the reserve: new associations are now refused as transient congestion.
    ballast = small_disk / "ballast"
    subprocess.run(
        ["fallocate", "-l", str(_free_bytes(small_disk) - 2**20), str(ballast)], check=True
    )
    refused_assoc = dcmtk("echoscu", "-aec", "PACSAI", "127.0.0.1", str(node.port))
    assert refused_assoc.returncode != 0
    assert "Temporary Congestion" in refused_assoc.stdout + refused_assoc.stderr

    # Space comes back; the node resumes by itself and the sender's retry completes the study.
    ballast.unlink()
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    assert echoscu_ok("PACSAI", node.port)
    with association(node.port, refused) as assoc:
        assert [store(assoc, path)[0] for path in refused] == [0x0000] * len(refused)
    assert node.cli_json("status")["counts"]["instances"] == len(files)

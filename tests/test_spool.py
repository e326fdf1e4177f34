from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pacs_ai.errors import OutOfSpace
from pacs_ai.storage.spool import Spool, is_valid_uid


@pytest.mark.parametrize(
    "uid, valid",
    [
        ("1.2.840.10008.5.1.4.1.1.2", True),
        ("1.2.3.0004", True),  # leading zeros are wrong per PS3.5 but common; harmless in a path
        ("1" * 64, True),
        ("1" * 65, False),
        ("", False),
        ("../../etc/passwd", False),
        ("1.2..3", False),
        (".1.2", False),
        ("1.2.", False),
        ("1.2/3", False),
        ("1.2.3\x00", False),
        ("1.2.3 ", False),
        (None, False),
    ],
)
def test_uid_validation(uid: str, valid: bool) -> None:
    assert is_valid_uid(uid) is valid


def test_store_is_atomic_and_durable_in_the_documented_layout(tmp_path: Path) -> None:
    spool = Spool(tmp_path, reserve_bytes=0)
    spool.prepare()
    rel = spool.store("1.2.3", "1.2.3.4", "1.2.3.4.5", b"payload")
    assert rel == Path("1.2.3/1.2.3.4/1.2.3.4.5.dcm")
    assert (tmp_path / "studies" / rel).read_bytes() == b"payload"
    assert list((tmp_path / "tmp").iterdir()) == []  # the temp file became the final one


def test_paths_are_never_built_from_invalid_uids(tmp_path: Path) -> None:
    spool = Spool(tmp_path, reserve_bytes=0)
    spool.prepare()
    with pytest.raises(ValueError):
        spool.store("..", "1.2", "1.2.3", b"x")
    assert not any((tmp_path / "studies").iterdir())


def test_reserve_refuses_before_writing(tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    spool = Spool(tmp_path, reserve_bytes=free + 2**30)
    spool.prepare()
    assert not spool.has_room()
    with pytest.raises(OutOfSpace, match="reserve"):
        spool.store("1.2.3", "1.2.3.4", "1.2.3.4.5", b"x" * 1000)
    assert not any((tmp_path / "studies").iterdir())
    assert not any((tmp_path / "tmp").iterdir())


def test_stale_temp_files_are_cleared_only_on_request(tmp_path: Path) -> None:
    spool = Spool(tmp_path, reserve_bytes=0)
    spool.prepare()
    stale = tmp_path / "tmp" / "dead.part"
    stale.write_bytes(b"half")
    spool.prepare()
    assert stale.exists()
    spool.prepare(clean_tmp=True)
    assert not stale.exists()


def test_quarantine_keeps_bytes_and_reason(tmp_path: Path) -> None:
    spool = Spool(tmp_path, reserve_bytes=0)
    spool.prepare()
    kept = spool.quarantine(b"garbage", "cannot parse", {"calling_ae": "MOD"})
    assert kept.read_bytes() == b"garbage"
    meta = json.loads(kept.with_suffix(".json").read_text())
    assert meta["reason"] == "cannot parse" and meta["calling_ae"] == "MOD" and meta["size"] == 7
    assert spool.quarantine_count() == 1

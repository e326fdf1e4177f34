"""The spool's fast paths: O_DIRECT writes and shared folder fsyncs, same bytes, same promises."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from pacs_ai.dicom.part10 import Part10
from pacs_ai.storage import spool as spool_module
from pacs_ai.storage.spool import Spool

SIZES = [0, 1, 4095, 4096, 4097, 512 * 1024 + 1234, (4 << 20) - 1, 4 << 20, (9 << 20) + 3]


@pytest.mark.parametrize("size", SIZES)
def test_stored_bytes_are_exactly_the_received_bytes(tmp_path: Path, size: int) -> None:
    spool = Spool(tmp_path, reserve_bytes=0)
    spool.prepare()
    data = os.urandom(size)
    relative = spool.store("1.2.3", "1.2.3.4", f"1.2.3.4.{size}", data)
    assert spool.path_of(relative).read_bytes() == data
    assert list((tmp_path / "tmp").iterdir()) == []


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("prefix_size", [0, 300, 4096, 5000])
def test_a_file_in_two_pieces_is_stored_as_they_join(
    tmp_path: Path, size: int, prefix_size: int
) -> None:
    # The receiver hands over its file meta and the data set apart; the pieces meet only in
    # the aligned write buffer, whose chunks they straddle at every size here.
    spool = Spool(tmp_path, reserve_bytes=0)
    spool.prepare()
    data = Part10(os.urandom(prefix_size), os.urandom(size))
    relative = spool.store("1.2.3", "1.2.3.4", f"1.2.3.4.{size}.{prefix_size}", data)
    assert spool.path_of(relative).read_bytes() == data.joined()
    if size + prefix_size >= 4096 and not spool._writer.enabled:
        pytest.skip("this filesystem refuses O_DIRECT: the aligned buffer was not used")


def test_direct_writes_are_used_where_the_filesystem_allows(tmp_path: Path) -> None:
    spool = Spool(tmp_path, reserve_bytes=0)
    spool.prepare()
    spool.store("1.2.3", "1.2.3.4", "1.2.3.4.5", os.urandom(100_000))
    probe = tmp_path / "probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600))
    except OSError:
        pytest.skip("this filesystem refuses O_DIRECT")
    assert spool._writer.enabled


def test_a_refused_direct_write_falls_back_to_buffered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path, reserve_bytes=0)
    spool.prepare()
    real_write = os.write

    def picky_write(fd: int, data: object) -> int:
        if spool_module.fcntl.fcntl(fd, spool_module.fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0):
            raise OSError(22, "Invalid argument")
        return real_write(fd, data)  # type: ignore[arg-type]

    monkeypatch.setattr(spool_module.os, "write", picky_write)
    data = os.urandom(3 * 4096 + 17)
    relative = spool.store("1.2.3", "1.2.3.4", "1.2.3.4.6", data)
    assert spool.path_of(relative).read_bytes() == data
    assert not spool._writer.enabled
    again = spool.store("1.2.3", "1.2.3.4", "1.2.3.4.7", data)  # buffered from now on
    assert spool.path_of(again).read_bytes() == data


def test_concurrent_renames_share_folder_syncs_each_after_its_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path, reserve_bytes=0)
    spool.prepare()
    folder_files: list[set[str]] = []  # what the folder held when each fsync started
    real_fsync_dir = spool_module._fsync_dir

    def slow_fsync_dir(folder: Path) -> None:
        folder_files.append({p.name for p in folder.iterdir()})
        time.sleep(0.01)
        real_fsync_dir(folder)

    monkeypatch.setattr(spool_module, "_fsync_dir", slow_fsync_dir)
    returned: list[tuple[str, int]] = []
    lock = threading.Lock()

    def store(i: int) -> None:
        relative = spool.store("1.2.3", "1.2.3.4", f"1.2.3.4.{i}", b"x" * 5000)
        with lock:
            # How many fsyncs had started when this caller was told "durable".
            returned.append((relative.name, len(folder_files)))

    threads = [threading.Thread(target=store, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(returned) == 16
    assert len(folder_files) < 16  # shared
    for name, syncs_started in returned:
        # Some fsync that had started by the time the caller returned saw its name.
        assert any(name in files for files in folder_files[:syncs_started])


def test_a_failed_folder_sync_fails_every_rename_it_covered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path, reserve_bytes=0)
    spool.prepare()
    started = threading.Event()
    release = threading.Event()

    def failing_fsync_dir(folder: Path) -> None:
        started.set()
        release.wait(5)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(spool_module, "_fsync_dir", failing_fsync_dir)
    errors: list[BaseException] = []

    def store(i: int) -> None:
        try:
            spool.store("1.2.3", "1.2.3.4", f"1.2.3.4.{i}", b"y" * 100)
        except OSError as exc:
            errors.append(exc)

    first = threading.Thread(target=store, args=(1,))
    first.start()
    assert started.wait(5)
    others = [threading.Thread(target=store, args=(i,)) for i in range(2, 5)]
    for thread in others:
        thread.start()
    time.sleep(0.05)
    release.set()
    for thread in [first, *others]:
        thread.join()
    # The first caller's sync failed; the others retried on their own and failed too:
    # nobody was told "durable".
    assert len(errors) == 4
    assert spool._folder_sync._folders == {}

"""The spool: received instances as files, written so that an acknowledged one survives a crash.

Layout under the data dir::

    studies/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    tmp/          files being written; anything here after a restart was never acknowledged
    quarantine/   objects we refused, each ``<stamp>.dcm`` beside ``<stamp>.json`` saying why

A file reaches its final name only by ``os.replace`` after ``fsync``, and the folder that
holds it is synced after the rename, so a reader never sees half a file and a power cut
cannot take back a name we reported as stored.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import mmap
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pacs_ai.dicom.part10 import Part10
from pacs_ai.errors import OutOfSpace

logger = logging.getLogger(__name__)

# PS3.5 9.1: digits and dots, at most 64 characters. Empty components are refused too, which
# with the character set makes a UID safe as a path component ("..", "/" cannot occur).
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


# O_DIRECT wants buffer address, file offset and length aligned to the disk's logical block
# (512 or 4096 bytes on the disks we know); 4096 satisfies both.
_DIRECT_ALIGN = 4096
_DIRECT_CHUNK = 4 << 20
_DIRECT_POOL = 8


def is_valid_uid(value: object) -> bool:
    return isinstance(value, str) and len(value) <= 64 and _UID.match(value) is not None


class _DirectWriter:
    """Writes file contents with O_DIRECT where the filesystem allows it.

    A buffered write copies every byte into freshly allocated page cache, which measured as
    the largest single kernel cost of ingest (~1 ms of CPU per 512 KiB CT slice, against
    ~0.3 ms direct). The aligned bulk goes straight from a reused page-aligned buffer to the
    disk; the sub-block tail goes through the page cache, so no padding or truncation is
    needed. Durability is unchanged: the caller still fsyncs, which also flushes the disk's
    write cache.
    """

    def __init__(self) -> None:
        self.enabled = hasattr(os, "O_DIRECT")
        self._buffers: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def open_flags(self, size: int) -> int:
        direct = self.enabled and size >= _DIRECT_ALIGN
        return os.O_DIRECT if direct else 0

    def write(self, fd: int, data: bytes | Part10) -> None:
        """Write ``data`` at the start of ``fd`` (opened with :meth:`open_flags`)."""
        pieces = _pieces(data)
        size = sum(len(piece) for piece in pieces)
        bulk = size - size % _DIRECT_ALIGN
        if fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0):
            try:
                self._write_aligned(fd, pieces, bulk)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                # The filesystem or disk wants another alignment: buffered from now on.
                logger.warning("O_DIRECT writes refused (%s); using buffered writes", exc)
                self.enabled = False
                os.lseek(fd, 0, os.SEEK_SET)
                bulk = 0
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
        else:
            bulk = 0
        for part in _ranges(pieces, bulk, size):
            _write_all(fd, part)

    def _write_aligned(self, fd: int, pieces: list[memoryview], bulk: int) -> None:
        buffer = self._take()
        try:
            for start in range(0, bulk, _DIRECT_CHUNK):
                size = 0
                # The pieces meet in the aligned buffer: the one copy O_DIRECT needs anyway.
                for part in _ranges(pieces, start, min(start + _DIRECT_CHUNK, bulk)):
                    buffer[size : size + len(part)] = part
                    size += len(part)
                with memoryview(buffer) as aligned:
                    written = os.write(fd, aligned[:size])
                if written != size:
                    # A short direct write leaves the offset unaligned; let the caller redo it.
                    raise OSError(errno.EINVAL, "short O_DIRECT write")
        finally:
            self._give(buffer)

    def _take(self) -> mmap.mmap:
        with self._lock:
            if self._buffers:
                return self._buffers.pop()
        # Anonymous mmap memory is page aligned, as O_DIRECT needs.
        return mmap.mmap(-1, _DIRECT_CHUNK)

    def _give(self, buffer: mmap.mmap) -> None:
        with self._lock:
            if len(self._buffers) < _DIRECT_POOL:
                self._buffers.append(buffer)
                return
        buffer.close()


class _FolderSync:
    """fsync of a folder, shared by the renames into it that wait at the same time.

    Associations storing one series rename into the same folder at once. Each caller returns
    only after an fsync of the folder that *started* after its own rename finished, so each
    still waits for the sync that covers its name; concurrent callers just share one.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._folders: dict[Path, _FolderState] = {}

    def after_rename(self, folder: Path) -> None:
        with self._lock:
            state = self._folders.get(folder)
            if state is None:
                state = self._folders[folder] = _FolderState(self._lock)
            state.users += 1
            state.renamed += 1
            ticket = state.renamed
            try:
                self._wait_synced(folder, state, ticket)
            finally:
                state.users -= 1
                if not state.users:
                    del self._folders[folder]

    def _wait_synced(self, folder: Path, state: _FolderState, ticket: int) -> None:
        # Called and returns with self._lock held.
        while True:
            if state.error is not None and state.failed_up_to >= ticket:
                # A failed fsync leaves every rename it was meant to cover in doubt.
                raise state.error
            if state.synced >= ticket:
                return
            if state.syncing:
                state.changed.wait()
                continue
            state.syncing = True
            covers = state.renamed
            error: OSError | None = None
            self._lock.release()
            try:
                _fsync_dir(folder)
            except OSError as exc:
                error = exc
            finally:
                self._lock.acquire()
                state.syncing = False
                state.changed.notify_all()
            if error is not None:
                state.failed_up_to, state.error = covers, error
            else:
                state.synced = covers


class _FolderState:
    def __init__(self, lock: threading.Lock) -> None:
        self.changed = threading.Condition(lock)
        self.users = 0
        self.renamed = 0  # renames into the folder so far; each caller's ticket
        self.synced = 0  # every ticket up to this one is covered by a finished fsync
        self.syncing = False
        self.failed_up_to = 0
        self.error: OSError | None = None


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _pieces(data: bytes | Part10) -> list[memoryview]:
    if isinstance(data, Part10):
        return [memoryview(data.prefix), memoryview(data.data_set)]
    return [memoryview(data)]


def _ranges(pieces: list[memoryview], start: int, stop: int) -> Iterator[memoryview]:
    """Views of bytes ``start`` to ``stop`` of the pieces taken end to end."""
    offset = 0
    for piece in pieces:
        end = offset + len(piece)
        if end > start and offset < stop:
            yield piece[max(start - offset, 0) : min(stop, end) - offset]
        offset = end


class Spool:
    """Durable files for received instances, one per SOP Instance UID."""

    def __init__(self, data_dir: Path, reserve_bytes: int) -> None:
        self.root = data_dir / "studies"
        self.tmp = data_dir / "tmp"
        self.quarantine_dir = data_dir / "quarantine"
        self.reserve_bytes = reserve_bytes
        self._known_dirs: set[Path] = set()
        self._lock = threading.Lock()
        self._writer = _DirectWriter()
        self._folder_sync = _FolderSync()

    def prepare(self, clean_tmp: bool = False) -> None:
        """Create the folders; with ``clean_tmp`` drop leftovers of a previous run.

        Only the process that owns the data dir (the node, before it starts receivers)
        may clean: another receiver's temp file is in use.
        """
        for folder in (self.root, self.tmp, self.quarantine_dir):
            folder.mkdir(parents=True, exist_ok=True)
        if clean_tmp:
            stale = list(self.tmp.iterdir())
            for path in stale:
                path.unlink(missing_ok=True)
            if stale:
                logger.warning("removed %d unacknowledged temp files from %s", len(stale), self.tmp)

    def relative_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        for uid in (study_uid, series_uid, sop_uid):
            if not is_valid_uid(uid):
                # Callers validate first; this is the last line before a path is built.
                raise ValueError(f"refusing to build a path from invalid UID {uid!r}")
        return Path(study_uid) / series_uid / f"{sop_uid}.dcm"

    def path_of(self, relative: str | Path) -> Path:
        return self.root / relative

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def has_room(self, incoming: int = 0) -> bool:
        return self.free_bytes() - incoming >= self.reserve_bytes

    def check_room(self, incoming: int) -> None:
        free = self.free_bytes()
        if free - incoming < self.reserve_bytes:
            raise OutOfSpace(
                f"free disk {free // 2**20} MiB minus this object is below the reserve of "
                f"{self.reserve_bytes // 2**20} MiB"
            )

    def store(self, study_uid: str, series_uid: str, sop_uid: str, data: bytes | Part10) -> Path:
        """Write ``data`` durably to its final place; return the path relative to the spool."""
        return self.store_at(self.relative_path(study_uid, series_uid, sop_uid), data)

    def store_at(self, relative: Path, data: bytes | Part10) -> Path:
        """:meth:`store` to a path :meth:`relative_path` already built (and so checked)."""
        self.check_room(len(data))
        final = self.root / relative
        folder = final.parent
        if folder not in self._known_dirs:
            self._make_dirs(folder)
        tmp = self._write_tmp(data)
        try:
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._folder_sync.after_rename(folder)
        return relative

    def quarantine(self, data: bytes | Part10, reason: str, details: dict[str, Any]) -> Path:
        """Keep a refused object with the reason, so nobody has to ask the sender again."""
        stamp = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:12]
        target = self.quarantine_dir / f"{stamp}.dcm"
        meta = {"reason": reason, "received_at": time.time(), "size": len(data), **details}
        try:
            tmp = self._write_tmp(data)
            os.replace(tmp, target)
            (self.quarantine_dir / f"{stamp}.json").write_text(json.dumps(meta, indent=1))
            _fsync_dir(self.quarantine_dir)
        except OSError:
            logger.exception("could not quarantine a refused object (%s)", reason)
        return target

    def quarantine_count(self) -> int:
        try:
            return sum(1 for p in self.quarantine_dir.iterdir() if p.suffix == ".json")
        except FileNotFoundError:
            return 0

    def _write_tmp(self, data: bytes | Part10) -> Path:
        tmp = self.tmp / f"{uuid.uuid4().hex}.part"
        fd = self._open_new(tmp, len(data))
        try:
            self._writer.write(fd, data)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        return tmp

    def _open_new(self, path: Path, size: int) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        try:
            return os.open(path, flags | self._writer.open_flags(size), 0o640)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
        # Some filesystems refuse O_DIRECT only after creating the file.
        self._writer.enabled = False
        path.unlink(missing_ok=True)
        return os.open(path, flags, 0o640)

    def _make_dirs(self, folder: Path) -> None:
        with self._lock:
            created = []
            probe = folder
            while not probe.exists():
                created.append(probe)
                probe = probe.parent
            folder.mkdir(parents=True, exist_ok=True)
            # A new folder's name lives in its parent: sync parents so the path survives.
            for path in created:
                _fsync_dir(path.parent)
            self._known_dirs.add(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, data: bytes, tmp_dir: Path) -> None:
    """Write a whole file that is, after a crash, either absent or complete (results, exports).

    Same recipe as the spool: a temp file in ``tmp_dir`` (same file system), fsync, rename,
    fsync of the folder.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f"{uuid.uuid4().hex}.part"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        _write_all(fd, memoryview(data))
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)

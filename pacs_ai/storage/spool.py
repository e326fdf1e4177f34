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

import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from pacs_ai.errors import OutOfSpace

logger = logging.getLogger(__name__)

# PS3.5 9.1: digits and dots, at most 64 characters. Empty components are refused too, which
# with the character set makes a UID safe as a path component ("..", "/" cannot occur).
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def is_valid_uid(value: object) -> bool:
    return isinstance(value, str) and len(value) <= 64 and _UID.match(value) is not None


class Spool:
    """Durable files for received instances, one per SOP Instance UID."""

    def __init__(self, data_dir: Path, reserve_bytes: int) -> None:
        self.root = data_dir / "studies"
        self.tmp = data_dir / "tmp"
        self.quarantine_dir = data_dir / "quarantine"
        self.reserve_bytes = reserve_bytes
        self._known_dirs: set[Path] = set()
        self._lock = threading.Lock()

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

    def store(self, study_uid: str, series_uid: str, sop_uid: str, data: bytes) -> Path:
        """Write ``data`` durably to its final place; return the path relative to the spool."""
        relative = self.relative_path(study_uid, series_uid, sop_uid)
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
        _fsync_dir(folder)
        return relative

    def quarantine(self, data: bytes, reason: str, details: dict[str, Any]) -> Path:
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

    def _write_tmp(self, data: bytes) -> Path:
        tmp = self.tmp / f"{uuid.uuid4().hex}.part"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        return tmp

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

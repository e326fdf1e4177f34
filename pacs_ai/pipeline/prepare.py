"""Series read during their study's quiet period, so that the job finds its volume built.

A study is COMPLETE only once nothing has arrived for the quiet period (:mod:`.assemble`):
seconds to minutes in which the images are all there and the worker has nothing to do. Once a
study has been quiet for a moment, the node asks a worker (``pacs_ai.prepare``, with the
series id) to read each series a rule will run a model on and build its volume. The job that
comes with the completion takes that volume only if every file of the series is still the
one that was read: the same paths, and on each the same device, inode, size and modification
time. The spool never rewrites a file in place (a file reaches its name by ``os.replace``),
so a changed, added or removed instance changes that set, and the job reads the series
itself as it would without preparation. A wrong guess costs the worker's idle time and
nothing else.

The series is stamped *before* it is read: a file replaced while it is being read leaves a
stamp that no longer matches, never a match over stale content.

One :class:`PreparedSeries` per worker process. Celery runs one task at a time in a pool
process, so prepare and take never overlap.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from pacs_ai.errors import NotAVolume
from pacs_ai.imaging.volume import Volume, build_volume, load_series
from pacs_ai.pipeline.memory import collector_paused

logger = logging.getLogger(__name__)

FileStamp = tuple[str, int, int, int, int, int]
"""(path, device, inode, size, modification and change times in ns) of one file."""

MAX_AGE_S = 3600.0
"""A prepared series no job took within this long is dropped at the process's next prepare
or take (an idle worker keeps what it holds until then)."""

# What a prepared series holds per byte of its files, for uncompressed 16-bit CT: the pixel
# data in the data sets, and twice that in float32 voxels. Compressed files understate it;
# the size after the reading is checked against the budget again.
BYTES_PER_FILE_BYTE = 3


def stamps(paths: Sequence[Path]) -> frozenset[FileStamp]:
    """What identifies the content of each file, without reading it."""
    out = set()
    for path in paths:
        st = os.stat(path)
        out.add((str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return frozenset(out)


@dataclass(frozen=True)
class Prepared:
    """One series, read and built: what a job would have got from its own reading."""

    series_id: int
    files: frozenset[FileStamp]
    datasets: list[Dataset]
    volume: Volume
    nbytes: int
    seconds: float  # the reading and building, done while the study was quiet
    at: float  # when, on the monotonic clock


class PreparedSeries:
    """The series a worker process has prepared, oldest first, within ``budget_bytes``.

    ``paths_of`` lists a series' files as a job would read them (the node's index).
    """

    def __init__(
        self,
        budget_bytes: int,
        paths_of: Callable[[int], list[Path]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.budget_bytes = budget_bytes
        self.paths_of = paths_of
        self.clock = clock
        self.entries: OrderedDict[int, Prepared] = OrderedDict()

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.entries.values())

    def prepare(self, series_id: int) -> str:
        """Read series ``series_id`` and build its volume, unless that is pointless; say which.

        Returns PREPARED, UNCHANGED (already held, same files), SINGLE (one file: whether the
        model needs 3D decides its fate, not worth preparing), TOO_LARGE (over the budget),
        NOT_A_VOLUME (the job will say why), GONE (a file vanished: retention, or a re-sent
        instance) or FAILED (anything else; logged, and the job meets it again).
        """
        self._expire()
        try:
            paths = self.paths_of(series_id)
            if len(paths) < 2:
                return "SINGLE"
            files = stamps(paths)
        except OSError:
            return "GONE"
        except Exception:
            # The index out of reach, say: the task edge, and the job will meet it again.
            logger.exception("series %d not prepared", series_id)
            return "FAILED"
        held = self.entries.get(series_id)
        if held is not None and held.files == files:
            return "UNCHANGED"
        # The old copy goes before the new one is read: never two of one series in memory.
        self.entries.pop(series_id, None)
        estimate = BYTES_PER_FILE_BYTE * sum(stamp[3] for stamp in files)
        if estimate > self.budget_bytes:
            logger.info(
                "series %d not prepared: about %d MB, over worker.prepare_mb (%d MB)",
                series_id,
                estimate >> 20,
                self.budget_bytes >> 20,
            )
            return "TOO_LARGE"
        # Room before the reading, so that the worker never holds the budget and a new series.
        self._drop_oldest(self.budget_bytes - estimate)
        started = time.perf_counter()
        try:
            with collector_paused():
                datasets = load_series(paths)
                volume = build_volume(datasets)
        except OSError:
            return "GONE"
        except NotAVolume as exc:
            logger.info("series %d not prepared: %s", series_id, exc)
            return "NOT_A_VOLUME"
        except Exception:
            # The task edge: the job reads the series again and records what goes wrong.
            logger.exception("series %d not prepared", series_id)
            return "FAILED"
        nbytes = volume.voxels.nbytes + sum(stamp[3] for stamp in files)
        seconds = time.perf_counter() - started
        if nbytes > self.budget_bytes:
            logger.info(
                "series %d not kept: %d MB read, over worker.prepare_mb", series_id, nbytes >> 20
            )
            return "TOO_LARGE"
        self._drop_oldest(self.budget_bytes - nbytes)
        self.entries[series_id] = Prepared(
            series_id, files, datasets, volume, nbytes, seconds, self.clock()
        )
        logger.info(
            "series %s prepared: %d slices in %.2f s, %d MB held",
            volume.series_instance_uid,
            len(datasets),
            seconds,
            self.nbytes >> 20,
        )
        return "PREPARED"

    def take(self, series_id: int) -> Prepared | None:
        """The prepared series, if its files are still those that were read; it is let go
        either way (a job that changes the volume in place changes nobody else's)."""
        self._expire()
        held = self.entries.pop(series_id, None)
        if held is None:
            return None
        try:
            files = stamps(self.paths_of(series_id))
        except OSError:
            return None
        if files != held.files:
            logger.info(
                "series %s changed since it was prepared (%d files then, %d now): read again",
                held.volume.series_instance_uid,
                len(held.files),
                len(files),
            )
            return None
        return held

    def _drop_oldest(self, until_bytes: int) -> None:
        """Let the oldest prepared series go until at most ``until_bytes`` are held."""
        while self.entries and self.nbytes > until_bytes:
            dropped = self.entries.popitem(last=False)[1]
            logger.info("prepared series %d dropped for room", dropped.series_id)

    def _expire(self) -> None:
        cutoff = self.clock() - MAX_AGE_S
        for series_id in [s for s, p in self.entries.items() if p.at < cutoff]:
            del self.entries[series_id]

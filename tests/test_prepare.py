"""Series read during the quiet period: a job takes the prepared volume only when every file
is still the one that was read, and then gets exactly what its own reading would give.

Real files, written by the phantom, stored by the real ingest path where a job runs on them
(the real ``run_job``, as a Celery worker calls it; the broker is the only part missing, and
tests/test_ai_path.py has it).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from pacs_ai.imaging.volume import build_volume, load_series
from pacs_ai.phantoms.chest_ct import ChestTruth, Geometry, write_chest_ct
from pacs_ai.pipeline import jobs, prepare
from pacs_ai.pipeline.infer import run_job
from pacs_ai.pipeline.prepare import MAX_AGE_S, PreparedSeries
from pacs_ai.storage.schema import WORKER_STAGES
from tests.records import local_worker, node_on_disk, store_one_series

SMALL = Geometry(rows=64, columns=64, pixel_spacing_mm=5.6, slices=24, slice_thickness_mm=5)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> ChestTruth:
    return write_chest_ct(tmp_path_factory.mktemp("prepare"), SMALL, seed=5, with_lung_series=False)


@pytest.fixture
def files(phantom: ChestTruth, tmp_path: Path) -> dict[int, list[Path]]:
    """Series id → its files: a copy of the axial series (1) and of the scout (2), which each
    test may change."""
    out = {}
    for series_id, folder in ((1, "002"), (2, "001")):
        target = tmp_path / folder
        target.mkdir()
        for path in sorted(p for p in phantom.files if p.parent.name == folder):
            shutil.copy(path, target / path.name)
        out[series_id] = sorted(target.iterdir())
    return out


def cache(
    files: dict[int, list[Path]], budget: int = 1 << 30, clock: Clock | None = None
) -> PreparedSeries:
    return PreparedSeries(budget, lambda series_id: list(files[series_id]), clock or Clock())


def replace_file(path: Path, edit: Callable[[Dataset], None] | None = None) -> None:
    """A new file at the same path, as the spool writes one: a copy renamed over it."""
    ds = dcmread(path)
    if edit is not None:
        edit(ds)
    fresh = path.with_suffix(".tmp")
    ds.save_as(fresh)
    os.replace(fresh, path)


def test_the_prepared_volume_is_what_the_job_would_read(files: dict[int, list[Path]]) -> None:
    prepared = cache(files)
    assert prepared.prepare(1) == "PREPARED"
    assert prepared.prepare(1) == "UNCHANGED"  # the same files: not read twice
    held = prepared.take(1)
    assert held is not None and held.seconds > 0
    own = build_volume(load_series(files[1]))
    assert np.array_equal(held.volume.voxels, own.voxels)
    assert np.array_equal(held.volume.affine, own.affine)
    assert held.volume.spacing == own.spacing
    assert held.volume.sop_instance_uids == own.sop_instance_uids
    assert {str(ds.SOPInstanceUID) for ds in held.datasets} == set(own.sop_instance_uids)
    # Taken once: a second job on the series (another model) reads it itself.
    assert prepared.take(1) is None and prepared.nbytes == 0


def _add_a_file(files: list[Path]) -> None:
    extra = files[0].with_name("extra.dcm")
    shutil.copy(files[0], extra)
    files.append(extra)


def _remove_a_file(files: list[Path]) -> None:
    files.pop().unlink()


def _rewrite_a_file(files: list[Path]) -> None:
    # Byte for byte the same content, in a new file: the stamp cannot tell, so it must refuse.
    replace_file(files[5])


def _retouch_a_file(files: list[Path]) -> None:
    # The same file, written in place with a new modification time.
    os.utime(files[5], ns=(0, os.stat(files[5]).st_mtime_ns + 1))


@pytest.mark.parametrize("change", [_add_a_file, _remove_a_file, _rewrite_a_file, _retouch_a_file])
def test_a_series_changed_since_it_was_prepared_is_read_again(
    files: dict[int, list[Path]], change: Callable[[list[Path]], None]
) -> None:
    prepared = cache(files)
    assert prepared.prepare(1) == "PREPARED"
    change(files[1])
    assert prepared.take(1) is None
    assert prepared.nbytes == 0  # let go, not kept for a later take


def test_the_series_is_stamped_before_it_is_read(
    files: dict[int, list[Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slice replaced while the worker reads the series: whichever content was read, the
    stamp is of the old file, so the job reads the series again rather than trust it."""
    target = files[1][7]

    def darker(ds: Dataset) -> None:
        pixels = ds.pixel_array.copy()
        pixels[:] = pixels.min()
        ds.PixelData = pixels.tobytes()

    def read_while_replaced(paths: list[Path]) -> list[Dataset]:
        replace_file(target, darker)
        return load_series(paths)

    monkeypatch.setattr(prepare, "load_series", read_while_replaced)
    prepared = cache(files)
    assert prepared.prepare(1) == "PREPARED"
    assert prepared.take(1) is None


def test_series_not_worth_preparing_are_not_held(files: dict[int, list[Path]]) -> None:
    prepared = cache(files)
    assert prepared.prepare(2) == "SINGLE"  # the scout: one image
    files[3] = [files[2][0], files[1][0]]  # a scout and an axial slice: no volume
    assert prepared.prepare(3) == "NOT_A_VOLUME"
    files[4] = files[1][:3]
    files[4][1].unlink()
    assert prepared.prepare(4) == "GONE"
    assert prepared.entries == {}


def test_the_memory_budget_holds_the_newest_series_that_fit(
    files: dict[int, list[Path]], tmp_path: Path
) -> None:
    size = sum(p.stat().st_size for p in files[1])
    assert cache(files, budget=size).prepare(1) == "TOO_LARGE"  # 3 bytes held per file byte

    # Room for one series: preparing a second lets the first go.
    files[5] = []
    for path in files[1]:
        copy = tmp_path / "other" / path.name
        copy.parent.mkdir(exist_ok=True)
        shutil.copy(path, copy)
        files[5].append(copy)
    prepared = cache(files, budget=4 * size)
    assert prepared.prepare(1) == "PREPARED"
    one = prepared.nbytes
    assert size < one <= 3 * size
    assert prepared.prepare(5) == "PREPARED"
    assert list(prepared.entries) == [5] and prepared.nbytes == one
    assert prepared.take(1) is None and prepared.take(5) is not None


def test_a_series_larger_than_its_files_promised_is_not_kept(
    files: dict[int, list[Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compressed files understate the memory their series takes: the size read counts."""
    size = sum(p.stat().st_size for p in files[1])
    monkeypatch.setattr(prepare, "BYTES_PER_FILE_BYTE", 1)
    prepared = cache(files, budget=2 * size)
    assert prepared.prepare(1) == "TOO_LARGE"
    assert prepared.entries == {}


def test_an_index_out_of_reach_fails_the_preparation_not_the_worker(
    files: dict[int, list[Path]],
) -> None:
    def unreachable(series_id: int) -> list[Path]:
        raise RuntimeError("database down")

    assert PreparedSeries(1 << 30, unreachable, Clock()).prepare(1) == "FAILED"


def test_a_series_no_job_took_is_dropped_after_an_hour(files: dict[int, list[Path]]) -> None:
    clock = Clock()
    prepared = cache(files, clock=clock)
    assert prepared.prepare(1) == "PREPARED"
    clock.now += MAX_AGE_S + 1
    assert prepared.take(1) is None


def test_a_job_takes_the_prepared_series_and_writes_the_same_results(
    tmp_path: Path, database_url: str
) -> None:
    """Two jobs on one series, one after a preparation, one reading the series itself: the
    same SEG frames and the same findings. A slice that arrives after the preparation is in
    the next job's volume."""
    settings, ingest = node_on_disk(tmp_path, database_url)
    truth = write_chest_ct(tmp_path / "ct", SMALL, with_lung_series=False, with_scout=False)
    *early, last = sorted(truth.files, key=lambda p: float(dcmread(p).ImagePositionPatient[2]))
    study_id, series_id = store_one_series(ingest, early)
    ctx = local_worker(settings, ingest.engine)
    assert ctx.prepared is not None

    def job(rule: str) -> int:
        spec = jobs.JobSpec(
            study_id, series_id, "ct-organs-threshold", rule, jobs.Priority.ROUTINE, (), 1
        )
        ((job_id, _),), _ = jobs.create(ingest.engine, [spec], [], 3, 3, 0.0)
        assert run_job(ctx, job_id) == "ENCODED"
        return job_id

    def outcome(job_id: int) -> tuple[dict[str, float], str, np.ndarray, int]:
        row = jobs.job_row(ingest.engine, job_id)
        assert row is not None
        seg = dcmread(settings.node.data_dir / "results" / str(job_id) / "SEG.dcm")
        return json.loads(row.timings), row.findings, seg.pixel_array, seg.NumberOfFrames

    assert ctx.prepared.prepare(series_id) == "PREPARED"
    timings, findings, pixels, frames = outcome(job("prepared"))
    assert set(timings) == {*WORKER_STAGES, "prepared"}
    assert ctx.prepared.entries == {}
    own_timings, own_findings, own_pixels, own_frames = outcome(job("own"))
    assert set(own_timings) == set(WORKER_STAGES)
    assert (findings, frames) == (own_findings, own_frames)
    assert np.array_equal(pixels, own_pixels)

    # Prepared, then one more slice arrives before the study is complete.
    assert ctx.prepared.prepare(series_id) == "PREPARED"
    assert ingest.store(last.read_bytes(), "CT").status == 0
    late_timings, late_findings, _, late_frames = outcome(job("late"))
    assert "prepared" not in late_timings
    assert late_findings != findings and late_frames > frames
    ingest.close()

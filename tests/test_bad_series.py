"""Series a worker cannot turn into a volume end their job with the reason; the worker lives on.

Real files go through the real ingest path and the real ``run_job`` (what a Celery worker
calls), so the only thing missing is the broker.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from pacs_ai.phantoms.chest_ct import Geometry, write_chest_ct
from pacs_ai.pipeline import jobs
from pacs_ai.pipeline.infer import run_job
from pacs_ai.storage.schema import WORKER_STAGES, series, studies
from tests.records import local_worker, node_on_disk, store_one_series

SMALL = Geometry(rows=64, columns=64, pixel_spacing_mm=5.6, slices=24, slice_thickness_mm=5)


def _corrupt_pixels(path: Path) -> None:
    """Pixel Data shorter than Rows x Columns x 2 bytes: the header promises what is not there."""
    ds = dcmread(path)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    ds.save_as(path)


def _tilt(path: Path) -> None:
    """Another orientation for one slice: the series no longer stacks into one volume."""
    ds = dcmread(path)
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.save_as(path)


@pytest.mark.parametrize(
    "damage, reason",
    [(_corrupt_pixels, "pixel"), (_tilt, "orientation")],
    ids=["pixel-data-shorter-than-header", "mixed-orientations"],
)
def test_a_series_that_is_not_a_volume_ends_its_job_with_the_reason(
    tmp_path: Path, database_url: str, damage: object, reason: str
) -> None:
    settings, ingest = node_on_disk(tmp_path, database_url)
    truth = write_chest_ct(tmp_path / "ct", SMALL, with_lung_series=False, with_scout=False)
    files = sorted(truth.files)
    assert callable(damage)
    damage(files[len(files) // 2])
    study_id, series_id = store_one_series(ingest, files)
    spec = jobs.JobSpec(
        study_id, series_id, "ct-organs-threshold", "r", jobs.Priority.ROUTINE, (), 1
    )
    ((job_id, _),), _ = jobs.create(ingest.engine, [spec], [], 3, 3, 0.0)
    ctx = local_worker(settings, ingest.engine)
    assert run_job(ctx, job_id) == "SKIPPED"
    row = jobs.job_row(ingest.engine, job_id)
    assert row is not None and row.state == "SKIPPED"
    assert reason in row.reason.lower(), row.reason
    # The same worker goes on to the next job: a healthy series of the same study shape.
    healthy = write_chest_ct(
        tmp_path / "ok", SMALL, seed=3, with_lung_series=False, with_scout=False
    )
    for path in healthy.files:
        assert ingest.store(path.read_bytes(), "CT").status == 0
    with ingest.engine.connect() as conn:
        other_study, other_series = conn.execute(
            select(studies.c.id, series.c.id)
            .join(series, series.c.study_id == studies.c.id)
            .where(studies.c.study_instance_uid == healthy.study_instance_uid)
        ).one()
    spec = jobs.JobSpec(
        other_study, other_series, "ct-organs-threshold", "r", jobs.Priority.ROUTINE, (), 1
    )
    ((next_job, _),), _ = jobs.create(ingest.engine, [spec], [], 3, 3, 0.0)
    assert run_job(ctx, next_job) == "ENCODED"
    done = jobs.job_row(ingest.engine, next_job)
    assert (
        done is not None and done.state == "DELIVERED"
    )  # no destination: the results stay on the node
    # The worker's own stages: the model's load apart from reading the series.
    assert set(json.loads(done.timings)) == set(WORKER_STAGES)
    ingest.close()

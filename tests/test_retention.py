"""Retention: source images go only once their results are delivered, and never before."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from sqlalchemy import Engine, select

from pacs_ai.audit.trail import Auditor, rows
from pacs_ai.config import Settings, load_settings
from pacs_ai.dicom.header import read_header
from pacs_ai.pipeline import jobs
from pacs_ai.storage import index, retention
from pacs_ai.storage.ingest import Ingest
from pacs_ai.storage.schema import instances, series, studies
from pacs_ai.storage.spool import Spool
from tests.realdata import real_file

DAY = 86400.0
T0 = 1_000_000.0


def _settings(tmp_path: Path, database_url: str, extra: str = "") -> tuple[Settings, Path]:
    config = tmp_path / "pacs-ai.toml"
    config.write_text(
        f'[node]\ndata_dir = "{tmp_path / "data"}"\n'
        f'[database]\nurl = "{database_url}"\n'
        "[retention]\nkeep_days = 7\n"
        '[[peers]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 104\n' + extra
    )
    return load_settings(config), config


def _study_with_job(engine: Engine, ingest: Ingest, name: str, end: str) -> int:
    """A COMPLETE study from one real file, with one job that ends as ``end``."""
    outcome = ingest.store(real_file(name).read_bytes(), "PACS")
    assert outcome.header is not None
    uid = outcome.header.study_instance_uid
    with engine.connect() as conn:
        study_id, series_id = conn.execute(
            select(studies.c.id, series.c.id)
            .join(series, series.c.study_id == studies.c.id)
            .where(studies.c.study_instance_uid == uid)
        ).one()
    assert index.mark_complete(engine, study_id, T0 + 60, T0 + 60) is not None
    spec = jobs.JobSpec(study_id, series_id, "m", "r", jobs.Priority.ROUTINE, ("pacs",), 1)
    ((job_id, _),), _ = jobs.create(engine, [spec], [], 3, 2, T0)
    assert jobs.claim(engine, job_id, "w", 60, T0) is not None
    if end == "RUNNING":
        return study_id
    (delivery_id,) = jobs.encoded(
        engine, job_id, [jobs.Output("SR", "results/x/SR.dcm", "1.2.3")], ("pacs",), {}, "{}",
        study_id, 2, T0,
    )  # fmt: skip
    for _ in range(2 if end == "DELIVERY_FAILED" else 1):
        claimed = jobs.claim_delivery(engine, delivery_id, T0)
        assert claimed is not None
        if end == "DELIVERY_FAILED":
            jobs.delivery_failed(engine, claimed, "peer down", T0, 1)
        else:
            jobs.delivered(engine, claimed, T0)
    return study_id


def _indexed_files(engine: Engine, spool: Spool, study_id: int) -> list[Path]:
    with engine.connect() as conn:
        paths = conn.execute(
            select(instances.c.path).where(instances.c.study_id == study_id)
        ).scalars()
        return [spool.path_of(p) for p in paths]


def test_only_delivered_studies_past_keep_days_are_purged(engine: Engine, tmp_path: Path) -> None:
    settings, config = _settings(tmp_path, str(engine.url.render_as_string(hide_password=False)))
    spool = Spool(settings.node.data_dir, 0)
    spool.prepare(clean_tmp=True)
    ingest = Ingest(spool, engine, clock=lambda: T0)
    delivered = _study_with_job(engine, ingest, "CT_small.dcm", "DELIVERED")
    running = _study_with_job(engine, ingest, "MR_small.dcm", "RUNNING")
    failed = _study_with_job(engine, ingest, "JPEG2000.dcm", "DELIVERY_FAILED")
    kept_files = {s: _indexed_files(engine, spool, s) for s in (delivered, running, failed)}
    assert all(p.exists() for files in kept_files.values() for p in files)
    # The delivered study's result (an SR the node made) is indexed beside its sources.
    result = settings.node.data_dir / "results" / "x" / "SR.dcm"
    result.parent.mkdir(parents=True)
    result.write_bytes(real_file("test-SR.dcm").read_bytes())
    header = read_header(result.read_bytes())
    assert index.record_result(engine, delivered, header, "results/x/SR.dcm", 1, "r", T0)

    # Within keep_days nothing is eligible, whatever the jobs did.
    assert retention.candidates(engine, settings, T0 + 6 * DAY) == []
    later = T0 + 8 * DAY
    (only,) = retention.candidates(engine, settings, later)
    assert only.study_id == delivered and only.instances == 1

    auditor = Auditor(engine, settings, clock=lambda: later)
    (purged,) = retention.purge(engine, settings, spool, later, auditor)
    assert purged.study_id == delivered
    assert not any(p.exists() for p in kept_files[delivered])
    # Only the sources went: the result's row and file stay.
    assert [p.name for p in _indexed_files(engine, spool, delivered)] == ["SR.dcm"]
    assert result.exists()
    for study in (running, failed):
        assert all(p.exists() for p in kept_files[study])
    with engine.connect() as conn:
        purged_at = dict(conn.execute(select(studies.c.id, studies.c.purged_at)).all())
    assert purged_at == {delivered: later, running: None, failed: None}
    (event,) = [r for r in rows(engine) if r["kind"] == "instances-deleted"]
    assert event["detail"]["instances"] == 1 and event["action"] == "D"
    # A second run finds nothing left to purge.
    assert retention.purge(engine, settings, spool, later + DAY, auditor) == []

    # purge_failed lets an admin give up on a delivery that will never happen.
    lenient = settings.model_copy(
        update={"retention": settings.retention.model_copy(update={"purge_failed": True})}
    )
    assert [p.study_id for p in retention.candidates(engine, lenient, later)] == [failed]
    ingest.close()  # its connections too: the CLI below opens the database on its own

    # The CLI's dry run lists nothing while a job still runs, and removes nothing.
    def cli(*args: str) -> dict[str, object]:
        result = subprocess.run(
            [sys.executable, "-m", "pacs_ai", "purge", "--config", str(config), "--json", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        return dict(json.loads(result.stdout))

    assert cli("--dry-run") == {"dry_run": True, "studies": []}  # the running job holds MR
    assert all(p.exists() for p in kept_files[running])

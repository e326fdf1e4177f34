"""Real rows for the HTTP tests: a phantom CT stored through the ingest path, jobs planned by
the rules, and jobs driven through their states by the functions the workers use."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from sqlalchemy import Engine, select

from pacs_ai.config import PeerSettings, Settings, load_settings
from pacs_ai.phantoms.chest_ct import ChestTruth, Geometry, write_chest_ct
from pacs_ai.pipeline import jobs
from pacs_ai.pipeline.facts import series_facts
from pacs_ai.pipeline.infer import ModelCache, WorkerContext
from pacs_ai.pipeline.route import DEFAULT_RULES, RuleSettings, evaluate
from pacs_ai.storage import index
from pacs_ai.storage.ingest import Ingest
from pacs_ai.storage.schema import series, studies

PACS = PeerSettings(name="pacs", ae_title="PACS", host="127.0.0.1", port=104, receive=True)


def store_chest_ct(
    ingest: Ingest, folder: Path, calling_ae: str = "PACS", slices: int = 24, seed: int = 0
) -> ChestTruth:
    """A small phantom chest CT (a scout and one axial series), stored as a sender would."""
    truth = write_chest_ct(
        folder,
        Geometry(rows=64, columns=64, slices=slices),
        seed=seed,
        patient_id=f"PHANTOM-{seed:03d}",
        accession=f"ACC{seed:04d}",
        with_lung_series=False,
    )
    for path in truth.files:
        outcome = ingest.store(path.read_bytes(), calling_ae)
        assert outcome.status == 0, outcome.comment
    return truth


def study_id(engine: Engine, study_uid: str) -> int:
    (reception,) = index.find_studies(engine, study_uid)
    return reception.id


def plan_jobs(
    engine: Engine,
    study_uid: str,
    rules: tuple[RuleSettings, ...] = DEFAULT_RULES,
    calling_ae: str = "PACS",
    peers: Sequence[PeerSettings] = (PACS,),
    now: float = 10.0,
) -> list[int]:
    """What the node plans when the study completes: the rules' jobs and forwards."""
    sid = study_id(engine, study_uid)
    facts = series_facts(engine, sid)
    specs, forwards = jobs.plan(evaluate(rules, facts), facts, rules, sid, calling_ae, 1, peers)
    created, _ = jobs.create(engine, specs, forwards, max_attempts=2, delivery_attempts=2, now=now)
    return [job_id for job_id, _ in created]


def deliver_job(
    engine: Engine,
    job_id: int,
    timings: dict[str, float],
    enqueued_at: float = 100.0,
    started_at: float = 101.0,
    delivered_at: float = 110.0,
) -> None:
    """Claim, encode (one SR to the sender) and deliver a job, as a worker does."""
    jobs.mark_enqueued(engine, [job_id], enqueued_at)
    claimed = jobs.claim(engine, job_id, "test-worker", 60.0, started_at)
    assert claimed is not None
    output = jobs.Output("SR", f"results/{job_id}/SR.dcm", f"1.2.826.0.1.3680043.10.1.{job_id}")
    (delivery_id,) = jobs.encoded(
        engine, job_id, [output], ("pacs",), timings, "", claimed.study_id, 2, started_at + 1
    )
    delivery = jobs.claim_delivery(engine, delivery_id, delivered_at - 1)
    assert delivery is not None
    jobs.delivered(engine, delivery, delivered_at)


def fail_delivery(engine: Engine, delivery_id: int, now: float = 200.0) -> None:
    """Every attempt of a delivery fails, until it is FAILED."""
    while (delivery := jobs.claim_delivery(engine, delivery_id, now)) is not None:
        jobs.delivery_failed(engine, delivery, "association rejected", now, backoff_s=0.0)


def node_on_disk(tmp_path: Path, database_url: str) -> tuple[Settings, Ingest]:
    """A node's settings and ingest path with its data dir under ``tmp_path``."""
    from pacs_ai.node import make_ingest

    config = tmp_path / "pacs-ai.toml"
    config.write_text(
        f'[node]\ndata_dir = "{tmp_path / "data"}"\n[storage]\nreserve_mb = 1\n'
        f'[database]\nurl = "{database_url}"\n'
    )
    settings = load_settings(config)
    return settings, make_ingest(settings, run_migrations=True)


def local_worker(
    settings: Settings, engine: Engine, clock: Callable[[], float] = time.time
) -> WorkerContext:
    """What a worker process on the node's machine runs jobs with, without a broker."""
    return WorkerContext(
        settings,
        engine,
        ModelCache("cpu"),
        enqueue_delivery=lambda _: None,
        enqueue_job_retry=lambda *_: None,
        clock=clock,
    )


def store_one_series(ingest: Ingest, files: Sequence[Path]) -> tuple[int, int]:
    """Store ``files`` (one series) through the ingest path; its (study id, series id)."""
    for path in files:
        assert ingest.store(path.read_bytes(), "CT").status == 0
    with ingest.engine.connect() as conn:
        study, one_series = conn.execute(
            select(studies.c.id, series.c.id).join(series, series.c.study_id == studies.c.id)
        ).one()
    return int(study), int(one_series)

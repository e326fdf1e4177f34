"""``/metrics`` follows the database and the broker, parsed as Prometheus parses it."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from pacs_ai.broker import EmbeddedRedis
from pacs_ai.pipeline.queues import INFER_TASK, SEND_TASK, create_app
from pacs_ai.pipeline.route import RuleSettings
from pacs_ai.storage.schema import deliveries
from pacs_ai.web.context import WebContext
from pacs_ai.web.metrics import BUCKETS, NodeCollector
from tests.records import deliver_job, fail_delivery, plan_jobs, store_chest_ct
from tests.web import bearer, web_client

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    return found[(name, frozenset(labels.items()))]


def scrape(ctx: WebContext, collector: NodeCollector | None = None) -> Samples:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector or NodeCollector(ctx))
    return samples(generate_latest(registry).decode())


def test_metrics_follow_the_database(tmp_path: Path) -> None:
    with web_client(tmp_path) as (client, ctx):
        auth = bearer(ctx, "admin")
        empty = samples(client.get("/metrics", headers=auth).text)
        assert value(empty, "pacs_ai_received_instances_total") == 0
        assert value(empty, "pacs_ai_studies", state="RECEIVING") == 0
        assert value(empty, "pacs_ai_build_info", version="0.1.0") == 1
        assert not any(name == "pacs_ai_queue_depth" for name, _ in empty)  # no broker

        truth = store_chest_ct(ctx.ingest, tmp_path / "ct")
        ctx.ingest.store(truth.files[3].read_bytes(), "PACS")  # sent twice
        (job_id,) = plan_jobs(ctx.engine, truth.study_instance_uid)
        deliver_job(
            ctx.engine,
            job_id,
            {"volume": 0.2, "inference": 3.0, "encode": 0.4},
            enqueued_at=100.0,
            started_at=100.5,
            delivered_at=110.0,
        )
        forward = RuleSettings.model_validate(
            {"name": "fwd", "forward": ["pacs"], "forward_level": "study"}
        )
        plan_jobs(ctx.engine, truth.study_instance_uid, rules=(forward,))
        with ctx.engine.connect() as conn:
            forward_id = conn.execute(
                select(deliveries.c.id).where(deliveries.c.kind == "STUDY")
            ).scalar_one()
        fail_delivery(ctx.engine, forward_id)

        found = scrape(ctx)
        stored = sum(f.stat().st_size for f in truth.files)
        assert value(found, "pacs_ai_received_instances_total") == 26
        assert value(found, "pacs_ai_duplicate_instances_total") == 1
        assert value(found, "pacs_ai_received_bytes_total") == stored
        assert value(found, "pacs_ai_studies", state="RECEIVING") == 1
        assert value(found, "pacs_ai_studies", state="COMPLETE") == 0
        assert value(found, "pacs_ai_jobs", state="DELIVERED", model="ct-organs-threshold") == 1
        assert value(found, "pacs_ai_deliveries", state="DONE") == 1
        assert value(found, "pacs_ai_deliveries", state="FAILED") == 1
        assert value(found, "pacs_ai_delivery_failed_attempts_total") == 2

        stage = "pacs_ai_stage_duration_seconds"
        assert value(found, f"{stage}_count", stage="inference") == 1
        assert value(found, f"{stage}_sum", stage="inference") == pytest.approx(3.0)
        assert value(found, f"{stage}_bucket", stage="inference", le="2.5") == 0
        assert value(found, f"{stage}_bucket", stage="inference", le="5.0") == 1
        assert value(found, f"{stage}_sum", stage="queue_wait") == pytest.approx(0.5)
        # Encoded at 100.5 + 3.6 s, last delivery done at 110.
        assert value(found, f"{stage}_sum", stage="delivery") == pytest.approx(5.9)
        assert value(found, f"{stage}_count", stage="receive") == 0  # not COMPLETE yet


def test_a_scrape_storm_reads_the_database_once_per_period(tmp_path: Path) -> None:
    with web_client(tmp_path) as (_client, ctx):
        now = [0.0]
        collector = NodeCollector(ctx, cache_s=5.0, clock=lambda: now[0])
        assert value(scrape(ctx, collector), "pacs_ai_received_instances_total") == 0
        store_chest_ct(ctx.ingest, tmp_path / "ct")
        now[0] = 4.9
        assert value(scrape(ctx, collector), "pacs_ai_received_instances_total") == 0
        now[0] = 5.0
        assert value(scrape(ctx, collector), "pacs_ai_received_instances_total") == 25


def test_stage_histograms_count_each_finish_once(tmp_path: Path) -> None:
    with web_client(tmp_path) as (_client, ctx):
        now = [0.0]
        collector = NodeCollector(ctx, cache_s=1.0, clock=lambda: now[0])
        truth = store_chest_ct(ctx.ingest, tmp_path / "ct")
        (job_id,) = plan_jobs(ctx.engine, truth.study_instance_uid)
        deliver_job(ctx.engine, job_id, {"volume": 0.2, "inference": 42.0, "encode": 0.4})
        for tick in range(3):  # read again and again: still one observation
            now[0] = float(tick * 10)
            found = scrape(ctx, collector)
            count = value(found, "pacs_ai_stage_duration_seconds_count", stage="inference")
            assert count == 1
        assert (
            value(
                found,
                "pacs_ai_stage_duration_seconds_bucket",
                stage="inference",
                le=str(BUCKETS[-1]),
            )
            == 1
        )


def test_queue_depth_counts_every_priority(tmp_path: Path) -> None:
    broker = EmbeddedRedis(tmp_path / "redis")
    with web_client(tmp_path) as (_client, ctx):
        ctx.broker_url = broker.start()
        try:
            celery = create_app(ctx.settings, ctx.broker_url)
            try:
                # Priority 0 goes to "infer", the others to kombu's "infer:N" lists.
                for job_id, priority in enumerate((0, 3, 3, 6, 9)):
                    celery.send_task(INFER_TASK, args=[job_id], queue="infer", priority=priority)
                celery.send_task(SEND_TASK, args=[1], queue="send", priority=5)
            finally:
                celery.close()
            found = scrape(ctx)
            assert value(found, "pacs_ai_broker_up") == 1
            assert value(found, "pacs_ai_queue_depth", queue="infer") == 5
            assert value(found, "pacs_ai_queue_depth", queue="send") == 1
        finally:
            broker.stop()
        # The broker is gone: the scrape still answers, and says so.
        found = scrape(ctx)
        assert value(found, "pacs_ai_broker_up") == 0
        assert not any(name == "pacs_ai_queue_depth" for name, _ in found)

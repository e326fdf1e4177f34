"""``/metrics``: Prometheus exposition of what the node holds and how fast it works. ADMIN only.

Values come from the index and the broker, not from counters in this process, so receivers
and workers in other processes or on other hosts count too. One read serves every scrape
for :data:`CACHE_S` seconds, so a scrape storm cannot load the database. The collector has
a registry of its own: nothing registers in prometheus_client's global one.

Stage durations are histograms fed as jobs and studies finish: each read takes what finished
since the last one (with a margin for late commits and clock skew between hosts), so the
database is read in full once per process, not on every scrape.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from pacs_ai import __version__
from pacs_ai.pipeline.queues import QUEUES, WorkerInfo, broker_errors, worker_report
from pacs_ai.storage import stats
from pacs_ai.storage.schema import DELIVERY_STATES, STUDY_STATES
from pacs_ai.web.auth import Permission, requires
from pacs_ai.web.context import WebContext

logger = logging.getLogger(__name__)

router = APIRouter()

CACHE_S = 5.0
# How long a reading may wait for the workers' answers (as long as `pacs-ai status`).
WORKERS_TIMEOUT_S = 2.0
# Seconds: from a queue wait of milliseconds to a long inference or a slow PACS.
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
STAGES = stats.STUDY_STAGES + stats.JOB_STAGES


class StageHistograms:
    """Cumulative histograms of stage durations, fed incrementally from the index."""

    # A job may commit its finished_at a little after a later one (another host's clock, a
    # slow transaction): each read looks back this far and skips what it has counted.
    LOOK_BACK_S = 300.0

    def __init__(self) -> None:
        self.counts = {stage: [0] * len(BUCKETS) for stage in STAGES}
        self.totals = dict.fromkeys(STAGES, 0)
        self.sums = dict.fromkeys(STAGES, 0.0)
        self.newest = 0.0
        self._seen: dict[tuple[str, int], float] = {}

    def since(self) -> float:
        return max(0.0, self.newest - self.LOOK_BACK_S) if self.newest else 0.0

    def feed(self, finished: Iterable[stats.Finished]) -> None:
        for item in finished:
            key = (item.kind, item.id)
            # The same finish read again is skipped; a study completed again (reopened by
            # more instances) has a new time and counts again.
            if self._seen.get(key) == item.at:
                continue
            self._seen[key] = item.at
            self.newest = max(self.newest, item.at)
            for stage, seconds in item.stages.items():
                self.observe(stage, seconds)
        cutoff = self.since()
        self._seen = {k: at for k, at in self._seen.items() if at >= cutoff}

    def observe(self, stage: str, seconds: float) -> None:
        self.totals[stage] += 1
        self.sums[stage] += seconds
        for i, bound in enumerate(BUCKETS):
            if seconds <= bound:
                self.counts[stage][i] += 1

    def family(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(
            "pacs_ai_stage_duration_seconds",
            "Seconds each stage took: receive and quiet per study; queue_wait, warm-up, "
            "load, volume, inference, encode and delivery per delivered job.",
            labels=["stage"],
        )
        for stage in STAGES:
            buckets = [
                (str(float(b)), float(n)) for b, n in zip(BUCKETS, self.counts[stage], strict=True)
            ]
            buckets.append(("+Inf", float(self.totals[stage])))
            family.add_metric([stage], buckets, self.sums[stage])
        return family


@dataclass(frozen=True)
class Reading:
    counts: stats.Counts
    quarantined: int
    queues: dict[str, int] | None  # None: no broker, or it did not answer
    workers: list[WorkerInfo] | None  # None: as queues
    histograms: HistogramMetricFamily


class NodeCollector(Collector):
    """Everything ``/metrics`` shows, read at most once per ``cache_s`` seconds."""

    def __init__(
        self,
        ctx: WebContext,
        cache_s: float = CACHE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ctx = ctx
        self.cache_s = cache_s
        self.clock = clock
        self.histograms = StageHistograms()
        self._reading: Reading | None = None
        self._read_at = 0.0
        self._lock = threading.Lock()

    def reading(self) -> Reading:
        # One reader at a time: concurrent scrapes wait for it and share its result.
        with self._lock:
            if self._reading is None or self.clock() - self._read_at >= self.cache_s:
                self._reading = self._read()
                self._read_at = self.clock()
            return self._reading

    def _read(self) -> Reading:
        engine = self.ctx.engine
        counts = stats.counts(engine)
        self.histograms.feed(stats.finished_since(engine, self.histograms.since()))
        queues = self._queues()
        return Reading(
            counts,
            self.ctx.ingest.spool.quarantine_count(),
            queues,
            self._workers() if queues is not None else None,
            self.histograms.family(),
        )

    def _queues(self) -> dict[str, int] | None:
        if not self.ctx.broker_url:
            return None
        from pacs_ai.pipeline.queues import queue_depths

        try:
            return queue_depths(self.ctx.broker_url)
        except broker_errors() as exc:
            logger.warning("queue depths unavailable: %s", exc)
            return None

    def _workers(self) -> list[WorkerInfo] | None:
        try:
            return worker_report(self.ctx.broker_url, WORKERS_TIMEOUT_S)
        except broker_errors() as exc:
            logger.warning("workers unknown: %s", exc)
            return None

    def collect(self) -> Iterator[Metric]:
        r = self.reading()
        c = r.counts
        yield InfoMetricFamily("pacs_ai_build", "The node's version.", {"version": __version__})
        yield CounterMetricFamily(
            "pacs_ai_received_instances",
            "DICOM instances received (C-STORE and STOW-RS), duplicates included.",
            c.received_instances,
        )
        yield CounterMetricFamily(
            "pacs_ai_received_bytes",
            "Bytes of the received instances kept in the spool (duplicates are not kept).",
            c.received_bytes,
        )
        yield CounterMetricFamily(
            "pacs_ai_duplicate_instances",
            "Instances received again with a SOP Instance UID already held.",
            c.duplicates,
        )
        yield GaugeMetricFamily(
            "pacs_ai_result_objects", "SEG and SR objects the node made and holds.", c.results
        )
        yield GaugeMetricFamily(
            "pacs_ai_quarantined_objects", "Objects refused and kept in quarantine.", r.quarantined
        )
        yield _by_state("pacs_ai_studies", "Studies by state.", STUDY_STATES, c.studies)
        jobs = GaugeMetricFamily(
            "pacs_ai_jobs", "AI jobs by state and model.", labels=["state", "model"]
        )
        for (state, model), n in sorted(c.jobs.items()):
            jobs.add_metric([state, model], n)
        yield jobs
        yield _by_state("pacs_ai_deliveries", "Deliveries by state.", DELIVERY_STATES, c.deliveries)
        yield CounterMetricFamily(
            "pacs_ai_delivery_failed_attempts",
            "Failed delivery attempts (an admin's retry starts a delivery's count again).",
            c.delivery_failed_attempts,
        )
        if self.ctx.broker_url:
            yield GaugeMetricFamily(
                "pacs_ai_broker_up", "1 if the broker answered.", int(r.queues is not None)
            )
        if r.queues is not None:
            depth = GaugeMetricFamily(
                "pacs_ai_queue_depth", "Messages waiting in a Celery queue.", labels=["queue"]
            )
            for queue, n in r.queues.items():
                depth.add_metric([queue], n)
            yield depth
        if r.workers is not None:
            yield GaugeMetricFamily(
                "pacs_ai_workers", "Celery workers answering on the broker.", len(r.workers)
            )
            # Alert on depth > 0 with 0 consumers: those messages wait for ever.
            consumers = GaugeMetricFamily(
                "pacs_ai_queue_consumers",
                "Answering workers that consume a queue.",
                labels=["queue"],
            )
            for queue in QUEUES:
                consumers.add_metric(
                    [queue], sum(1 for w in r.workers if w.queues and queue in w.queues)
                )
            yield consumers
        yield r.histograms


def _by_state(
    name: str, documentation: str, states: Iterable[str], values: dict[str, int]
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=["state"])
    for state in states:  # every state, zeros included, so that rates and alerts see them
        family.add_metric([state], values.get(state, 0))
    return family


# The node runs uvicorn without lifespan events, so the app's registry is made on the first
# scrape; this lock keeps two first scrapes from making two (each with its own histograms).
_create_lock = threading.Lock()


def _registry(request: Request) -> CollectorRegistry:
    state = request.app.state
    with _create_lock:
        if getattr(state, "metrics_registry", None) is None:
            registry = CollectorRegistry(auto_describe=False)
            registry.register(NodeCollector(state.ctx))
            state.metrics_registry = registry
    registry_: CollectorRegistry = state.metrics_registry
    return registry_


@router.get(
    "/metrics",
    dependencies=[Depends(requires(Permission.ADMIN))],
    response_class=Response,
    tags=["metrics"],
)
def metrics(request: Request) -> Response:
    # The format the scraper asks for (Prometheus text 0.0.4 unless it wants OpenMetrics).
    encode, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encode(_registry(request)), headers={"Content-Type": content_type})

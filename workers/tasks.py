"""The Celery tasks: thin wrappers that hand a job or delivery id to the pipeline.

Each worker process builds one :class:`~pacs_ai.pipeline.infer.WorkerContext` on first use
(settings, database engine, resident models) and keeps it for its lifetime.
"""

from __future__ import annotations

import logging
import threading
from functools import cache

from celery.signals import worker_init, worker_process_init

from pacs_ai.models.registry import register_dirs
from pacs_ai.pipeline import warmup
from pacs_ai.pipeline.deliver import run_delivery
from pacs_ai.pipeline.dispatch import Dispatcher
from pacs_ai.pipeline.infer import (
    ModelCache,
    RemoteWorkerContext,
    WorkerContext,
    resolve_device,
    run_job,
    worker_name,
)
from pacs_ai.pipeline.node_client import RemoteLink
from pacs_ai.pipeline.queues import send_item
from pacs_ai.storage.db import open_database
from workers.celery_app import INFER_TASK, PREPARE_TASK, SEND_TASK, app

logger = logging.getLogger(__name__)


def _send(task: str, item_id: int, queue: str, priority: int) -> None:
    send_item(app, task, item_id, queue, priority)


_context_lock = threading.Lock()


def context() -> WorkerContext | RemoteWorkerContext:
    # A send-only worker runs its tasks in threads: the first ones may ask at the same time.
    with _context_lock:
        return _build_context()


@cache
def _build_context() -> WorkerContext | RemoteWorkerContext:
    from pacs_ai.config import load_settings

    settings = load_settings()
    register_dirs(settings.models.paths)
    # A worker that only delivers runs no model: asking torch for a GPU would import it.
    infers = "infer" in settings.worker.queues
    device = resolve_device(settings.worker.device) if infers else settings.worker.device
    if settings.worker.node_url:
        # A worker on another machine: no database, no spool, only the node's HTTP API.
        logger.info("worker context: device %s, node %s", device, settings.worker.node_url)
        link = RemoteLink(settings.worker.node_url, settings.worker.token, worker_name())
        return RemoteWorkerContext(settings=settings, models=ModelCache(device), link=link)
    logger.info(
        "worker context: device %s, database %s", device, settings.database_url.split("@")[-1]
    )
    engine = open_database(settings.database_url, run_migrations=False)
    # The node's own enqueueing: a retried job keeps its priority, and a broker that is down
    # leaves the job or delivery to the reconciler.
    dispatcher = Dispatcher(settings, engine, _send)
    return WorkerContext(
        settings=settings,
        engine=engine,
        models=ModelCache(device),
        enqueue_delivery=dispatcher.enqueue_delivery,
        enqueue_job_retry=dispatcher.enqueue_job,
    )


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _warm_up(**_: object) -> None:
    # Build the context when the pool process starts, not when the first job arrives: the
    # first study should not wait for imports and a database connection. The rest (models,
    # first-use costs of the encode) warms up in the background: see pacs_ai.pipeline.warmup.
    ctx = context()
    warmup.start(ctx.settings, ctx.models)


@worker_init.connect  # type: ignore[untyped-decorator]
def _build_in_main_process(**_: object) -> None:
    # A send-only worker runs its deliveries in threads of this process, where no pool
    # process starts: its context is built here, before it takes its first delivery. A worker
    # that infers builds nothing in this parent (CUDA belongs to the spawned pool processes).
    from pacs_ai.config import load_settings

    if "infer" not in load_settings().worker.queues:
        context()


@app.task(name=INFER_TASK)  # type: ignore[untyped-decorator]
def infer(job_id: int) -> str:
    return run_job(context(), job_id)


@app.task(name=PREPARE_TASK)  # type: ignore[untyped-decorator]
def prepare(series_id: int) -> str:
    prepared = context().prepared
    # None: prepare_mb = 0, or a remote worker, which gets a series only with a job it holds.
    return "OFF" if prepared is None else prepared.prepare(series_id)


@app.task(name=SEND_TASK)  # type: ignore[untyped-decorator]
def send(delivery_id: int) -> str:
    ctx = context()
    if not isinstance(ctx, WorkerContext):
        # Settings refuse the send queue with node_url set; a message routed here by hand
        # goes back to the broker for a worker on the node's machine.
        raise RuntimeError("a remote worker cannot deliver: it has none of the node's files")
    return run_delivery(ctx, delivery_id)

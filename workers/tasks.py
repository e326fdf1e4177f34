"""The Celery tasks: thin wrappers that hand a job or delivery id to the pipeline.

Each worker process builds one :class:`~pacs_ai.pipeline.infer.WorkerContext` on first use
(settings, database engine, resident models) and keeps it for its lifetime.
"""

from __future__ import annotations

import logging
from functools import cache

from celery.signals import worker_process_init

from pacs_ai.models.registry import register_dirs
from pacs_ai.pipeline.deliver import run_delivery
from pacs_ai.pipeline.infer import ModelCache, WorkerContext, resolve_device, run_job
from pacs_ai.storage.db import open_database
from workers.celery_app import INFER_TASK, SEND_TASK, app

logger = logging.getLogger(__name__)


def _send(task: str, item_id: int, queue: str, priority: int) -> None:
    app.send_task(task, args=[item_id], queue=queue, priority=priority)


@cache
def context() -> WorkerContext:
    from pacs_ai.config import load_settings

    settings = load_settings()
    register_dirs(settings.models.paths)
    device = resolve_device(settings.worker.device)
    logger.info(
        "worker context: device %s, database %s", device, settings.database_url.split("@")[-1]
    )
    return WorkerContext(
        settings=settings,
        engine=open_database(settings.database_url, run_migrations=False),
        models=ModelCache(device),
        enqueue_delivery=lambda i: _send(SEND_TASK, i, "send", 5),
        enqueue_job_retry=lambda i: _send(INFER_TASK, i, "infer", 5),
    )


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _warm_up(**_: object) -> None:
    # Build the context when the pool process starts, not when the first job arrives: the
    # first study should not wait for imports and a database connection.
    context()


@app.task(name=INFER_TASK)  # type: ignore[untyped-decorator]
def infer(job_id: int) -> str:
    return run_job(context(), job_id)


@app.task(name=SEND_TASK)  # type: ignore[untyped-decorator]
def send(delivery_id: int) -> str:
    return run_delivery(context(), delivery_id)

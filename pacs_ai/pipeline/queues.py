"""The Celery application: long GPU tasks on a Redis broker, job ids only in the messages.

Built here, configured from the node's settings, and used both by the node (to enqueue) and
by :mod:`workers.celery_app` (to run the tasks).
"""

from __future__ import annotations

from celery import Celery

from pacs_ai.config import Settings
from pacs_ai.errors import ConfigError

INFER_TASK = "pacs_ai.infer"
SEND_TASK = "pacs_ai.send"


def create_app(settings: Settings, broker_url: str | None = None) -> Celery:
    url = broker_url or settings.broker.url
    if not url:
        raise ConfigError(
            [
                (
                    "broker.url",
                    "no broker configured; set it (redis://host:6379/0) or "
                    "PACS_AI_BROKER__URL, or run the worker inside `pacs-ai serve`",
                )
            ]
        )
    limit = settings.worker.task_time_limit_s
    app = Celery("pacs_ai", broker=url, include=["workers.tasks"])
    app.conf.update(
        # A task is acknowledged when it finishes, and given back if its worker dies.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_time_limit=limit,
        task_soft_time_limit=limit * 0.95,
        broker_transport_options={
            # Longer than any task: Redis must never hand a running task to a second worker.
            "visibility_timeout": int(limit * 2 + 600),
            # Priorities 0 (STAT) .. 9 in separate lists, served strictly in order.
            "priority_steps": list(range(10)),
            "sep": ":",
            "queue_order_strategy": "priority",
        },
        # The two queues are created on first use (task_create_missing_queues): "infer" for
        # GPU workers, "send" for I/O, so a slow PACS never holds a GPU.
        task_routes={INFER_TASK: {"queue": "infer"}, SEND_TASK: {"queue": "send"}},
        task_default_queue="infer",
        # CUDA must not be initialised in a forked parent: pool children are spawned.
        worker_pool_start_method="spawn",
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
    )
    return app

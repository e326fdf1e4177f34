"""The Celery application, configured for long GPU tasks on a Redis broker.

Workers start with ``celery -A workers.celery_app worker``; tasks carry job ids only, the
database is the source of truth (see DESIGN.md). The tasks themselves arrive with the AI path.
"""

from __future__ import annotations

import os

from celery import Celery

BROKER_ENV = "PACS_AI_BROKER__URL"


def make_app(broker_url: str) -> Celery:
    app = Celery("pacs_ai", broker=broker_url)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        accept_content=["json"],
        # Longer than any task's hard time limit, so Redis never redelivers a running task.
        broker_transport_options={"visibility_timeout": 4 * 3600},
        task_time_limit=3600,
        task_soft_time_limit=3300,
        worker_pool_start_method="spawn",
    )
    return app


app = make_app(os.environ.get(BROKER_ENV, "redis://127.0.0.1:6379/0"))

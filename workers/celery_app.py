"""The worker's Celery app: ``celery -A workers.celery_app worker`` or ``pacs-ai worker``.

Configured once per process from the node's settings (``PACS_AI_CONFIG`` and ``PACS_AI_*``),
so a worker on another machine needs only the same configuration file and broker URL.
"""

from __future__ import annotations

from pacs_ai.config import load_settings
from pacs_ai.pipeline.queues import INFER_TASK, PREPARE_TASK, SEND_TASK, create_app

__all__ = ["INFER_TASK", "PREPARE_TASK", "SEND_TASK", "app"]

app = create_app(load_settings())

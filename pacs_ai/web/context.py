"""What every HTTP handler may use, built once by the node and hung on ``app.state.ctx``."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import Engine

from pacs_ai.audit.trail import Auditor
from pacs_ai.config import Settings
from pacs_ai.storage.ingest import Ingest


def _always_ready() -> dict[str, bool]:
    return {}


@dataclass
class WebContext:
    settings: Settings
    engine: Engine
    # The same ingest path as C-STORE: STOW-RS stores through it.
    ingest: Ingest
    clock: Callable[[], float] = time.time
    # Named readiness checks beyond the database (receivers up, broker reachable).
    readiness: Callable[[], dict[str, bool]] = field(default=_always_ready)
    # The Celery broker URL once known (the embedded Redis starts with the node).
    broker_url: str = ""
    # Puts a task on the broker: (task name, job or delivery id, queue, priority). None when
    # the node runs no AI path; the worker API needs it to enqueue deliveries and retries.
    send_task: Callable[[str, int, str, int], None] | None = None
    # The node's auditor; None makes the app build its own (tests, tools).
    auditor: Auditor | None = None

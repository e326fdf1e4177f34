"""The AI path's moving parts inside ``pacs-ai serve``.

- the broker: the configured Redis, or an embedded one (:mod:`pacs_ai.broker`);
- the dispatcher, listening for study completions, and its reconciler thread;
- the embedded worker: one ``pacs-ai worker`` process (the same command a GPU server runs),
  restarted if it dies, later each time when it keeps dying soon after its start, and never
  when it refused its configuration (exit 2): the same configuration would be refused again.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import Engine

from pacs_ai.broker import EmbeddedRedis
from pacs_ai.config import Settings
from pacs_ai.pipeline.assemble import CompletionListener
from pacs_ai.pipeline.dispatch import Dispatcher
from pacs_ai.pipeline.queues import create_app, send_item
from pacs_ai.processes import stop_process

logger = logging.getLogger(__name__)

REFUSED = 2
"""``pacs-ai worker``'s exit status for a configuration or command line it cannot run with."""
STEADY_S = 60.0
"""A worker that lived this long before it died is restarted at once."""
FIRST_DELAY_S = 1.0
MAX_DELAY_S = 300.0
"""Restart delays for a worker that keeps dying young: 1 s, doubled each time, up to 5 min."""


class AIRuntime:
    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        config_path: Path | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.config_path = config_path
        self.clock = clock
        self.redis: EmbeddedRedis | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.worker_started = 0.0
        self.restart_at: float | None = None  # when a dead worker is started again
        self.restart_delay = 0.0  # the last delay given; 0 after a steady run
        self.refused = False  # the worker refused its configuration: not restarted
        self.stop_event = threading.Event()
        self.reconciler: threading.Thread | None = None
        self.broker_url = settings.broker.url

    def start(self) -> CompletionListener:
        if not self.broker_url:
            self.redis = EmbeddedRedis(self.settings.node.data_dir)
            self.broker_url = self.redis.start()
        self.app = create_app(self.settings, self.broker_url)
        self.dispatcher = Dispatcher(self.settings, self.engine, self.send_task)
        self.reconciler = threading.Thread(
            target=self.dispatcher.run_reconciler, args=(self.stop_event,), name="reconciler"
        )
        self.reconciler.start()
        if self.settings.worker.embedded:
            self._start_worker()
        return self.dispatcher.on_study_complete

    def send_task(self, name: str, item_id: int, queue: str, priority: int) -> None:
        """Put a job or delivery id on its queue (the dispatcher and the worker API use it)."""
        send_item(self.app, name, item_id, queue, priority)

    def _start_worker(self) -> None:
        env = {**os.environ, "PACS_AI_BROKER__URL": self.broker_url}
        if self.config_path is not None:
            env["PACS_AI_CONFIG"] = str(self.config_path.resolve())
        command = [sys.executable, "-m", "pacs_ai", "worker"]
        # On one box, acknowledging a PACS's images comes before inference: a sender kept
        # waiting times out and retries, a job waiting a little is only a little later.
        # (bench/ingest.py: +25 % ingest with the worker at nice 10.) GPU servers run
        # `pacs-ai worker` on their own and are not affected.
        nice = shutil.which("nice")
        if nice:
            command = [nice, "-n", "10", *command]
        self.worker = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL)
        self.worker_started = self.clock()
        logger.info("embedded worker started (pid %d)", self.worker.pid)

    def supervise(self) -> None:
        """Restart a dead embedded worker, when it is due; called every half second.

        The node goes on receiving in any case: studies wait on the queue, and ``pacs-ai
        status`` shows the inference queue without a worker.
        """
        if self.worker is None or self.refused:
            return
        if self.restart_at is None:
            code = self.worker.poll()
            if code is None:
                return
            self._schedule_restart(code)
        if self.restart_at is not None and self.clock() >= self.restart_at:
            self.restart_at = None
            self._start_worker()

    def _schedule_restart(self, code: int) -> None:
        if code == REFUSED:
            # The worker read the node's configuration file again and refused it (edited since
            # the node started, or a model named that is not installed): every restart would
            # be refused the same way, twice a second, forever.
            self.refused = True
            logger.error(
                "embedded worker refused its configuration (exit %d; its log says why): "
                "not restarting. No job runs until the configuration is fixed "
                "(pacs-ai config check) and the node restarted",
                code,
            )
            return
        lived = self.clock() - self.worker_started
        if lived >= STEADY_S:
            self.restart_delay = 0.0
        else:
            self.restart_delay = min(max(self.restart_delay * 2, FIRST_DELAY_S), MAX_DELAY_S)
        self.restart_at = self.clock() + self.restart_delay
        logger.error(
            "embedded worker exited with %s after %.0f s; restarting%s",
            code,
            lived,
            f" in {self.restart_delay:.0f} s" if self.restart_delay else "",
        )

    def stop(self, timeout_s: float) -> None:
        self.stop_event.set()
        if self.reconciler is not None:
            self.reconciler.join()
        if self.worker is not None:
            # Celery's warm shutdown finishes the task in hand; a job cut short is taken back
            # by the reconciler from its lease, so waiting is a courtesy, not a requirement.
            stop_process(self.worker, timeout_s)
        if self.redis is not None:
            self.redis.stop()

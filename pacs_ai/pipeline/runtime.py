"""The AI path's moving parts inside ``pacs-ai serve``.

- the broker: the configured Redis, or an embedded one (:mod:`pacs_ai.broker`);
- the dispatcher, listening for study completions, and its reconciler thread;
- the embedded workers: ``pacs-ai worker`` processes (the same command a GPU server runs), one
  for inference and one for delivery, each restarted if it dies, later each time when it keeps
  dying soon after its start, and never when it refused its configuration (exit 2): the same
  configuration would be refused again.
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


def embedded_queues(queues: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The queues of each embedded worker process.

    Inference and delivery get a process each: one job holds its worker for seconds to minutes,
    and a PACS that accepts the connection but never answers holds a delivery until its
    timeout. In one process, results of a finished study would wait behind the next study's
    inference, and a stalled PACS would stop inference.
    """
    if "infer" in queues and "send" in queues:
        return [("infer",), ("send",)]
    return [queues]


class EmbeddedWorker:
    """One ``pacs-ai worker`` process of the node's, and when to start it again."""

    def __init__(
        self,
        queues: tuple[str, ...],
        broker_url: str,
        config_path: Path | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.queues = queues
        self.broker_url = broker_url
        self.config_path = config_path
        self.clock = clock
        self.name = ",".join(queues)
        self.process: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.restart_at: float | None = None  # when a dead worker is started again
        self.restart_delay = 0.0  # the last delay given; 0 after a steady run
        self.refused = False

    def start(self) -> None:
        env = {**os.environ, "PACS_AI_BROKER__URL": self.broker_url}
        if self.config_path is not None:
            env["PACS_AI_CONFIG"] = str(self.config_path.resolve())
        command = [sys.executable, "-m", "pacs_ai", "worker", "--queues", self.name]
        # On one box, acknowledging a PACS's images comes before inference and delivery: a
        # sender kept waiting times out and retries, a job or a result waiting a little is
        # only a little later. (bench/ingest.py: +25 % ingest with the worker at nice 10.) GPU
        # servers run `pacs-ai worker` on their own and are not affected.
        nice = shutil.which("nice")
        if nice:
            command = [nice, "-n", "10", *command]
        self.process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL)
        self.started = self.clock()
        logger.info("embedded worker (%s) started (pid %d)", self.name, self.process.pid)

    def supervise(self) -> None:
        """Start the worker again if it died and its delay is over."""
        if self.process is None or self.refused:
            return
        if self.restart_at is None:
            code = self.process.poll()
            if code is None:
                return
            self._schedule_restart(code)
        if self.restart_at is not None and self.clock() >= self.restart_at:
            self.restart_at = None
            self.start()

    def _schedule_restart(self, code: int) -> None:
        if code == REFUSED:
            # The worker read the node's configuration file again and refused it (edited since
            # the node started, or a model named that is not installed): every restart would
            # be refused the same way, twice a second, forever.
            self.refused = True
            logger.error(
                "embedded worker (%s) refused its configuration (exit %d; its log says why): "
                "not restarting. Nothing on its queues runs until the configuration is fixed "
                "(pacs-ai config check) and the node restarted",
                self.name,
                code,
            )
            return
        lived = self.clock() - self.started
        if lived >= STEADY_S:
            self.restart_delay = 0.0
        else:
            self.restart_delay = min(max(self.restart_delay * 2, FIRST_DELAY_S), MAX_DELAY_S)
        self.restart_at = self.clock() + self.restart_delay
        logger.error(
            "embedded worker (%s) exited with %s after %.0f s; restarting%s",
            self.name,
            code,
            lived,
            f" in {self.restart_delay:.0f} s" if self.restart_delay else "",
        )

    def stop(self, timeout_s: float) -> None:
        if self.process is not None:
            # Celery's warm shutdown finishes the task in hand; a job cut short is taken back
            # by the reconciler from its lease, so waiting is a courtesy, not a requirement.
            stop_process(self.process, timeout_s)


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
        self.workers: list[EmbeddedWorker] = []
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
            self.start_workers()
        return self.dispatcher.on_study_complete

    def send_task(self, name: str, item_id: int, queue: str, priority: int) -> None:
        """Put a job or delivery id on its queue (the dispatcher and the worker API use it)."""
        send_item(self.app, name, item_id, queue, priority)

    def start_workers(self) -> None:
        self.workers = [
            EmbeddedWorker(queues, self.broker_url, self.config_path, self.clock)
            for queues in embedded_queues(self.settings.worker.queues)
        ]
        for worker in self.workers:
            worker.start()

    def supervise(self) -> None:
        """Restart dead embedded workers, when they are due; called every half second.

        The node goes on receiving in any case: studies wait on the queue, and ``pacs-ai
        status`` shows the inference queue without a worker.
        """
        for worker in self.workers:
            worker.supervise()

    def stop(self, timeout_s: float) -> None:
        self.stop_event.set()
        if self.reconciler is not None:
            self.reconciler.join()
        # Side by side: each drains its own task in hand within the same timeout.
        stoppers = [
            threading.Thread(target=worker.stop, args=(timeout_s,), name=f"stop {worker.name}")
            for worker in self.workers
        ]
        for thread in stoppers:
            thread.start()
        for thread in stoppers:
            thread.join()
        if self.redis is not None:
            self.redis.stop()

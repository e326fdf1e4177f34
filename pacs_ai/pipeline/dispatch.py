"""From a completed study to messages on the broker, and the reconciler that keeps them honest.

:meth:`Dispatcher.on_study_complete` is an assembly listener: it routes the study, records jobs
and forwards in the database, then enqueues their ids. Enqueueing can fail (broker down);
that loses nothing, because :meth:`Dispatcher.reconcile` finds every QUEUED job and due
delivery in the database and sends it again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from pacs_ai.config import Settings
from pacs_ai.pipeline import jobs
from pacs_ai.pipeline.assemble import StudyCompleted
from pacs_ai.pipeline.facts import series_facts
from pacs_ai.pipeline.queues import INFER_TASK, PREPARE_TASK, SEND_TASK
from pacs_ai.pipeline.route import Priority, SeriesFacts, evaluate
from pacs_ai.results.uids import MANUFACTURER
from pacs_ai.storage import index
from pacs_ai.worklist.priority import refresh as refresh_worklist

logger = logging.getLogger(__name__)


# How long after a completion the reconciler takes it for lost, if still unplanned: planning
# takes well under a second, and planning twice only costs a second look.
PLANNING_GRACE_S = 30.0

# The least time after its claim that a SENDING delivery is taken for cut off.
SENDING_STALE_MIN_S = 60.0

SendTask = Callable[[str, int, str, int], None]
"""(task name, id, queue, priority) -> None; raises if the broker cannot take it."""


class Dispatcher:
    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        send_task: SendTask,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.send_task = send_task
        self.clock = clock

    def _facts(self, study_id: int) -> list[SeriesFacts]:
        # Our own SEG and SR come back when a PACS forwards a study: never route them again.
        return [
            f
            for f in series_facts(self.engine, study_id)
            if f.values.get("Manufacturer") != MANUFACTURER
        ]

    def on_study_lull(self, study_id: int) -> None:
        """A study has been quiet for a moment: have a worker read the series that the rules
        would run models on now (:mod:`pacs_ai.pipeline.prepare`). A guess, and a cheap one:
        nothing is recorded, and a lost message or a changed series costs only the time the
        job then takes to read the series itself."""
        facts = self._facts(study_id)
        # The jobs the completion would plan now (destinations and forwards do not matter here).
        specs, _ = jobs.plan(
            evaluate(self.settings.rules, facts),
            facts,
            self.settings.rules,
            study_id,
            calling_ae="",
            completion=0,
            peers=self.settings.peers,
        )
        wanted: dict[int, int] = {}
        for spec in specs:
            # The most urgent job's priority: the reading runs just ahead of it on the queue.
            priority = spec.priority.celery_priority
            wanted[spec.series_id] = min(priority, wanted.get(spec.series_id, priority))
        for series_id, priority in wanted.items():
            try:
                self.send_task(PREPARE_TASK, series_id, "infer", priority)
            except Exception as exc:
                logger.info("series %d not sent for preparation: %s", series_id, exc)
                return

    def on_study_complete(self, done: StudyCompleted) -> None:
        facts = self._facts(done.study_id)
        decisions = evaluate(self.settings.rules, facts)
        if not decisions:
            # Recorded, not dropped: `pacs-ai studies list` shows it planned with no rule.
            logger.info("study %s: no rule matches; kept, nothing to run", done.study_instance_uid)
            jobs.plan_nothing(self.engine, (done.study_id, done.completions), self.clock())
            return
        job_specs, forwards = jobs.plan(
            decisions,
            facts,
            self.settings.rules,
            done.study_id,
            done.calling_ae,
            done.completions,
            self.settings.peers,
        )
        new_jobs, delivery_ids = jobs.create(
            self.engine,
            job_specs,
            forwards,
            self.settings.worker.max_attempts,
            self.settings.delivery.max_attempts,
            self.clock(),
            # Marked planned with the rows it creates: a node that dies before this commit
            # leaves the completion unplanned, and the reconciler plans it.
            completion=(done.study_id, done.completions),
            rules_fired=jobs.fired_rules(decisions, self.settings.rules),
        )
        # The worklist shows the study at its planned priority before any model has run.
        refresh_worklist(self.engine, self.settings.rules, done.study_id)
        logger.info(
            "study %s: %d job(s), %d forward(s) from rules %s",
            done.study_instance_uid,
            len(new_jobs),
            len(delivery_ids),
            sorted({d.rule for d in decisions}),
        )
        for job_id, priority in new_jobs:
            self.enqueue_job(job_id, priority)
        for delivery_id in delivery_ids:
            self.enqueue_delivery(delivery_id)

    def enqueue_job(self, job_id: int, priority: Priority) -> None:
        try:
            self.send_task(INFER_TASK, job_id, "infer", priority.celery_priority)
        except Exception as exc:
            # Broker unreachable: the job stays QUEUED and the reconciler sends it later.
            logger.warning("could not enqueue job %d (%s); the reconciler will retry", job_id, exc)
            return
        jobs.mark_enqueued(self.engine, [job_id], self.clock())

    def enqueue_delivery(self, delivery_id: int) -> None:
        now = self.clock()
        try:
            self.send_task(SEND_TASK, delivery_id, "send", 5)
        except Exception as exc:
            logger.warning("could not enqueue delivery %d (%s); will retry", delivery_id, exc)
            return
        # Not due again until the requeue window passes: the message is on its way.
        jobs.mark_delivery_scheduled(
            self.engine, delivery_id, now + self.settings.worker.requeue_after_s
        )

    def reconcile(self) -> jobs.Redo:
        now = self.clock()
        # A completion younger than this may still be being planned by the assembler.
        for done in index.unplanned_completions(self.engine, now - PLANNING_GRACE_S):
            logger.warning(
                "reconciler: study %s completion %d was never planned (node stopped?); "
                "planning it now",
                done.study_instance_uid,
                done.completions,
            )
            try:
                self.on_study_complete(done)
            except Exception:
                # The next pass tries again; the other studies and the jobs go on.
                logger.exception("reconciler: planning study %s failed", done.study_instance_uid)
        redo = jobs.reconcile(
            self.engine,
            now,
            self.settings.worker.requeue_after_s,
            # An attempt still SENDING this long after its claim was cut off; a slow one
            # sent again costs a duplicate the peer ignores, a stuck one costs the result.
            sending_stale_s=max(SENDING_STALE_MIN_S, 4 * self.settings.delivery.timeout_s),
        )
        for job_id, priority in redo.jobs:
            logger.info("reconciler: re-enqueueing job %d", job_id)
            self.enqueue_job(job_id, priority)
        for delivery_id in redo.deliveries:
            self.enqueue_delivery(delivery_id)
        return redo

    def run_reconciler(self, stop: threading.Event) -> None:
        try:
            queued, pending = jobs.forget_enqueued(self.engine, self.clock())
            if queued or pending:
                logger.info(
                    "reconciler: sending %d queued job(s) and %d pending delivery(ies) again "
                    "(their messages may have died with the last run)",
                    queued,
                    pending,
                )
        except SQLAlchemyError as exc:
            # Only a delay: the requeue window sends them again in the end.
            logger.error("reconciler could not take up the last run's messages: %s", exc)
        while not stop.wait(self.settings.worker.reconcile_interval_s):
            try:
                self.reconcile()
            except SQLAlchemyError as exc:
                logger.error("reconciler pass failed, retrying: %s", exc)

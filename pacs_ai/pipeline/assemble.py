"""Study assembly: a study is COMPLETE once no instance arrived for the quiet period.

Grouping is per (calling AE, StudyInstanceUID), because DICOM has no "end of study" message:
the only signal a sender gives is that it stopped sending. The decision is a pure function
(:func:`due`); :class:`Assembler` applies it to the index and tells the listeners. Completion
is recorded in the database before any listener hears of it, so a node that dies right after
loses no trigger: the row says COMPLETE and whoever acts on it can find it there.

Before that, once a study has been quiet for :func:`lull_after` (a quarter of the quiet
period, at most 2 s), the lull listeners hear of it, once per lull: the dispatcher has a
worker read its series meanwhile (:mod:`pacs_ai.pipeline.prepare`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from pacs_ai.storage import index
from pacs_ai.storage.index import Completion, QuietStudy

logger = logging.getLogger(__name__)

StudyCompleted = Completion
"""The event: which study, from whom, with how many series and instances, the n-th time."""

CompletionListener = Callable[[StudyCompleted], None]
LullListener = Callable[[int], None]
"""Called with the study id of a study that went quiet, before it is due."""

LULL_MAX_S = 2.0


@dataclass(frozen=True)
class Due:
    study_id: int
    cutoff: float


def due(studies: Iterable[QuietStudy], now: float, quiet_period_s: float) -> list[Due]:
    """The studies whose last instance arrived at least ``quiet_period_s`` before ``now``."""
    cutoff = now - quiet_period_s
    return [Due(s.id, cutoff) for s in studies if s.last_received_at <= cutoff]


def lull_after(quiet_period_s: float) -> float:
    """How long a study must be quiet before its series are worth reading ahead: long enough
    that a sender is likely done (not between two images), short against the quiet period."""
    return min(LULL_MAX_S, quiet_period_s / 4)


def lulled(studies: Iterable[QuietStudy], now: float, quiet_period_s: float) -> list[QuietStudy]:
    """The studies quiet for :func:`lull_after` and not yet for the whole quiet period."""
    after = lull_after(quiet_period_s)
    return [s for s in studies if now - quiet_period_s < s.last_received_at <= now - after]


class Assembler:
    """Marks quiet studies COMPLETE and calls the listeners, once per completion."""

    def __init__(
        self,
        engine: Engine,
        quiet_period_s: float,
        listeners: Sequence[CompletionListener] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self.quiet_period_s = quiet_period_s
        self.listeners = list(listeners)
        self.clock = clock
        self.lull_listeners: list[LullListener] = []
        # Study id → the last_received_at its lull listeners were told of.
        self._told: dict[int, float] = {}

    def add_listener(self, listener: CompletionListener) -> None:
        self.listeners.append(listener)

    def add_lull_listener(self, listener: LullListener) -> None:
        self.lull_listeners.append(listener)

    def poll(self) -> list[StudyCompleted]:
        """One pass: complete every study that is due; return what was completed."""
        now = self.clock()
        receiving = index.receiving_studies(self.engine)
        completed = []
        for item in due(receiving, now, self.quiet_period_s):
            done = index.mark_complete(self.engine, item.study_id, item.cutoff, now)
            if done is None:
                continue  # an instance arrived meanwhile, or another node completed it
            logger.info(
                "study %s from %s COMPLETE: %d series, %d instances (completion %d)",
                done.study_instance_uid,
                done.calling_ae,
                done.series_count,
                done.instance_count,
                done.completions,
            )
            completed.append(done)
            for listener in self.listeners:
                try:
                    listener(done)
                except Exception:
                    # A listener's failure must not stop assembly of the other studies.
                    logger.exception("completion listener failed for %s", done.study_instance_uid)
        # After the completions: a guess must never hold a completion back (a broker that is
        # slow to refuse, say).
        if self.lull_listeners:
            self._tell_lulls(receiving, now)
        return completed

    def _tell_lulls(self, receiving: list[QuietStudy], now: float) -> None:
        self._told = {s.id: self._told[s.id] for s in receiving if s.id in self._told}
        for study in lulled(receiving, now, self.quiet_period_s):
            if self._told.get(study.id) == study.last_received_at:
                continue  # told of this lull already; a new instance starts another
            self._told[study.id] = study.last_received_at
            for listener in self.lull_listeners:
                try:
                    listener(study.id)
                except Exception:
                    # A guess that failed: the completion still comes, and the job reads
                    # the series itself.
                    logger.exception("lull listener failed for study %d", study.id)

    def run(self, stop: threading.Event, interval_s: float | None = None) -> None:
        """Poll until ``stop`` is set. The interval defaults to a quarter of the quiet period."""
        interval = interval_s or min(1.0, max(0.05, self.quiet_period_s / 4))
        while not stop.is_set():
            try:
                self.poll()
            except SQLAlchemyError as exc:
                logger.error("assembly pass failed, retrying: %s", exc)
            stop.wait(interval)

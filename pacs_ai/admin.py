"""What an administrator asks of a node, as JSON-ready data.

The same functions answer ``pacs-ai studies list --json`` on the node's own host (through
:class:`LocalAdmin`) and ``GET /api/admin/studies`` (through :mod:`pacs_ai.web.admin_api`),
which the CLI calls with ``--url`` (:class:`pacs_ai.remote.RemoteAdmin`). So the JSON a
script reads is the same whichever way it asked.

Failures are :class:`~pacs_ai.errors.NotFound` (HTTP 404), :class:`~pacs_ai.errors.WrongState`
(409) and :class:`~pacs_ai.errors.InvalidArgument` (400), each with a message for people.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from sqlalchemy import Engine, Row

from pacs_ai import __version__
from pacs_ai.config import PeerSettings, Settings
from pacs_ai.errors import InvalidArgument, ModelLoadError, NotFound, PacsAiError, WrongState
from pacs_ai.pipeline import jobs
from pacs_ai.storage import index, tokens
from pacs_ai.storage.schema import DELIVERY_STATES, JOB_STATES, STUDY_STATES

Json = dict[str, Any]


def checked_state(value: str | None, allowed: Sequence[str]) -> str | None:
    """``value`` upper-cased if it is one of ``allowed``; None stays None (no filter)."""
    if value is None or value == "":
        return None
    if value.upper() not in allowed:
        raise InvalidArgument(f"state must be one of {', '.join(allowed)}, not {value!r}")
    return value.upper()


# --- studies -------------------------------------------------------------------------------


def studies_list(engine: Engine, state: str | None = None, limit: int = 1000) -> list[Json]:
    """Studies held, newest first."""
    rows = index.list_studies(engine, checked_state(state, STUDY_STATES), limit)
    return [r.as_json() for r in rows]


def study_show(engine: Engine, study_uid: str) -> list[Json]:
    """Every reception of a study (one per calling AE), each with its series."""
    found = index.find_studies(engine, study_uid)
    if not found:
        raise NotFound(f"no study {study_uid} on this node (see `pacs-ai studies list`)")
    return [
        {**s.as_json(), "series": [x.as_json() for x in index.list_series(engine, s.id)]}
        for s in found
    ]


# --- jobs and deliveries -------------------------------------------------------------------


def _job_json(row: Row[Any]) -> Json:
    data = dict(row._mapping)
    data["timings"] = json.loads(data["timings"] or "{}")
    data["findings"] = json.loads(data["findings"]) if data["findings"] else None
    return data


def jobs_list(engine: Engine, state: str | None = None, limit: int = 200) -> list[Json]:
    """Jobs, newest first."""
    return [_job_json(r) for r in jobs.job_rows(engine, checked_state(state, JOB_STATES), limit)]


def job_show(engine: Engine, job_id: int) -> Json:
    """One job with its timings, findings and deliveries."""
    row = jobs.job_row(engine, job_id)
    if row is None:
        raise NotFound(f"no job {job_id} (see `pacs-ai jobs list`)")
    data = _job_json(row)
    data["deliveries"] = [dict(d._mapping) for d in jobs.delivery_rows(engine, job_id=job_id)]
    return data


def job_retry(engine: Engine, job_id: int, now: float) -> Json:
    """FAILED, CANCELED or SKIPPED back to QUEUED; the node's reconciler enqueues it."""
    if not jobs.retry(engine, job_id, now):
        state = job_show(engine, job_id)["state"]  # NotFound if there is no such job
        raise WrongState(f"job {job_id} is {state}; only FAILED, CANCELED or SKIPPED jobs retry")
    return job_show(engine, job_id)


def job_cancel(engine: Engine, job_id: int, now: float) -> Json:
    """Cancel a job that has not finished."""
    if not jobs.cancel(engine, job_id, now):
        state = job_show(engine, job_id)["state"]
        raise WrongState(f"job {job_id} is {state} already; only unfinished jobs cancel")
    return job_show(engine, job_id)


def deliveries_list(engine: Engine, state: str | None = None, limit: int = 200) -> list[Json]:
    """Deliveries, newest first, with the last error."""
    rows = jobs.delivery_rows(engine, checked_state(state, DELIVERY_STATES), limit=limit)
    return [dict(r._mapping) for r in rows]


def delivery_show(engine: Engine, delivery_id: int) -> Json:
    row = jobs.delivery_row(engine, delivery_id)
    if row is None:
        raise NotFound(f"no delivery {delivery_id} (see `pacs-ai deliveries list`)")
    return dict(row._mapping)


def delivery_retry(engine: Engine, delivery_id: int, now: float) -> Json:
    """Send a FAILED (or CANCELED) delivery again, with a fresh attempt budget."""
    if not jobs.retry_delivery(engine, delivery_id, now):
        state = delivery_show(engine, delivery_id)["state"]
        raise WrongState(
            f"delivery {delivery_id} is {state}; only FAILED or CANCELED deliveries retry"
        )
    return delivery_show(engine, delivery_id)


# --- rules ---------------------------------------------------------------------------------


def rules_check(settings: Settings) -> Json:
    """Whether every rule's models are installed, and the rules as configured."""
    from pacs_ai.models.registry import ModelRegistry, not_installed

    # A registry of its own: registering the model folders again in the process-wide one
    # (a running node's) would log that each folder replaces itself.
    registry = ModelRegistry()
    problems: list[str] = []
    try:
        registry.register_dirs(settings.models.paths)
    except ModelLoadError as exc:
        problems.append(str(exc))
    models = registry.available()
    problems += [
        f"rule {rule.name!r}: {why}"
        for rule in settings.rules
        for model in rule.models
        if (why := not_installed(model, models))
    ]
    return {
        "valid": not problems,
        "problems": problems,
        "rules": [
            r.model_dump(mode="json", by_alias=True, exclude_none=True) for r in settings.rules
        ],
    }


def rules_explain(settings: Settings, engine: Engine, study_uid: str) -> list[Json]:
    """For each reception, series and rule: matched or not, and the conditions that decided."""
    from pacs_ai.pipeline.facts import series_facts
    from pacs_ai.pipeline.route import explain

    receptions = index.find_studies(engine, study_uid)
    if not receptions:
        raise NotFound(f"no study {study_uid} on this node (see `pacs-ai studies list`)")
    report = []
    for reception in receptions:
        facts = series_facts(engine, reception.id)
        descriptions = {f.series_instance_uid: f.values["SeriesDescription"] for f in facts}
        for decision in explain(settings.rules, facts):
            report.append(
                {
                    "calling_ae": reception.calling_ae,
                    "series_instance_uid": decision.series_instance_uid,
                    "series_description": descriptions[decision.series_instance_uid],
                    "rule": decision.rule,
                    "matched": decision.matched,
                    "conditions": [c.__dict__ for c in decision.conditions],
                }
            )
    return report


# --- status --------------------------------------------------------------------------------


# How long `pacs-ai status` may wait for the broker and the workers in all.
BROKER_STATUS_S = 2.0


def node_broker_url(settings: Settings) -> str:
    """The broker the node uses: the configured one, else its embedded Redis's socket."""
    if settings.broker.url:
        return settings.broker.url
    from pacs_ai.broker import EmbeddedRedis

    # The socket's path follows from the data dir alone, so a CLI on the node's host finds
    # a running node's embedded broker without asking it.
    return EmbeddedRedis(settings.node.data_dir).url


def broker_status(broker_url: str, timeout_s: float = BROKER_STATUS_S) -> Json:
    """The broker, its queue depths and the workers that answer, within about ``timeout_s``.

    ``queues_without_worker`` names the queues that no answering worker consumes (messages
    there wait for ever). An unreachable broker gives ``reachable: false`` with the error,
    ``queues: null`` and no workers.
    """
    from pacs_ai.pipeline import queues

    deadline = time.monotonic() + timeout_s
    broker: Json = {"url": queues.masked_url(broker_url), "reachable": False, "error": None}
    report: Json = {"broker": broker, "queues": None, "workers": [], "queues_without_worker": []}
    try:
        # Depths first: one quick round trip that also says whether the broker answers.
        depths = queues.queue_depths(broker_url, timeout_s=min(0.5, timeout_s / 4))
        workers = queues.worker_report(broker_url, max(deadline - time.monotonic(), 0.2))
    except queues.broker_errors() as exc:  # TimeoutError is an OSError
        broker["error"] = str(exc) or type(exc).__name__
        return report
    broker["reachable"] = True
    report["queues"] = depths
    report["workers"] = [w.as_json() for w in workers]
    # A worker that did not say what it consumes might consume anything: no alarm then.
    if all(w.queues is not None for w in workers):
        consumed = {q for w in workers for q in w.queues or ()}
        report["queues_without_worker"] = [q for q in queues.QUEUES if q not in consumed]
    return report


def node_status(settings: Settings, engine: Engine, broker_url: str | None = None) -> Json:
    """Node health: is the DICOM listener answering, free disk, what the index holds, and
    the broker, its queues and workers (:func:`broker_status`).

    Everything here is read on the node's host, so the answer is the same whether the CLI
    runs there or asks over HTTP. ``broker_url`` is the running node's (the HTTP service
    knows it); None finds it from the settings (:func:`node_broker_url`).
    """
    from pacs_ai.dicom.scu import echo
    from pacs_ai.storage.spool import Spool

    node = settings.node
    wildcard = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}
    host = wildcard.get(node.bind, node.bind)
    try:
        self_peer = PeerSettings(
            name="self", ae_title=node.ae_title, host=host, port=node.dicom_port
        )
        listening = echo(self_peer, node.ae_title, 3.0) == 0
    except PacsAiError:
        listening = False
    spool = Spool(node.data_dir, int(settings.storage.reserve_mb * 2**20))
    spool.prepare()
    disk = shutil.disk_usage(node.data_dir)
    url = settings.database_url
    return {
        "version": __version__,
        "ae_title": node.ae_title,
        "dicom": {"bind": node.bind, "port": node.dicom_port, "listening": listening},
        "http_port": node.http_port,
        "data_dir": str(node.data_dir.resolve()),
        # Never the credentials of a PostgreSQL URL: only what follows the "@".
        "database": url.split("@")[-1] if "@" in url else url,
        "disk": {
            "free_bytes": disk.free,
            "total_bytes": disk.total,
            "reserve_bytes": spool.reserve_bytes,
            "below_reserve": disk.free < spool.reserve_bytes,
        },
        "counts": {**index.totals(engine), "quarantined": spool.quarantine_count()},
        **broker_status(broker_url or node_broker_url(settings)),
    }


# --- one interface, local or remote --------------------------------------------------------


class Admin(Protocol):
    """What the CLI asks of a node; :class:`LocalAdmin` and ``RemoteAdmin`` both answer."""

    def studies_list(self, state: str | None, limit: int) -> list[Json]: ...
    def study_show(self, study_uid: str) -> list[Json]: ...
    def jobs_list(self, state: str | None, limit: int) -> list[Json]: ...
    def job_show(self, job_id: int) -> Json: ...
    def job_retry(self, job_id: int) -> Json: ...
    def job_cancel(self, job_id: int) -> Json: ...
    def deliveries_list(self, state: str | None, limit: int) -> list[Json]: ...
    def delivery_retry(self, delivery_id: int) -> Json: ...
    def rules_check(self) -> Json: ...
    def rules_explain(self, study_uid: str) -> list[Json]: ...
    def status(self) -> Json: ...
    def tokens_list(self) -> list[Json]: ...
    def worklist(self, filters: Json) -> Json: ...
    def reviews_export(self) -> Json: ...


class LocalAdmin:
    """The node's own database and configuration, read directly (the CLI on the node's host)."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self._engine = engine
        self._opened = False

    @property
    def engine(self) -> Engine:
        # Opened on first use: `rules check` needs no database, and opening one creates it.
        if self._engine is None:
            from pacs_ai.storage.db import open_database

            self._engine = open_database(self.settings.database_url)
            self._opened = True
        return self._engine

    def close(self) -> None:
        if self._opened and self._engine is not None:
            self._engine.dispose()

    def studies_list(self, state: str | None, limit: int) -> list[Json]:
        return studies_list(self.engine, state, limit)

    def study_show(self, study_uid: str) -> list[Json]:
        return study_show(self.engine, study_uid)

    def jobs_list(self, state: str | None, limit: int) -> list[Json]:
        return jobs_list(self.engine, state, limit)

    def job_show(self, job_id: int) -> Json:
        return job_show(self.engine, job_id)

    def job_retry(self, job_id: int) -> Json:
        return job_retry(self.engine, job_id, self.clock())

    def job_cancel(self, job_id: int) -> Json:
        return job_cancel(self.engine, job_id, self.clock())

    def deliveries_list(self, state: str | None, limit: int) -> list[Json]:
        return deliveries_list(self.engine, state, limit)

    def delivery_retry(self, delivery_id: int) -> Json:
        return delivery_retry(self.engine, delivery_id, self.clock())

    def rules_check(self) -> Json:
        return rules_check(self.settings)

    def rules_explain(self, study_uid: str) -> list[Json]:
        return rules_explain(self.settings, self.engine, study_uid)

    def status(self) -> Json:
        return node_status(self.settings, self.engine)

    def tokens_list(self) -> list[Json]:
        return tokens.list_tokens(self.engine)

    def worklist(self, filters: Json) -> Json:
        from pacs_ai.worklist.queries import WorklistFilter, worklist

        return dict(worklist(self.engine, WorklistFilter(**filters)))

    def reviews_export(self) -> Json:
        from pacs_ai.worklist import reviews

        # As GET /api/reviews/export?format=json answers: the rows and a summary per model.
        rows = reviews.export(self.engine)
        return {"by_model": reviews.by_model(rows), "reviews": rows}

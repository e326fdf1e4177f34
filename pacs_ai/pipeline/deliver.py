"""One delivery: a result object or a forwarded series/study, C-STOREd to one peer.

A failure puts the delivery back to PENDING with a later ``next_attempt_at`` (exponential
backoff); the reconciler enqueues it when due. After ``delivery.max_attempts`` it is FAILED,
visible in ``pacs-ai deliveries list`` with the last error, and ``deliveries retry`` revives it.
One peer being down delays only its own deliveries.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import select

from pacs_ai.audit.events import AuditEvent, Kind, Outcome
from pacs_ai.config import PeerSettings
from pacs_ai.dicom import scu
from pacs_ai.dicom.status import describe
from pacs_ai.dicom.tls import for_peer
from pacs_ai.dicomweb.client import stow
from pacs_ai.errors import PacsAiError
from pacs_ai.pipeline import jobs
from pacs_ai.pipeline.infer import WorkerContext
from pacs_ai.pipeline.jobs import ClaimedDelivery
from pacs_ai.storage.schema import SOURCE, instances, series, studies

logger = logging.getLogger(__name__)


def _files(ctx: WorkerContext, delivery: ClaimedDelivery) -> list[Path]:
    settings = ctx.settings
    if delivery.kind in ("SEG", "SR"):
        return [settings.node.data_dir / delivery.payload]
    # A forward sends what was received; the node's own results go as SEG/SR deliveries.
    query = select(instances.c.path).where(
        instances.c.study_id == delivery.study_id, instances.c.kind == SOURCE
    )
    if delivery.kind == "SERIES":
        query = query.join(series, series.c.id == instances.c.series_id).where(
            series.c.series_instance_uid == delivery.payload
        )
    with ctx.engine.connect() as conn:
        return [settings.spool_dir / p for p in conn.execute(query).scalars()]


def _c_store(ctx: WorkerContext, peer: PeerSettings, paths: list[Path]) -> str:
    report = scu.SendReport()
    files = scu.scan(paths, report)
    scu.send(
        files,
        peer,
        ctx.settings.node.ae_title,
        1,
        report,
        timeout_s=ctx.settings.delivery.timeout_s,
        tls=for_peer(ctx.settings.tls, peer),
    )
    if report.ok and files:
        return ""
    if not files:
        return "nothing to send (no DICOM files)"
    path, status, comment = report.failures[0]
    code = f"0x{status:04X} ({describe(status)})" if status >= 0 else "no response"
    return f"{peer.ae_title} answered {code} for {path.name}: {comment}"


def _stow(url: str, paths: list[Path], timeout_s: float) -> str:
    result = stow(url, paths, timeout_s)
    if result.ok:
        return ""
    if result.failed:
        uid, reason = result.failed[0]
        return f"STOW-RS HTTP {result.status}: {uid} refused (reason 0x{reason:04X})"
    return f"STOW-RS HTTP {result.status}"


def _audit(
    ctx: WorkerContext, delivery: ClaimedDelivery, peer: PeerSettings | None, error: str
) -> None:
    with ctx.engine.connect() as conn:
        study_uid = conn.execute(
            select(studies.c.study_instance_uid).where(studies.c.id == delivery.study_id)
        ).scalar_one_or_none()
    ctx.auditor.record(
        AuditEvent(
            Kind.INSTANCES_SENT,
            actor=peer.ae_title if peer is not None else delivery.peer,
            address=peer.host if peer is not None else "",
            outcome=Outcome.SUCCESS if not error else Outcome.MINOR_FAILURE,
            target=study_uid or "",
            detail={
                "peer": delivery.peer,
                "kind": delivery.kind,
                "delivery": delivery.id,
                **({"error": error} if error else {}),
            },
        )
    )


def run_delivery(ctx: WorkerContext, delivery_id: int) -> str:
    delivery = jobs.claim_delivery(ctx.engine, delivery_id, ctx.clock())
    if delivery is None:
        return "NOT_CLAIMED"
    peer = ctx.settings.peer(delivery.peer)
    error = ""
    if peer is None:
        error = f"peer {delivery.peer!r} is no longer configured"
    else:
        try:
            paths = _files(ctx, delivery)
            if not paths:
                error = "nothing to send (files missing)"
            elif peer.protocol == "dicomweb":
                error = _stow(peer.dicomweb_url, paths, ctx.settings.delivery.timeout_s)
            else:
                error = _c_store(ctx, peer, paths)
        except PacsAiError as exc:
            error = str(exc)
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc}"
    _audit(ctx, delivery, peer, error)
    if not error:
        jobs.delivered(ctx.engine, delivery, ctx.clock())
        logger.info("delivery %d (%s) to %s DONE", delivery_id, delivery.kind, delivery.peer)
        return "DONE"
    delay = jobs.delivery_failed(
        ctx.engine, delivery, error, ctx.clock(), ctx.settings.delivery.backoff_s
    )
    return "FAILED" if delay is None else "PENDING"

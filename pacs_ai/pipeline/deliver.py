"""One delivery: a result object or a forwarded series/study, C-STOREd to one peer.

A failure puts the delivery back to PENDING with a later ``next_attempt_at`` (exponential
backoff); the reconciler enqueues it when due. After ``delivery.max_attempts`` it is FAILED,
visible in ``pacs-ai deliveries list`` with the last error, and ``deliveries retry`` revives it.
One peer being down delays only its own deliveries.

To a peer with ``storage_commitment = true``, a delivery that is DONE then asks the peer to
commit to what it stored (:mod:`pacs_ai.storage.commitments`); the same task, sent again by
the reconciler for a DONE delivery, asks again when no report came. A commitment that fails
never undoes the delivery: it only keeps the study's sources (``retention.require_commitment``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import select

from pacs_ai.audit.events import AuditEvent, Kind, Outcome
from pacs_ai.config import PeerSettings
from pacs_ai.dicom import commitment, scu
from pacs_ai.dicom.commitment import Reference
from pacs_ai.dicom.status import describe
from pacs_ai.dicom.tls import for_peer
from pacs_ai.dicomweb.client import stow
from pacs_ai.errors import PacsAiError
from pacs_ai.pipeline import jobs
from pacs_ai.pipeline.infer import WorkerContext
from pacs_ai.pipeline.jobs import ClaimedDelivery
from pacs_ai.storage import commitments
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


def _c_store(
    ctx: WorkerContext, peer: PeerSettings, paths: list[Path], sent: list[Reference]
) -> str:
    """C-STORE ``paths`` to ``peer``; an error, or "" with what was stored added to ``sent``."""
    report = scu.SendReport()
    files = scu.scan(paths, report)
    if report.skipped:
        # Every file of a delivery is a stored instance or result: one that is missing or
        # unreadable must fail the delivery, not make a partial one look DONE.
        path, reason = report.skipped[0]
        return (
            f"{len(report.skipped)} of {len(paths)} file(s) cannot be read, nothing sent "
            f"(first: {path.name}: {reason})"
        )
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
        sent.extend(Reference(f.sop_class_uid, f.sop_instance_uid) for f in files)
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


def request_commitment(ctx: WorkerContext, delivery_id: int) -> str:
    """Ask the peer to commit to a DONE delivery, if a request is due; say what happened."""
    request = commitments.claim_request(ctx.engine, delivery_id, ctx.clock(), ctx.settings.peer)
    if isinstance(request, str):
        return request
    peer = ctx.settings.peer(request.peer)
    assert peer is not None  # claim_request gives up on a peer that is gone
    try:
        commitment.request(
            peer,
            ctx.settings.node.ae_title,
            request.transaction_uid,
            request.references,
            lambda report: commitments.record_report(ctx.engine, report, ctx.clock()),
            timeout_s=ctx.settings.delivery.timeout_s,
            tls=for_peer(ctx.settings.tls, peer),
        )
    except (PacsAiError, OSError, ValueError) as exc:
        commitments.request_failed(ctx.engine, request, str(exc))
        return "COMMITMENT_REQUEST_FAILED"
    logger.info(
        "delivery %d: storage commitment requested from %s (%d instances, transaction %s)",
        delivery_id,
        peer.name,
        len(request.references),
        request.transaction_uid,
    )
    return "COMMITMENT_REQUESTED"


def run_delivery(ctx: WorkerContext, delivery_id: int) -> str:
    per_peer = ctx.settings.delivery.max_per_peer
    delivery = jobs.claim_delivery(ctx.engine, delivery_id, ctx.clock(), per_peer)
    if delivery == jobs.PEER_BUSY:
        logger.info(
            "delivery %d put off: its peer has %d deliveries in flight", delivery_id, per_peer
        )
        return jobs.PEER_BUSY
    if not isinstance(delivery, jobs.ClaimedDelivery):
        # Not PENDING: a DONE delivery comes back here when its commitment is due again.
        outcome = request_commitment(ctx, delivery_id)
        return "NOT_CLAIMED" if outcome == commitments.NOT_DUE else outcome
    peer = ctx.settings.peer(delivery.peer)
    error = ""
    sent: list[Reference] = []  # what a C-STORE stored, for a storage commitment request
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
                error = _c_store(ctx, peer, paths, sent)
        except PacsAiError as exc:
            error = str(exc)
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc}"
    _audit(ctx, delivery, peer, error)
    if not error:
        if peer is not None and peer.storage_commitment:
            # Recorded before DONE: a DONE delivery to such a peer always has its commitment.
            timeout = peer.commitment_timeout_s
            commitments.prepare(ctx.engine, delivery_id, sent, ctx.clock(), timeout)
        jobs.delivered(ctx.engine, delivery, ctx.clock())
        logger.info("delivery %d (%s) to %s DONE", delivery_id, delivery.kind, delivery.peer)
        if peer is not None and peer.storage_commitment:
            request_commitment(ctx, delivery_id)
        return "DONE"
    policy = ctx.settings.delivery
    delay = jobs.delivery_failed(
        ctx.engine, delivery, error, ctx.clock(), policy.backoff_s, policy.backoff_max_s
    )
    return "FAILED" if delay is None else "PENDING"

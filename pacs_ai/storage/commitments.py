"""Storage commitment rows: what each delivery asked a peer to commit to, and the answer.

Only deliveries to peers with ``storage_commitment = true`` take part. Their ``commitment``::

    "" ─► REQUESTED ──report: all committed──► COMMITTED
     (prepared while      ├──report: failures──► FAILED (reasons in commitment_error)
      SENDING, asked       └──no report after commitment_max_requests requests──► UNANSWERED
      once DONE)

A request is claimed before its N-ACTION goes out (a new Transaction UID, recorded in
``commitment_transactions``), because the peer's report can reach the listener, another
process, before the sender has even read the N-ACTION response. A REQUESTED delivery is due
again ``commitment_timeout_s`` after its last request: ``next_attempt_at`` says when, and the
reconciler sends its id to a worker as it does for a PENDING one. A report for an earlier
request of the same delivery still counts. COMMITTED is final; a later report can still turn
FAILED or UNANSWERED into COMMITTED, never the other way round.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, delete, insert, select, update

from pacs_ai.config import PeerSettings
from pacs_ai.dicom.commitment import Reference, Report, judge, new_transaction_uid
from pacs_ai.storage.schema import (
    COMMITMENT_REQUESTED,
    COMMITTED,
    DONE,
    FAILED,
    UNANSWERED,
    commitment_items,
    commitment_transactions,
    deliveries,
)

logger = logging.getLogger(__name__)

NOT_DUE = "NOT_DUE"
UNKNOWN = "UNKNOWN"


def prepare(
    engine: Engine, delivery_id: int, refs: Sequence[Reference], now: float, timeout_s: float
) -> None:
    """Record what a delivery stored, before it is marked DONE; the request follows.

    Should the sender die between the two, the reconciler asks ``timeout_s`` later.
    """
    with engine.begin() as conn:
        conn.execute(delete(commitment_items).where(commitment_items.c.delivery_id == delivery_id))
        if refs:
            conn.execute(
                insert(commitment_items),
                [
                    {
                        "delivery_id": delivery_id,
                        "sop_class_uid": r.sop_class_uid,
                        "sop_instance_uid": r.sop_instance_uid,
                    }
                    for r in refs
                ],
            )
        conn.execute(
            update(deliveries)
            .where(deliveries.c.id == delivery_id)
            .values(
                commitment=COMMITMENT_REQUESTED if refs else FAILED,
                commitment_uid="",
                commitment_requested_at=None,
                commitment_requests=0,
                committed_at=None,
                commitment_error="" if refs else "no SOP instance to ask about",
                next_attempt_at=now + timeout_s,
            )
        )


@dataclass(frozen=True)
class Request:
    """A claimed request: send its N-ACTION now."""

    delivery_id: int
    peer: str
    transaction_uid: str
    number: int  # 1 for the first request of this delivery
    references: tuple[Reference, ...]


def _references(conn: Connection, delivery_id: int) -> tuple[Reference, ...]:
    rows = conn.execute(
        select(commitment_items.c.sop_class_uid, commitment_items.c.sop_instance_uid)
        .where(commitment_items.c.delivery_id == delivery_id)
        .order_by(commitment_items.c.id)
    ).all()
    return tuple(Reference(r.sop_class_uid, r.sop_instance_uid) for r in rows)


def claim_request(
    engine: Engine,
    delivery_id: int,
    now: float,
    peer_settings: Callable[[str], PeerSettings | None],
) -> Request | str:
    """Take the next request of a DONE delivery's commitment, if one is due.

    Returns the :class:`Request`, :data:`NOT_DUE` (nothing to ask now, or another worker is
    asking), or ``UNANSWERED`` when the requests are used up or the peer no longer asks.
    """
    d = deliveries.c
    with engine.begin() as conn:
        row = conn.execute(
            select(
                d.peer,
                d.state,
                d.commitment,
                d.commitment_uid,
                d.commitment_requests,
                d.commitment_requested_at,
            ).where(d.id == delivery_id)
        ).first()
        if row is None or row.state != DONE or row.commitment != COMMITMENT_REQUESTED:
            return NOT_DUE
        # Guarded like every transition here: two workers with the same id, one request.
        unchanged = (
            d.id == delivery_id,
            d.commitment == COMMITMENT_REQUESTED,
            d.commitment_uid == row.commitment_uid,
            d.commitment_requests == row.commitment_requests,
        )
        peer = peer_settings(row.peer)
        gave_up = ""
        if peer is None or not peer.storage_commitment:
            gave_up = f"peer {row.peer!r} is no longer configured for storage commitment"
        elif (
            row.commitment_requested_at is not None
            and row.commitment_requested_at > now - peer.commitment_timeout_s
        ):
            return NOT_DUE
        elif row.commitment_requests >= peer.commitment_max_requests:
            gave_up = (
                f"no report after {row.commitment_requests} request(s) "
                f"(last Transaction UID {row.commitment_uid})"
            )
        if gave_up:
            moved = conn.execute(
                update(deliveries)
                .where(*unchanged)
                .values(commitment=UNANSWERED, commitment_error=gave_up, next_attempt_at=None)
            ).rowcount
            if moved:
                logger.warning(
                    "delivery %d: storage commitment UNANSWERED: %s", delivery_id, gave_up
                )
            return UNANSWERED if moved else NOT_DUE
        assert peer is not None
        uid = new_transaction_uid()
        moved = conn.execute(
            update(deliveries)
            .where(*unchanged)
            .values(
                commitment_uid=uid,
                commitment_requests=d.commitment_requests + 1,
                commitment_requested_at=now,
                next_attempt_at=now + peer.commitment_timeout_s,
            )
        ).rowcount
        if not moved:
            return NOT_DUE
        conn.execute(
            insert(commitment_transactions).values(
                delivery_id=delivery_id, transaction_uid=uid, requested_at=now
            )
        )
        refs = _references(conn, delivery_id)
    return Request(delivery_id, row.peer, uid, row.commitment_requests + 1, refs)


def request_failed(engine: Engine, request: Request, error: str) -> None:
    """The N-ACTION did not go through: say why; it is asked again when due (bounded)."""
    with engine.begin() as conn:
        conn.execute(
            update(deliveries)
            .where(
                deliveries.c.id == request.delivery_id,
                deliveries.c.commitment == COMMITMENT_REQUESTED,
                deliveries.c.commitment_uid == request.transaction_uid,
            )
            .values(commitment_error=f"request {request.number}: {error}"[:1024])
        )
    logger.warning(
        "delivery %d: storage commitment request %d to %s failed: %s",
        request.delivery_id,
        request.number,
        request.peer,
        error,
    )


def record_report(engine: Engine, report: Report, now: float) -> str:
    """Apply an N-EVENT-REPORT; return the delivery's commitment after it, or UNKNOWN."""
    t = commitment_transactions.c
    with engine.begin() as conn:
        tx = conn.execute(
            select(t.id, t.delivery_id).where(t.transaction_uid == report.transaction_uid)
        ).first()
        if tx is None:
            logger.warning(
                "storage commitment report for unknown transaction %s", report.transaction_uid
            )
            return UNKNOWN
        conn.execute(
            update(commitment_transactions)
            .where(t.id == tx.id, t.answered_at.is_(None))
            .values(answered_at=now, event_type=report.event_type)
        )
        current = conn.execute(
            select(deliveries.c.commitment).where(deliveries.c.id == tx.delivery_id)
        ).scalar_one()
        if current == COMMITTED:
            return COMMITTED
        why = judge(report, _references(conn, tx.delivery_id))
        if not why:
            conn.execute(
                update(deliveries)
                .where(deliveries.c.id == tx.delivery_id)
                .values(
                    commitment=COMMITTED,
                    committed_at=now,
                    commitment_error="",
                    next_attempt_at=None,
                )
            )
            logger.info("delivery %d: storage COMMITTED", tx.delivery_id)
            return COMMITTED
        if current == FAILED:
            return FAILED  # the first failure report stands
        conn.execute(
            update(deliveries)
            .where(deliveries.c.id == tx.delivery_id)
            .values(commitment=FAILED, commitment_error=why[:1024], next_attempt_at=None)
        )
    logger.warning("delivery %d: storage commitment FAILED: %s", tx.delivery_id, why)
    return FAILED


def transactions(engine: Engine, delivery_id: int) -> list[dict[str, Any]]:
    """A delivery's requests, oldest first, with when (and whether) each was answered."""
    t = commitment_transactions.c
    with engine.connect() as conn:
        rows = conn.execute(
            select(t.transaction_uid, t.requested_at, t.answered_at, t.event_type)
            .where(t.delivery_id == delivery_id)
            .order_by(t.id)
        ).all()
    return [dict(r._mapping) for r in rows]

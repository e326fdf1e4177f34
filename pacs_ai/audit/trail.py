"""Write audit events to the append-only ``audit`` table (and syslog), and read them back."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, insert, select
from sqlalchemy.exc import SQLAlchemyError

from pacs_ai.audit.atna import SyslogSender
from pacs_ai.audit.events import AuditEvent, Kind, codes
from pacs_ai.config import Settings
from pacs_ai.storage.schema import audit

logger = logging.getLogger(__name__)


# Events of these kinds repeat in bursts (a viewer fetching a study's 500 instances, a port
# scan, a polling client with a bad token): the same (kind, actor, address, target) within
# MERGE_WINDOW_S is recorded once, so the append-only table grows with activity, not traffic.
MERGED_KINDS = frozenset(
    {
        Kind.INSTANCES_ACCESSED,
        Kind.QUERY,
        Kind.ASSOCIATION_REFUSED,
        Kind.AUTHENTICATION_FAILED,
    }
)
MERGE_WINDOW_S = 60.0
_DETAIL_CHARS = 2000


def bounded_detail(detail: dict[str, Any]) -> str:
    """``detail`` as JSON of at most 2000 characters that still parses."""
    text = json.dumps(detail, default=str)
    if len(text) <= _DETAIL_CHARS:
        return text
    short = {k: (v[:200] if isinstance(v, str) else v) for k, v in detail.items()}
    text = json.dumps(short, default=str)
    if len(text) <= _DETAIL_CHARS:
        return text
    return json.dumps({"truncated": text[: _DETAIL_CHARS - 40]})


class Auditor:
    """Records audit events. Safe to share between threads; one per process is enough."""

    def __init__(
        self, engine: Engine, settings: Settings, clock: Callable[[], float] = time.time
    ) -> None:
        self.engine = engine
        self.enabled = settings.audit.enabled
        self.source_id = settings.audit.source_id or settings.node.ae_title
        self.clock = clock
        self._last: dict[tuple[str, str, str, str], float] = {}
        self._lock = threading.Lock()
        self.syslog = (
            SyslogSender(settings.audit.syslog, self.source_id)
            if self.enabled and settings.audit.syslog
            else None
        )

    def record(self, event: AuditEvent) -> None:
        """Keep ``event``. An audit write that fails is logged and never fails the caller's
        work: refusing a PACS's images because the audit table is locked would be worse."""
        if not self.enabled:
            return
        at = self.clock()
        if event.kind in MERGED_KINDS and self._seen_recently(event, at):
            return
        event_id, event_type, action = codes(event.kind)
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    insert(audit).values(
                        at=at,
                        kind=event.kind.value,
                        event_id=event_id[0],
                        event_type=event_type[0] if event_type else "",
                        action=action,
                        outcome=event.outcome,
                        actor=event.actor[:64],
                        address=event.address[:64],
                        target=event.target[:256],
                        detail=bounded_detail(event.detail),
                    )
                )
        except SQLAlchemyError as exc:
            logger.error("audit event %s not recorded: %s", event.kind.value, exc)
        if self.syslog is not None:
            self.syslog.send(event, at)

    def _seen_recently(self, event: AuditEvent, at: float) -> bool:
        key = (event.kind.value, event.actor, event.address, event.target)
        with self._lock:
            if len(self._last) > 10_000:  # forget what is past the window
                self._last = {k: t for k, t in self._last.items() if at - t < MERGE_WINDOW_S}
            last = self._last.get(key)
            if last is not None and at - last < MERGE_WINDOW_S:
                return True
            self._last[key] = at
            return False

    def close(self) -> None:
        if self.syslog is not None:
            self.syslog.close()

    def __enter__(self) -> Auditor:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


COLUMNS = (
    "id",
    "at",
    "kind",
    "event_id",
    "event_type",
    "action",
    "outcome",
    "actor",
    "address",
    "target",
    "detail",
)


def rows(
    engine: Engine, since: float | None = None, kind: str | None = None, limit: int = 100_000
) -> list[dict[str, Any]]:
    """Audit rows, oldest first, JSON-ready."""
    query = select(audit).order_by(audit.c.id).limit(limit)
    if since is not None:
        query = query.where(audit.c.at >= since)
    if kind is not None:
        query = query.where(audit.c.kind == kind)
    with engine.connect() as conn:
        found = conn.execute(query).all()
    return [
        {
            "id": r.id,
            "at": r.at,
            "kind": r.kind,
            "event_id": r.event_id,
            "event_type": r.event_type,
            "action": r.action,
            "outcome": r.outcome,
            "actor": r.actor,
            "address": r.address,
            "target": r.target,
            "detail": json.loads(r.detail) if r.detail else {},
        }
        for r in found
    ]


def kinds() -> list[str]:
    return [k.value for k in Kind]


def record_start(auditor: Auditor, settings: Settings, source: str) -> None:
    """Application Start, and a Software Configuration alert when the settings changed
    since the last start (compared by a hash of the effective settings)."""
    digest = hashlib.sha256(settings.model_dump_json().encode()).hexdigest()
    with auditor.engine.connect() as conn:
        last = conn.execute(
            select(audit.c.detail)
            .where(audit.c.kind == Kind.APPLICATION_START.value)
            .order_by(audit.c.id.desc())
            .limit(1)
        ).scalar_one_or_none()
    previous = json.loads(last).get("settings_sha256") if last else None
    auditor.record(
        AuditEvent(
            Kind.APPLICATION_START,
            actor=auditor.source_id,
            detail={"settings_sha256": digest, "config": source},
        )
    )
    if previous is not None and previous != digest:
        auditor.record(
            AuditEvent(
                Kind.CONFIGURATION_CHANGED,
                actor=auditor.source_id,
                target=source,
                detail={"settings_sha256": digest, "previous_sha256": previous},
            )
        )

"""Receive one instance: check it, write it to the spool, index it, and say what happened.

This is the single entry for every way an instance arrives (C-STORE now, STOW-RS later),
so each gets the same durability and the same answers. The status returned is final: the
caller sends it to the peer as is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from pacs_ai.dicom.header import InstanceHeader, MalformedDataset, read_header
from pacs_ai.dicom.part10 import Part10
from pacs_ai.dicom.status import StoreStatus
from pacs_ai.errors import OutOfSpace
from pacs_ai.storage import index
from pacs_ai.storage.recorder import InstanceRecorder
from pacs_ai.storage.spool import Spool, is_valid_uid

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreOutcome:
    status: StoreStatus
    comment: str = ""
    sop_instance_uid: str = ""
    duplicate: bool = False
    # What the node read of the object, when it got that far (STOW-RS answers with its UIDs).
    header: InstanceHeader | None = None


class Ingest:
    """Turns received bytes into a durable, indexed instance. Safe to share between threads."""

    def __init__(
        self, spool: Spool, engine: Engine, clock: Callable[[], float] = time.time
    ) -> None:
        self.spool = spool
        self.engine = engine
        self.recorder = InstanceRecorder(engine)
        self.clock = clock

    def close(self) -> None:
        """Release the database connections; call once nothing stores any more."""
        self.recorder.close()
        self.engine.dispose()

    def store(
        self,
        data: bytes | Part10,
        calling_ae: str,
        affected_sop_class_uid: str = "",
        affected_sop_instance_uid: str = "",
        origin: str = "",
    ) -> StoreOutcome:
        """Store a Part 10 object (preamble + file meta + data set as received)."""
        if not self.spool.has_room(len(data)):
            logger.warning(
                "refused %s from %s: disk below reserve", affected_sop_instance_uid, calling_ae
            )
            return StoreOutcome(StoreStatus.OUT_OF_RESOURCES, "Disk full on receiver, retry later")
        try:
            header = read_header(data)
        except MalformedDataset as exc:
            return self._refuse(
                data,
                StoreStatus.CANNOT_UNDERSTAND,
                str(exc),
                calling_ae,
                origin,
                affected_sop_instance_uid,
            )
        problem = _check_header(header, affected_sop_class_uid, affected_sop_instance_uid)
        if problem is not None:
            status, reason = problem
            refused = self._refuse(
                data, status, reason, calling_ae, origin, affected_sop_instance_uid
            )
            return replace(refused, header=header)
        try:
            return self._keep(data, header, calling_ae)
        except OutOfSpace as exc:
            logger.warning("refused %s from %s: %s", header.sop_instance_uid, calling_ae, exc)
            return StoreOutcome(
                StoreStatus.OUT_OF_RESOURCES, "Disk full on receiver, retry later", header=header
            )
        except SQLAlchemyError as exc:
            logger.error("index unavailable storing %s: %s", header.sop_instance_uid, exc)
            return StoreOutcome(
                StoreStatus.INDEX_UNAVAILABLE, "Index unavailable, retry later", header=header
            )
        except OSError as exc:
            logger.error("spool write failed for %s: %s", header.sop_instance_uid, exc)
            return StoreOutcome(
                StoreStatus.OUT_OF_RESOURCES, f"Write failed: {exc.strerror}", header=header
            )

    def _keep(self, data: bytes | Part10, header: InstanceHeader, calling_ae: str) -> StoreOutcome:
        sop = header.sop_instance_uid
        relative = self.spool.relative_path(
            header.study_instance_uid, header.series_instance_uid, sop
        )
        # A file without an index row is a crash leftover that was never acknowledged:
        # store over it. Only a file *and* a row make a duplicate, which we keep as first received.
        if self.spool.path_of(relative).exists() and index.count_duplicate(self.engine, sop):
            logger.info("duplicate %s from %s: already held, counted", sop, calling_ae)
            return StoreOutcome(
                StoreStatus.SUCCESS, sop_instance_uid=sop, duplicate=True, header=header
            )
        self.spool.store_at(relative, data)
        added = self.recorder.record(
            header, calling_ae, relative.as_posix(), len(data), self.clock()
        )
        logger.debug("stored %s (study %s) from %s", sop, header.study_instance_uid, calling_ae)
        return StoreOutcome(
            StoreStatus.SUCCESS, sop_instance_uid=sop, duplicate=not added, header=header
        )

    def _refuse(
        self,
        data: bytes | Part10,
        status: StoreStatus,
        reason: str,
        calling_ae: str,
        origin: str,
        affected_sop_instance_uid: str,
    ) -> StoreOutcome:
        kept = self.spool.quarantine(
            data,
            reason,
            {
                "status": f"0x{status.value:04X}",
                "calling_ae": calling_ae,
                "origin": origin,
                # Only a valid UID goes into the sidecar; anything else may be hostile text.
                "affected_sop_instance_uid": affected_sop_instance_uid
                if is_valid_uid(affected_sop_instance_uid)
                else "",
            },
        )
        logger.warning(
            "refused object from %s with 0x%04X (%s); quarantined as %s",
            calling_ae,
            status.value,
            reason,
            kept.name,
        )
        return StoreOutcome(status, reason)


def _check_header(
    header: InstanceHeader, affected_class: str, affected_instance: str
) -> tuple[StoreStatus, str] | None:
    uids = {
        "SOPClassUID": header.sop_class_uid,
        "SOPInstanceUID": header.sop_instance_uid,
        "StudyInstanceUID": header.study_instance_uid,
        "SeriesInstanceUID": header.series_instance_uid,
    }
    missing = [name for name, value in uids.items() if not value]
    if missing:
        return StoreStatus.MISSING_UID, f"Missing {', '.join(missing)}"
    invalid = [name for name, value in uids.items() if not is_valid_uid(value)]
    if invalid:
        return StoreStatus.INVALID_UID, f"Invalid {', '.join(invalid)}"
    if affected_class and affected_class != header.sop_class_uid:
        return StoreStatus.SOP_CLASS_MISMATCH, "SOPClassUID differs from request"
    if affected_instance and affected_instance != header.sop_instance_uid:
        return StoreStatus.SOP_INSTANCE_MISMATCH, "SOPInstanceUID differs from request"
    return None

"""Storage Commitment Push Model (PS3.4 Annex J): the node asks, a peer answers.

After a delivery the node sends an N-ACTION (Action Type ID 1, "Request Storage Commitment")
naming a Transaction UID and every SOP instance it stored. The peer answers later with an
N-EVENT-REPORT for that Transaction UID: Event Type ID 1 when it commits to all of them,
2 when some failed, each failure with a Failure Reason. The report may come on the request's
association while it is open, or on a new association the peer opens to the node's listener
with itself in the SCP role (Orthanc always does the latter).

The datasets are built and read by pure functions here; :func:`request` is the SCU and
:func:`handle_event_report` the one event handler, used on both kinds of association.
"""

from __future__ import annotations

import logging
import ssl
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.dimse_messages import N_EVENT_REPORT_RSP
from pynetdicom.pdu import P_DATA_TF

from pacs_ai.config import PeerSettings
from pacs_ai.dicom.contexts import COMMITMENT_TRANSFER_SYNTAXES, STORAGE_COMMITMENT_PUSH_MODEL
from pacs_ai.dicom.scu import _associate, _make_ae
from pacs_ai.dicom.status import describe
from pacs_ai.errors import NetworkError

logger = logging.getLogger(__name__)

# The well-known SOP Instance every request and report is addressed to (PS3.4 J.3.1).
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
REQUEST_STORAGE_COMMITMENT = 1  # N-ACTION Action Type ID (PS3.4 J.3.2)
ALL_COMMITTED, FAILURES_EXIST = 1, 2  # N-EVENT-REPORT Event Type IDs (PS3.4 J.3.3)

# Failure Reason (0008,1197) values a report may give (PS3.3 C.14.1.1).
FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0112: "no such object instance",
    0x0213: "resource limitation",
    0x0122: "referenced SOP class not supported",
    0x0119: "class / instance conflict",
    0x0131: "duplicate transaction UID",
}

# N-EVENT-REPORT response statuses (PS3.7 10.1.1.1.8).
SUCCESS = 0x0000
PROCESSING_FAILURE = 0x0110
NO_SUCH_SOP_CLASS = 0x0118
NO_SUCH_EVENT_TYPE = 0x0113
INVALID_ARGUMENT_VALUE = 0x0115


class CommitmentError(NetworkError):
    """The peer refused or did not answer a storage commitment request."""


@dataclass(frozen=True, order=True)
class Reference:
    """One SOP instance in a request or a report (Referenced SOP Sequence item)."""

    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class Report:
    """What an N-EVENT-REPORT said about one transaction."""

    transaction_uid: str
    event_type: int
    committed: tuple[Reference, ...]
    failed: tuple[tuple[Reference, int], ...]  # (instance, Failure Reason)


def new_transaction_uid() -> str:
    """A fresh Transaction UID: a random UUID as a "2.25." UID (PS3.5 B.2).

    Never derived from the delivery: a transaction UID must not be reused once answered
    (PS3.4 J.3.3), and a database rebuilt from scratch would derive the same ones again.
    """
    return f"2.25.{uuid.uuid4().int}"


def _item(ref: Reference) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ref.sop_class_uid
    item.ReferencedSOPInstanceUID = ref.sop_instance_uid
    return item


def action_information(transaction_uid: str, refs: Sequence[Reference]) -> Dataset:
    """The N-ACTION-RQ Action Information (PS3.4 Table J.3-1)."""
    if not transaction_uid:
        raise ValueError("Transaction UID (0008,1195) must not be empty.")
    if not refs:
        raise ValueError("Referenced SOP Sequence (0008,1199) needs at least one item.")
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    ds.ReferencedSOPSequence = [_item(r) for r in refs]
    return ds


def event_information(
    transaction_uid: str, committed: Sequence[Reference], failed: Sequence[tuple[Reference, int]]
) -> Dataset:
    """The N-EVENT-REPORT-RQ Event Information a Storage Commitment SCP sends (J.3.3)."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    if committed:
        ds.ReferencedSOPSequence = [_item(r) for r in committed]
    if failed:
        items = []
        for ref, reason in failed:
            item = _item(ref)
            item.FailureReason = reason
            items.append(item)
        ds.FailedSOPSequence = items
    return ds


class UnknownEventType(ValueError):
    """Not an event of storage commitment: answered No such event type (0x0113)."""


def check_event_type(event_type: int) -> None:
    if event_type not in (ALL_COMMITTED, FAILURES_EXIST):
        raise UnknownEventType(
            f"Event Type ID must be 1 or 2 for storage commitment, not {event_type}."
        )


def parse_report(event_type: int, info: Dataset) -> Report:
    """Read an N-EVENT-REPORT's Event Information; ValueError names what is wrong."""
    check_event_type(event_type)
    uid = str(info.get("TransactionUID", "") or "")
    if not uid:
        raise ValueError("Transaction UID (0008,1195) is missing from the event information.")

    def ref(item: Dataset) -> Reference:
        cls = str(item.get("ReferencedSOPClassUID", "") or "")
        inst = str(item.get("ReferencedSOPInstanceUID", "") or "")
        if not cls or not inst:
            raise ValueError("A Referenced SOP Class / Instance UID is missing from an item.")
        return Reference(cls, inst)

    committed = tuple(ref(i) for i in info.get("ReferencedSOPSequence", None) or [])
    failed = tuple(
        (ref(i), int(i.get("FailureReason", PROCESSING_FAILURE) or PROCESSING_FAILURE))
        for i in info.get("FailedSOPSequence", None) or []
    )
    if event_type == FAILURES_EXIST and not failed:
        raise ValueError("Event Type ID 2 (failures exist) needs a Failed SOP Sequence.")
    return Report(uid, event_type, committed, failed)


def failure_text(reason: int) -> str:
    return f"0x{reason:04X} ({FAILURE_REASONS.get(reason, 'unknown reason')})"


def judge(report: Report, requested: Sequence[Reference]) -> str:
    """Empty when ``report`` commits every instance ``requested``; else why not, in words.

    An instance the report neither commits nor lists as failed is not committed: only an
    explicit commitment lets retention remove a source.
    """
    committed = set(report.committed)
    failed = {ref: reason for ref, reason in report.failed}
    missing = [r for r in requested if r not in committed and r not in failed]
    problems = [r for r in requested if r in failed]
    if not problems and not missing:
        return ""
    parts = []
    if problems:
        first = problems[0]
        parts.append(
            f"{len(problems)} of {len(requested)} not committed, e.g. {first.sop_instance_uid}: "
            f"{failure_text(failed[first])}"
        )
    if missing:
        parts.append(
            f"{len(missing)} not mentioned in the report, e.g. {missing[0].sop_instance_uid}"
        )
    return "; ".join(parts)


# --- the network side -------------------------------------------------------------------------


ReportSink = Callable[[Report], object]
"""Records a report (in the index); its return value is only logged."""


def handle_event_report(event: Any, sink: ReportSink) -> tuple[int, Dataset | None]:
    """``evt.EVT_N_EVENT_REPORT``: read the report, record it, answer a status.

    The edge: whatever goes wrong becomes a status and a log line. A report that cannot be
    recorded is answered 0x0110; the peer may send it again, and the node asks again later.
    """
    calling = event.assoc.requestor.ae_title.strip()
    try:
        if str(event.request.AffectedSOPClassUID) != STORAGE_COMMITMENT_PUSH_MODEL:
            return NO_SUCH_SOP_CLASS, None
        event_type = int(event.event_type)
        # Before the event information is decoded: an unknown event's may not be.
        check_event_type(event_type)
        report = parse_report(event_type, event.event_information)
    except UnknownEventType as exc:
        logger.warning("storage commitment report from %s: %s", calling, exc)
        return NO_SUCH_EVENT_TYPE, None
    except ValueError as exc:
        logger.warning("storage commitment report from %s refused: %s", calling, exc)
        return INVALID_ARGUMENT_VALUE, None
    except Exception:
        logger.exception("storage commitment report from %s could not be read", calling)
        return PROCESSING_FAILURE, None
    try:
        outcome = sink(report)
    except Exception:
        logger.exception(
            "storage commitment report %s from %s not recorded", report.transaction_uid, calling
        )
        return PROCESSING_FAILURE, None
    logger.info(
        "storage commitment report from %s on %s for %s: %d committed, %d failed (%s)",
        calling,
        "a new association" if event.assoc.is_acceptor else "the request's association",
        report.transaction_uid,
        len(report.committed),
        len(report.failed),
        outcome,
    )
    return SUCCESS, None


def request(
    peer: PeerSettings,
    calling_ae: str,
    transaction_uid: str,
    refs: Sequence[Reference],
    sink: ReportSink,
    timeout_s: float = 60.0,
    tls: ssl.SSLContext | None = None,
) -> None:
    """Send the N-ACTION; raise :class:`CommitmentError` unless the peer accepts it.

    The association stays open ``peer.commitment_wait_s`` seconds, or until a report comes
    on it, which goes to ``sink`` like one on the listener.
    """
    info = action_information(transaction_uid, refs)
    ae = _make_ae(calling_ae, timeout_s)
    ae.add_requested_context(STORAGE_COMMITMENT_PUSH_MODEL, list(COMMITMENT_TRANSFER_SYNTAXES))
    # Set once our answer to a report is on the wire, not when the report comes: the answer
    # is sent after the handler returns, and a release queued before it would leave the peer
    # waiting for it (and us for the release) until a timeout.
    reported = threading.Event()
    answering = threading.Event()

    def on_report(event: Any) -> tuple[int, Dataset | None]:
        return handle_event_report(event, sink)

    def on_dimse_sent(event: Any) -> None:
        if isinstance(event.message, N_EVENT_REPORT_RSP):
            answering.set()

    def on_pdu_sent(event: Any) -> None:
        if answering.is_set() and isinstance(event.pdu, P_DATA_TF):
            reported.set()

    assoc = _associate(ae, peer, tls=tls)
    assoc.bind(evt.EVT_N_EVENT_REPORT, on_report)
    assoc.bind(evt.EVT_DIMSE_SENT, on_dimse_sent)
    assoc.bind(evt.EVT_PDU_SENT, on_pdu_sent)
    try:
        try:
            status, _ = assoc.send_n_action(
                info,
                REQUEST_STORAGE_COMMITMENT,
                STORAGE_COMMITMENT_PUSH_MODEL,
                STORAGE_COMMITMENT_INSTANCE,
            )
        except ValueError as exc:
            raise CommitmentError(
                f"{peer.ae_title} does not accept Storage Commitment Push Model: {exc}"
            ) from None
        if "Status" not in status:
            raise CommitmentError(f"{peer.ae_title} did not answer the N-ACTION (aborted?)")
        code = int(status.Status)
        if code != SUCCESS:
            raise CommitmentError(
                f"{peer.ae_title} answered the N-ACTION with 0x{code:04X} "
                f"({FAILURE_REASONS.get(code) or describe(code)})"
            )
        if peer.commitment_wait_s > 0:
            reported.wait(peer.commitment_wait_s)
    finally:
        if assoc.is_established:
            assoc.release()

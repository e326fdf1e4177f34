"""Audit events and their DICOM codes (PS3.15 A.5.3, DCM coding scheme)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Kind(StrEnum):
    """What happened; each maps to a DICOM audit EventID (and, for some, an EventTypeCode)."""

    APPLICATION_START = "application-start"
    APPLICATION_STOP = "application-stop"
    INSTANCES_RECEIVED = "instances-received"
    INSTANCES_SENT = "instances-sent"
    INSTANCES_ACCESSED = "instances-accessed"
    INSTANCES_DELETED = "instances-deleted"
    QUERY = "query"
    REVIEW = "review"
    ADMIN_ACTION = "admin-action"
    CONFIGURATION_CHANGED = "configuration-changed"
    SECURITY_ATTRIBUTES_CHANGED = "security-attributes-changed"
    ASSOCIATION_REFUSED = "association-refused"
    AUTHENTICATION_FAILED = "authentication-failed"


# (EventID code, meaning), (EventTypeCode or None), EventActionCode (C R U D E).
_CODES: dict[Kind, tuple[tuple[str, str], tuple[str, str] | None, str]] = {
    Kind.APPLICATION_START: (
        ("110100", "Application Activity"),
        ("110120", "Application Start"),
        "E",
    ),
    Kind.APPLICATION_STOP: (
        ("110100", "Application Activity"),
        ("110121", "Application Stop"),
        "E",
    ),
    Kind.INSTANCES_RECEIVED: (("110104", "DICOM Instances Transferred"), None, "C"),
    Kind.INSTANCES_SENT: (("110104", "DICOM Instances Transferred"), None, "R"),
    Kind.INSTANCES_ACCESSED: (("110103", "DICOM Instances Accessed"), None, "R"),
    Kind.INSTANCES_DELETED: (("110103", "DICOM Instances Accessed"), None, "D"),
    Kind.QUERY: (("110112", "Query"), None, "E"),
    Kind.REVIEW: (("110103", "DICOM Instances Accessed"), None, "U"),
    Kind.ADMIN_ACTION: (
        ("110100", "Application Activity"),
        ("110132", "Use of a restricted function"),
        "E",
    ),
    Kind.CONFIGURATION_CHANGED: (
        ("110113", "Security Alert"),
        ("110131", "Software Configuration"),
        "E",
    ),
    Kind.SECURITY_ATTRIBUTES_CHANGED: (
        ("110113", "Security Alert"),
        ("110137", "User security Attributes Changed"),
        "E",
    ),
    Kind.ASSOCIATION_REFUSED: (
        ("110113", "Security Alert"),
        ("110126", "Node Authentication"),
        "E",
    ),
    Kind.AUTHENTICATION_FAILED: (
        ("110113", "Security Alert"),
        ("110129", "User Authentication"),
        "E",
    ),
}


class Outcome:
    """EventOutcomeIndicator values."""

    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8
    MAJOR_FAILURE = 12


def codes(kind: Kind) -> tuple[tuple[str, str], tuple[str, str] | None, str]:
    return _CODES[kind]


@dataclass(frozen=True)
class AuditEvent:
    kind: Kind
    # Who acted: a calling AE title, a token name, or the node itself.
    actor: str
    # Where from: an IP address, or "" for the node's own actions.
    address: str = ""
    outcome: int = Outcome.SUCCESS
    # What was acted on: a Study Instance UID, a peer name, a request path.
    target: str = ""
    # Anything else worth keeping (counts, reasons); never patient names.
    detail: dict[str, Any] = field(default_factory=dict)

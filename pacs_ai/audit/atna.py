"""An audit event as a DICOM audit message (PS3.15 A.5.1) in an RFC 5424 syslog frame,
sent over UDP (RFC 5426) as IHE ATNA's Record Audit Event transaction does.

UDP never blocks the node on a slow or dead collector; a site that needs reliable or
encrypted transport (RFC 5425) points this at a local relay such as rsyslog.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from datetime import UTC, datetime
from xml.etree import ElementTree as ET

from pacs_ai.audit.events import AuditEvent, Kind, codes

logger = logging.getLogger(__name__)

# authpriv (10) * 8 + notice (5)
PRIORITY = 85
MSGID = "IHE+RFC-3881"

_RECEIVER = {Kind.INSTANCES_RECEIVED}
_OBJECT_IS_STUDY = {
    Kind.INSTANCES_RECEIVED,
    Kind.INSTANCES_SENT,
    Kind.INSTANCES_ACCESSED,
    Kind.INSTANCES_DELETED,
    Kind.REVIEW,
}


def _code(parent: ET.Element, tag: str, code: tuple[str, str]) -> None:
    ET.SubElement(
        parent, tag, {"csd-code": code[0], "codeSystemName": "DCM", "originalText": code[1]}
    )


def audit_message(event: AuditEvent, at: float, source_id: str) -> bytes:
    """The DICOM audit message XML for ``event``."""
    event_id, event_type, action = codes(event.kind)
    root = ET.Element("AuditMessage")
    ident = ET.SubElement(
        root,
        "EventIdentification",
        {
            "EventActionCode": action,
            "EventDateTime": datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds"),
            "EventOutcomeIndicator": str(event.outcome),
        },
    )
    _code(ident, "EventID", event_id)
    if event_type is not None:
        _code(ident, "EventTypeCode", event_type)
    actor = {"UserID": event.actor or source_id, "UserIsRequestor": "true"}
    if event.address:
        actor |= {"NetworkAccessPointID": event.address, "NetworkAccessPointTypeCode": "2"}
    requestor = ET.SubElement(root, "ActiveParticipant", actor)
    node = ET.SubElement(
        root, "ActiveParticipant", {"UserID": source_id, "UserIsRequestor": "false"}
    )
    if event.kind in (Kind.INSTANCES_RECEIVED, Kind.INSTANCES_SENT):
        source, destination = (requestor, node) if event.kind in _RECEIVER else (node, requestor)
        _code(source, "RoleIDCode", ("110153", "Source Role ID"))
        _code(destination, "RoleIDCode", ("110152", "Destination Role ID"))
    audit_source = ET.SubElement(root, "AuditSourceIdentification", {"AuditSourceID": source_id})
    # 4: Application Server process tier in a multi-tier system.
    ET.SubElement(audit_source, "AuditSourceTypeCode", {"csd-code": "4"})
    if event.target:
        obj = ET.SubElement(
            root,
            "ParticipantObjectIdentification",
            {"ParticipantObjectID": event.target, "ParticipantObjectTypeCode": "2"},
        )
        if event.kind in _OBJECT_IS_STUDY:
            obj.set("ParticipantObjectTypeCodeRole", "3")
            _code(obj, "ParticipantObjectIDTypeCode", ("110180", "Study Instance UID"))
        else:
            _code(obj, "ParticipantObjectIDTypeCode", ("12", "URI"))
    return bytes(ET.tostring(root, encoding="utf-8", xml_declaration=True))


def syslog_frame(message: bytes, at: float, app_name: str = "pacs-ai") -> bytes:
    stamp = datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds")
    host = socket.gethostname() or "-"
    header = f"<{PRIORITY}>1 {stamp} {host} {app_name} {os.getpid()} {MSGID} - "
    return header.encode("ascii", "replace") + message


class SyslogSender:
    """Best-effort UDP sender for ``udp://host:port``."""

    def __init__(self, url: str, source_id: str) -> None:
        host, _, port = url.removeprefix("udp://").rpartition(":")
        self.address = (host.strip("[]"), int(port))
        self.source_id = source_id
        family = socket.AF_INET6 if ":" in self.address[0] else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)

    def send(self, event: AuditEvent, at: float | None = None) -> None:
        at = time.time() if at is None else at
        frame = syslog_frame(audit_message(event, at, self.source_id), at)
        try:
            self.sock.sendto(frame, self.address)
        except OSError as exc:
            logger.warning("audit syslog to %s:%d failed: %s", *self.address, exc)

    def close(self) -> None:
        self.sock.close()

"""DIMSE status codes the node answers a C-STORE with (PS3.4 B.2.3, PS3.7 C.4).

Failures the sender should retry later sit in the A7xx range (Refused: Out of Resources);
failures retrying cannot fix sit in Cxxx (Cannot understand) or A900, and the object is
kept in quarantine with the reason.
"""

from __future__ import annotations

from enum import IntEnum


class StoreStatus(IntEnum):
    SUCCESS = 0x0000
    PROCESSING_FAILURE = 0x0110
    OUT_OF_RESOURCES = 0xA700
    INDEX_UNAVAILABLE = 0xA701
    SOP_CLASS_MISMATCH = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    MISSING_UID = 0xC001
    INVALID_UID = 0xC002
    SOP_INSTANCE_MISMATCH = 0xC003

    @property
    def retryable(self) -> bool:
        return 0xA700 <= self.value <= 0xA7FF

    @property
    def meaning(self) -> str:
        return _MEANINGS[self]


_MEANINGS = {
    StoreStatus.SUCCESS: "stored (or already held)",
    StoreStatus.PROCESSING_FAILURE: "unexpected error in the node; the object is quarantined",
    StoreStatus.OUT_OF_RESOURCES: "free disk below the reserve; retry later",
    StoreStatus.INDEX_UNAVAILABLE: "index database unavailable; retry later",
    StoreStatus.SOP_CLASS_MISMATCH: "SOP Class UID in the data set differs from the request",
    StoreStatus.CANNOT_UNDERSTAND: "data set truncated or not parseable",
    StoreStatus.MISSING_UID: "Study, Series or SOP Instance UID missing",
    StoreStatus.INVALID_UID: "a UID is not digits and dots of at most 64 characters",
    StoreStatus.SOP_INSTANCE_MISMATCH: "SOP Instance UID in the data set differs from the request",
}


def describe(status: int) -> str:
    """A short human name for any status a peer may answer, ours or theirs."""
    try:
        known = StoreStatus(status)
    except ValueError:
        pass
    else:
        return f"{known.name.lower().replace('_', ' ')}"
    if 0xA700 <= status <= 0xA7FF:
        return "out of resources"
    if 0xA900 <= status <= 0xA9FF:
        return "data set does not match SOP class"
    if 0xC000 <= status <= 0xCFFF:
        return "cannot understand"
    if status in (0xB000, 0xB006, 0xB007):
        return "warning"
    return "failure"

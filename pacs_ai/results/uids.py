"""Deterministic UIDs for the objects the encode stage writes.

A job that is re-run after a crash must produce the same SOP Instance UIDs, so that the PACS
receives a duplicate of the first result instead of a second, conflicting one (DESIGN.md,
principle 3). The UIDs are therefore derived, not generated: a UUID version 5 (RFC 9562) of a
fixed pacs-ai namespace and a name, written as a "2.25." UID (PS3.5 §B.2), which needs no
registered root and is at most 44 characters long.
"""

from __future__ import annotations

import uuid
from typing import Final

# Manufacturer (0008,0070) of every object the node writes: how the node, and the rules,
# recognise its own results when a PACS sends them back.
MANUFACTURER: Final = "pacs-ai"

# Fixed for the life of the project: changing it changes every UID a re-run would produce.
PACS_AI_NAMESPACE: Final = uuid.UUID("6f3c2a8e-5d1b-5c4e-9a7f-2b8d4e6c1a90")

# Device UIDs live in their own namespace so that no (job, kind) pair can ever produce one.
_DEVICE_NAMESPACE: Final = uuid.uuid5(PACS_AI_NAMESPACE, "device-observer")

SEG_INSTANCE: Final = "seg-instance"
SEG_SERIES: Final = "seg-series"
SR_INSTANCE: Final = "sr-instance"
SR_SERIES: Final = "sr-series"


def _uid(namespace: uuid.UUID, name: str) -> str:
    return f"2.25.{uuid.uuid5(namespace, name).int}"


def result_uid(job_id: str | int, kind: str) -> str:
    """The UID of output ``kind`` (e.g. :data:`SEG_INSTANCE`) of job ``job_id``.

    The same (job, kind) always gives the same UID; any other pair gives another one. Kinds
    other than the four constants are allowed, e.g. ``"tracking-3"`` for a finding's
    Tracking UID.
    """
    # A colon in the kind would let two different pairs spell the same name ("a:b" + "c" and
    # "a" + "b:c"); job ids may hold colons, the kind after the last one is unambiguous.
    if not kind or ":" in kind:
        raise ValueError(f"kind must be a non-empty string without ':', not {kind!r}")
    return _uid(PACS_AI_NAMESPACE, f"{job_id}:{kind}")


def device_uid(model_name: str) -> str:
    """Device Observer UID (PS3.16 TID 1004) of a model, the same on every node and job."""
    return _uid(_DEVICE_NAMESPACE, model_name)

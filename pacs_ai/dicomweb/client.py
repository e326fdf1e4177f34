"""STOW-RS client: store Part 10 objects at a DICOMweb origin server (PS3.18 10.5).

One POST per call, ``multipart/related; type="application/dicom"`` (Orthanc answers 415
without the ``type`` parameter). The response's Failed SOP Sequence (0008,1198) says which
objects were refused and why (Failure Reason, (0008,1197)).
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pacs_ai.errors import NetworkError

logger = logging.getLogger(__name__)

_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_SEQUENCE = "00081199"
_SOP_INSTANCE_UID = "00081155"
_FAILURE_REASON = "00081197"


@dataclass
class StowResult:
    status: int
    stored: list[str] = field(default_factory=list)
    failed: list[tuple[str, int]] = field(default_factory=list)  # (SOP Instance UID, reason)

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.failed


def _multipart(parts: Sequence[bytes], boundary: str) -> bytes:
    chunks = []
    for part in parts:
        chunks += [
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(),
            part,
            b"\r\n",
        ]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks)


def _values(item: dict[str, object], tag: str) -> list[object]:
    element = item.get(tag)
    if isinstance(element, dict):
        value = element.get("Value", [])
        return list(value) if isinstance(value, list) else []
    return []


def stow(
    base_url: str, files: Sequence[Path], timeout_s: float = 60.0, token: str | None = None
) -> StowResult:
    """POST ``files`` to ``{base_url}/studies``; raise :class:`NetworkError` if unreachable."""
    boundary = f"pacs-ai-{uuid.uuid4().hex}"
    body = _multipart([f.read_bytes() for f in files], boundary)
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
    }
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        f"{base_url.rstrip('/')}/studies", data=body, headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        raise NetworkError(f"STOW-RS to {base_url} failed: {getattr(exc, 'reason', exc)}") from None
    result = StowResult(status)
    try:
        answer = json.loads(raw) if raw else {}
    except ValueError:
        answer = {}
    if isinstance(answer, list):
        answer = answer[0] if answer else {}
    for item in _values(answer, _REFERENCED_SOP_SEQUENCE):
        if isinstance(item, dict):
            result.stored += [str(v) for v in _values(item, _SOP_INSTANCE_UID)]
    for item in _values(answer, _FAILED_SOP_SEQUENCE):
        if isinstance(item, dict):
            uid = next(iter(_values(item, _SOP_INSTANCE_UID)), "")
            reason = next(iter(_values(item, _FAILURE_REASON)), 0)
            result.failed.append((str(uid), int(str(reason) or 0)))
    logger.info(
        "STOW-RS %s: HTTP %d, %d stored, %d failed",
        base_url,
        status,
        len(result.stored),
        len(result.failed),
    )
    return result

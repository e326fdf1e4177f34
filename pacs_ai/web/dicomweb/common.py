"""Small pieces every DICOMweb resource uses: URLs, UID checks, Warning headers."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request

from pacs_ai.storage.spool import is_valid_uid
from pacs_ai.storage.tokens import Principal
from pacs_ai.web.auth import Permission, requires
from pacs_ai.web.context import WebContext

Reader = Annotated[Principal, Depends(requires(Permission.DICOMWEB_READ))]
Writer = Annotated[Principal, Depends(requires(Permission.DICOMWEB_WRITE))]

_RESOURCES = ("/studies", "/series", "/instances")


def context(request: Request) -> WebContext:
    ctx: WebContext = request.app.state.ctx
    return ctx


def service_root(request: Request) -> str:
    """The DICOMweb base URL as the client reached it (RetrieveURL values start with it)."""
    path = request.url.path
    ends = [i for i in (path.find(r) for r in _RESOURCES) if i >= 0]
    root = path[: min(ends)] if ends else path.rstrip("/")
    return f"{request.url.scheme}://{request.url.netloc}{root}"


def check_uids(**uids: str | None) -> None:
    """400 for a path segment that is not a UID (it would never match, so say why)."""
    for name, uid in uids.items():
        if uid is not None and not is_valid_uid(uid):
            raise HTTPException(
                400,
                f"{name} {uid[:80]!r} is not a DICOM UID (digits and dots, at most 64 characters)",
            )


def warning_header(warnings: list[str]) -> dict[str, str]:
    """PS3.18 8.4.4 Warning header values (code 299); client text is reduced to safe ASCII."""
    if not warnings:
        return {}
    cleaned = [
        "".join(c if " " <= c <= "~" and c not in '"\\' else "?" for c in w)[:500] for w in warnings
    ]
    return {"Warning": ", ".join(f'299 pacs-ai "{w}"' for w in cleaned)}

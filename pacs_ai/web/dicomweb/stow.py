"""STOW-RS (PS3.18 10.5): Part 10 objects in, through the same ingest as C-STORE.

The body is read as it arrives and each part is stored as soon as it is complete, so the
node holds one part in memory, not the request. Every part gets the C-STORE treatment:
durable before it is reported stored, refused ones quarantined with the reason.

Status mapping (PS3.18 Table 10.5.3-1; failure reasons from Table I.2-2):

- 200: every part stored (duplicates of held instances count as stored, as in C-STORE).
- 202: some stored, some failed; Failed SOP Sequence (0008,1198) says which and why.
- 409: none stored (unparseable 0xC000, missing/invalid UIDs 0xC001/0xC002, a part that
  is not application/dicom 0xC000, another study than the URL names 0xC409).
- 503 with Retry-After: none stored and every failure is retryable (A7xx: disk below the
  reserve, index unavailable), the HTTP face of C-STORE's "out of resources, retry later".
- 400 malformed multipart, 413 body over ``[http] max_upload_mb``, 415 a Content-Type
  other than ``multipart/related; type="application/dicom"``.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from pacs_ai.audit.events import AuditEvent, Kind
from pacs_ai.dicom.header import MalformedDataset, read_header
from pacs_ai.dicom.status import StoreStatus
from pacs_ai.storage.tokens import Principal
from pacs_ai.web.context import WebContext
from pacs_ai.web.dicomweb.common import Writer, check_uids, context, service_root
from pacs_ai.web.dicomweb.dicomjson import MEDIA_TYPE, element, tag_key
from pacs_ai.web.dicomweb.multipart import (
    MediaTypeError,
    MultipartError,
    MultipartReader,
    Part,
    stow_boundary,
)

logger = logging.getLogger(__name__)

router = APIRouter()

# The calling AE title of instances stored by a token that stands for no peer.
STOW_AE = "STOW-RS"
# PS3.18 Table I.2-2 has no code for an instance of another study than the URL names
# (Table 10.5.3-1 gives it as a cause of 409). It is a "cannot understand" (Cxxx) case;
# 0xC409 is what dcm4chee-arc answers, so clients that know one archive know this.
STUDY_MISMATCH = 0xC409
# Bounds the response and the quarantine: a bigger study goes in several requests.
MAX_PARTS = 100_000
RETRY_AFTER_S = 60


@dataclass(frozen=True)
class PartResult:
    status: int
    reason: str = ""
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    study_instance_uid: str = ""
    series_instance_uid: str = ""

    @property
    def stored(self) -> bool:
        return self.status == StoreStatus.SUCCESS


@router.post("/studies")
async def store_instances(request: Request, principal: Writer) -> Response:
    return await _store(request, principal, None)


@router.post("/studies/{study}")
async def store_instances_in_study(study: str, request: Request, principal: Writer) -> Response:
    check_uids(StudyInstanceUID=study)
    return await _store(request, principal, study)


async def _store(request: Request, principal: Principal, study: str | None) -> Response:
    try:
        return await _receive(request, principal, study)
    except HTTPException as exc:
        # The sender sees the reason; the log keeps it for whoever runs the node.
        logger.warning(
            "STOW-RS by %s refused (HTTP %d): %s", principal.name, exc.status_code, exc.detail
        )
        raise


async def _receive(request: Request, principal: Principal, study: str | None) -> Response:
    ctx = context(request)
    try:
        boundary = stow_boundary(request.headers.get("content-type", ""))
    except MediaTypeError as exc:
        raise HTTPException(415, str(exc)) from None
    except MultipartError as exc:
        raise HTTPException(400, str(exc)) from None
    limit_mb = ctx.settings.http.max_upload_mb
    limit = int(limit_mb * 2**20)
    _check_declared_length(request, limit, limit_mb)
    calling_ae = _calling_ae(ctx, principal)
    reader = MultipartReader(boundary)
    results: list[PartResult] = []
    try:
        await _read_parts(request, reader, ctx, calling_ae, study, limit, limit_mb, results)
    finally:
        # What was stored is audited even when the upload is then refused (413, broken body).
        await run_in_threadpool(_audit_stored, request, principal, results)
    if not results:
        raise HTTPException(
            400, "the request holds no parts; send one application/dicom part per instance"
        )
    return _answer(request, principal, results)


async def _read_parts(
    request: Request,
    reader: MultipartReader,
    ctx: WebContext,
    calling_ae: str,
    study: str | None,
    limit: int,
    limit_mb: float,
    results: list[PartResult],
) -> None:
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise HTTPException(413, _too_large(limit_mb, stored=len(results)))
            for part in reader.feed(chunk):
                if len(results) >= MAX_PARTS:
                    raise HTTPException(
                        413, f"more than {MAX_PARTS} parts; send the study in several requests"
                    )
                results.append(await run_in_threadpool(_store_part, ctx, part, calling_ae, study))
        reader.close()
    except MultipartError as exc:
        if not results:
            raise HTTPException(400, f"malformed multipart body: {exc}") from None
        # Parts already stored are durable and must be reported; the rest is one failure.
        results.append(PartResult(StoreStatus.CANNOT_UNDERSTAND, str(exc)))


def _audit_stored(request: Request, principal: Principal, results: list[PartResult]) -> None:
    counts = Counter(r.study_instance_uid for r in results if r.stored)
    for study_uid, count in counts.items():
        request.app.state.auditor.record(
            AuditEvent(
                Kind.INSTANCES_RECEIVED,
                actor=principal.name,
                address=request.client.host if request.client else "",
                target=study_uid,
                detail={"instances": count, "protocol": "STOW-RS"},
            )
        )


def _check_declared_length(request: Request, limit: int, limit_mb: float) -> None:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, _too_large(limit_mb, stored=0))


def _too_large(limit_mb: float, stored: int) -> str:
    kept = f"; the first {stored} instance(s) were stored" if stored else ""
    return (
        f"the request is larger than {limit_mb:g} MiB ([http] max_upload_mb){kept}; "
        "send the study in several requests"
    )


def _calling_ae(ctx: WebContext, principal: Principal) -> str:
    """A token that stands for a peer stores as that peer, so results go back by its rules."""
    if principal.peer:
        peer = ctx.settings.peer(principal.peer)
        if peer is not None:
            return peer.ae_title
        logger.warning(
            "token %r stands for peer %r, which is not configured; storing as %s",
            principal.name,
            principal.peer,
            STOW_AE,
        )
    return STOW_AE


def _store_part(ctx: WebContext, part: Part, calling_ae: str, study: str | None) -> PartResult:
    if part.content_type not in ("", "application/dicom"):
        return PartResult(
            StoreStatus.CANNOT_UNDERSTAND,
            f"part of type {part.content_type!r}; only application/dicom parts are stored",
        )
    if study is not None:
        mismatch = _other_study(part.body, study)
        if mismatch is not None:
            return mismatch
    outcome = ctx.ingest.store(part.body, calling_ae, origin="stow")
    h = outcome.header
    if h is None:
        return PartResult(outcome.status, outcome.comment)
    return PartResult(
        outcome.status,
        outcome.comment,
        h.sop_class_uid,
        h.sop_instance_uid,
        h.study_instance_uid,
        h.series_instance_uid,
    )


def _other_study(data: bytes, study: str) -> PartResult | None:
    """A failure for an instance of another study than the URL's; None if it may go on."""
    try:
        h = read_header(data)
    except MalformedDataset:
        return None  # the ingest refuses and quarantines it with the reason
    if h.study_instance_uid == study:
        return None
    return PartResult(
        STUDY_MISMATCH,
        f"instance of study {h.study_instance_uid}, not of {study} named in the URL",
        h.sop_class_uid,
        h.sop_instance_uid,
        h.study_instance_uid,
        h.series_instance_uid,
    )


def _answer(request: Request, principal: Principal, results: list[PartResult]) -> Response:
    root = service_root(request)
    stored = [r for r in results if r.stored]
    failed = [r for r in results if not r.stored]
    body: dict[str, Any] = {
        tag_key("ReferencedSOPSequence"): _sequence([_stored_item(r, root) for r in stored]),
        tag_key("FailedSOPSequence"): _sequence([_failed_item(r) for r in failed]),
    }
    studies = {r.study_instance_uid for r in stored}
    if len(studies) == 1:
        body[tag_key("RetrieveURL")] = element("UR", [f"{root}/studies/{studies.pop()}"])
    headers: dict[str, str] = {}
    if not failed:
        code = 200
    elif stored:
        code = 202
    elif all(0xA700 <= r.status <= 0xA7FF for r in failed):
        code, headers = 503, {"Retry-After": str(RETRY_AFTER_S)}
    else:
        code = 409
    logger.info(
        "STOW-RS by %s: %d stored, %d failed%s (HTTP %d)",
        principal.name,
        len(stored),
        len(failed),
        f", first failure 0x{failed[0].status:04X} {failed[0].sop_instance_uid}: {failed[0].reason}"
        if failed
        else "",
        code,
    )
    return JSONResponse(
        dict(sorted(body.items())), status_code=code, media_type=MEDIA_TYPE, headers=headers
    )


def _sequence(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}


def _stored_item(r: PartResult, root: str) -> dict[str, Any]:
    url = (
        f"{root}/studies/{r.study_instance_uid}/series/{r.series_instance_uid}"
        f"/instances/{r.sop_instance_uid}"
    )
    return {
        tag_key("ReferencedSOPClassUID"): element("UI", [r.sop_class_uid]),
        tag_key("ReferencedSOPInstanceUID"): element("UI", [r.sop_instance_uid]),
        tag_key("RetrieveURL"): element("UR", [url]),
    }


def _failed_item(r: PartResult) -> dict[str, Any]:
    # Unreadable parts have no UIDs to name: the items then carry the reason alone.
    return {
        tag_key("ReferencedSOPClassUID"): element("UI", [r.sop_class_uid]),
        tag_key("ReferencedSOPInstanceUID"): element("UI", [r.sop_instance_uid]),
        tag_key("FailureReason"): element("US", [int(r.status)]),
    }

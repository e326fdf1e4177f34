"""WADO-RS (PS3.18 10.4): instances as stored, and their metadata as DICOM JSON.

Instances go out as ``multipart/related; type="application/dicom"``, each part the stored
bytes as they were received (or as the node wrote a result), streamed file by file in
chunks so that a 500-image series never sits in memory. The node does not transcode: a
client that accepts only transfer syntaxes the node does not hold gets 406. An Accept
without a transfer-syntax parameter gets the stored syntax (PS3.18 would have explicit VR
little endian; serving the stored bytes is what viewers and PACS expect of an archive).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import StreamingResponse

from pacs_ai.web.dicomweb.common import Reader, check_uids, context, service_root
from pacs_ai.web.dicomweb.dicomjson import MEDIA_TYPE, element, read_metadata, tag_key
from pacs_ai.web.dicomweb.files import StoredInstance, locate
from pacs_ai.web.dicomweb.multipart import parse_media_type

logger = logging.getLogger(__name__)

router = APIRouter()

CHUNK = 1 << 20
_ANY_DICOM = ("", "application/dicom", "application/*", "*/*")


@router.get("/studies/{study}")
def retrieve_study(study: str, request: Request, _: Reader) -> Response:
    return _retrieve(request, study)


@router.get("/studies/{study}/series/{series}")
def retrieve_series(study: str, series: str, request: Request, _: Reader) -> Response:
    return _retrieve(request, study, series)


@router.get("/studies/{study}/series/{series}/instances/{sop}")
def retrieve_instance(study: str, series: str, sop: str, request: Request, _: Reader) -> Response:
    return _retrieve(request, study, series, sop)


@router.get("/studies/{study}/metadata")
def study_metadata(study: str, request: Request, _: Reader) -> Response:
    return _metadata(request, study)


@router.get("/studies/{study}/series/{series}/metadata")
def series_metadata(study: str, series: str, request: Request, _: Reader) -> Response:
    return _metadata(request, study, series)


@router.get("/studies/{study}/series/{series}/instances/{sop}/metadata")
def instance_metadata(study: str, series: str, sop: str, request: Request, _: Reader) -> Response:
    return _metadata(request, study, series, sop)


def _found(
    request: Request, study: str, series: str | None, sop: str | None
) -> list[StoredInstance]:
    check_uids(StudyInstanceUID=study, SeriesInstanceUID=series, SOPInstanceUID=sop)
    ctx = context(request)
    items = locate(ctx.engine, ctx.settings, study, series, sop)
    if not items:
        what = f"study {study}"
        if series:
            what = f"series {series} in {what}"
        if sop:
            what = f"instance {sop} in {what}"
        raise HTTPException(404, f"no {what} on this node (search with QIDO-RS to list them)")
    missing = [i for i in items if not i.path.is_file()]
    if missing:
        logger.error(
            "WADO-RS: %d indexed file(s) missing, first %s at %s",
            len(missing),
            missing[0].sop_instance_uid,
            missing[0].path,
        )
        raise HTTPException(
            500,
            f"{len(missing)} indexed instance(s) have no file in the data dir (first: "
            f"{missing[0].sop_instance_uid}); the node's disk and index disagree, see its log",
        )
    return items


def accepted_syntaxes(accept: str) -> set[str] | None:
    """Transfer syntaxes the Accept header allows; None for any. 406 when it allows nothing."""
    if not accept.strip():
        return None
    syntaxes: set[str] = set()
    for item in _split_list(accept):
        media, params = parse_media_type(item)
        if params.get("q", "1").strip() in ("0", "0.0", "0.00", "0.000"):
            continue
        if media in ("*/*", "multipart/*"):
            return None
        if media != "multipart/related":
            continue
        part_type, type_params = parse_media_type(params.get("type", ""))
        if part_type not in _ANY_DICOM:
            continue
        syntax = params.get("transfer-syntax") or type_params.get("transfer-syntax", "*")
        if syntax == "*":
            return None
        syntaxes.add(syntax)
    if not syntaxes:
        raise HTTPException(
            406,
            'WADO-RS here answers multipart/related; type="application/dicom" only; '
            "ask with that Accept (rendered, frames and bulk data are not served)",
        )
    return syntaxes


def _split_list(header: str) -> list[str]:
    """Split a header list on commas outside quoted strings."""
    items: list[str] = []
    current: list[str] = []
    quoted = False
    for c in header:
        if c == '"':
            quoted = not quoted
        if c == "," and not quoted:
            items.append("".join(current))
            current = []
        else:
            current.append(c)
    items.append("".join(current))
    return [i for i in items if i.strip()]


def _retrieve(
    request: Request, study: str, series: str | None = None, sop: str | None = None
) -> Response:
    syntaxes = accepted_syntaxes(request.headers.get("accept", ""))
    items = _found(request, study, series, sop)
    if syntaxes is not None:
        other = next((i for i in items if i.transfer_syntax_uid not in syntaxes), None)
        if other is not None:
            raise HTTPException(
                406,
                f"instance {other.sop_instance_uid} is held in transfer syntax "
                f"{other.transfer_syntax_uid} only and the node does not transcode; "
                "ask with transfer-syntax=* (or that syntax)",
            )
    boundary = uuid.uuid4().hex
    root = service_root(request)
    logger.info("WADO-RS %d instance(s) of study %s", len(items), study)
    return StreamingResponse(
        multipart_parts(items, boundary, root),
        media_type=f'multipart/related; type="application/dicom"; boundary={boundary}',
    )


def multipart_parts(items: list[StoredInstance], boundary: str, root: str) -> Iterator[bytes]:
    """The body of a WADO-RS answer: each instance as stored, streamed in chunks."""
    for item in items:
        location = (
            f"{root}/studies/{item.study_instance_uid}/series/{item.series_instance_uid}"
            f"/instances/{item.sop_instance_uid}"
        )
        yield (
            f"--{boundary}\r\n"
            f"Content-Type: application/dicom; transfer-syntax={item.transfer_syntax_uid}\r\n"
            f"Content-Length: {item.path.stat().st_size}\r\n"
            f"Content-Location: {location}\r\n\r\n"
        ).encode("ascii")
        with item.path.open("rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode("ascii")


def _metadata(
    request: Request, study: str, series: str | None = None, sop: str | None = None
) -> Response:
    accept = request.headers.get("accept", "")
    if accept and not any(m in accept.lower() for m in ("json", "*/*", "application/*")):
        raise HTTPException(406, "metadata is served as application/dicom+json only")
    items = _found(request, study, series, sop)
    return StreamingResponse(_json_array(items), media_type=MEDIA_TYPE)


def _json_array(items: list[StoredInstance]) -> Iterator[bytes]:
    yield b"["
    for n, item in enumerate(items):
        yield (b"," if n else b"") + _instance_json(item)
    yield b"]"


def _instance_json(item: StoredInstance) -> bytes:
    try:
        return json.dumps(read_metadata(item.path), allow_nan=False).encode()
    except Exception as exc:
        # A file pydicom cannot convert still gets an entry: its identity from the index.
        logger.warning("WADO-RS metadata of %s reduced to UIDs: %s", item.sop_instance_uid, exc)
        reduced: dict[str, Any] = {
            tag_key("SOPClassUID"): element("UI", [item.sop_class_uid]),
            tag_key("SOPInstanceUID"): element("UI", [item.sop_instance_uid]),
            tag_key("StudyInstanceUID"): element("UI", [item.study_instance_uid]),
            tag_key("SeriesInstanceUID"): element("UI", [item.series_instance_uid]),
        }
        return json.dumps(dict(sorted(reduced.items()))).encode()

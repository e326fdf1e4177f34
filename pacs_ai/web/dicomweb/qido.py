"""QIDO-RS (PS3.18 10.6): search for studies, series and instances in the index.

Answers are ``application/dicom+json`` arrays, ``204 No Content`` when nothing matches, and
``404`` when a study or series named in the path is not held at all.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import JSONResponse

from pacs_ai.web.dicomweb.attributes import Level, at_levels
from pacs_ai.web.dicomweb.common import Reader, check_uids, context, service_root, warning_header
from pacs_ai.web.dicomweb.dicomjson import MEDIA_TYPE, element, read_metadata, tag_key
from pacs_ai.web.dicomweb.query import Query, QueryError, parse_query
from pacs_ai.web.dicomweb.search import Hit, exists_study, search

logger = logging.getLogger(__name__)

router = APIRouter()

STUDY, SERIES, INSTANCE = Level.STUDY, Level.SERIES, Level.INSTANCE
_ALL = frozenset(Level)
_ACCEPTABLE = ("application/dicom+json", "application/json", "*/*", "application/*")


@router.get("/studies")
def search_studies(request: Request, _: Reader) -> Response:
    return _search(request, frozenset({STUDY}), frozenset({STUDY}))


@router.get("/studies/{study}/series")
def search_series_of_study(study: str, request: Request, _: Reader) -> Response:
    return _search(request, frozenset({SERIES}), frozenset({STUDY, SERIES}), study)


@router.get("/series")
def search_series(request: Request, _: Reader) -> Response:
    return _search(request, frozenset({STUDY, SERIES}), frozenset({STUDY, SERIES}))


@router.get("/studies/{study}/series/{series}/instances")
def search_instances_of_series(study: str, series: str, request: Request, _: Reader) -> Response:
    return _search(request, frozenset({INSTANCE}), _ALL, study, series)


@router.get("/studies/{study}/instances")
def search_instances_of_study(study: str, request: Request, _: Reader) -> Response:
    return _search(request, frozenset({SERIES, INSTANCE}), _ALL, study)


@router.get("/instances")
def search_instances(request: Request, _: Reader) -> Response:
    return _search(request, _ALL, _ALL)


def _search(
    request: Request,
    levels: frozenset[Level],
    matchable: frozenset[Level],
    study: str | None = None,
    series_uid: str | None = None,
) -> Response:
    accept = request.headers.get("accept", "")
    if accept and not any(media in accept.lower() for media in _ACCEPTABLE):
        raise HTTPException(
            406, "QIDO-RS answers application/dicom+json only (XML is not supported)"
        )
    check_uids(StudyInstanceUID=study, SeriesInstanceUID=series_uid)
    try:
        query = parse_query(request.query_params.multi_items(), levels, matchable)
    except QueryError as exc:
        raise HTTPException(400, str(exc)) from None
    ctx = context(request)
    with ctx.engine.connect() as conn:
        hits, more = search(conn, ctx.settings, query, study, series_uid)
        if not hits and study is not None and not exists_study(conn, study, series_uid):
            what = f"series {series_uid} in study {study}" if series_uid else f"study {study}"
            raise HTTPException(404, f"no {what} on this node (search /studies to list them)")
    if more:
        following = query.offset + len(hits)
        query.warnings.append(
            f"There are additional results that can be requested (offset={following})"
        )
    headers = warning_header(query.warnings)
    logger.debug("QIDO-RS %s: %d results", request.url.path, len(hits))
    if not hits:
        return Response(status_code=204, headers=headers)
    root = service_root(request)
    body = [_render(hit, query, root) for hit in hits]
    return JSONResponse(body, media_type=MEDIA_TYPE, headers=headers)


def _render(hit: Hit, query: Query, root: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for attribute in at_levels(query.levels):
        if query.returns(attribute):
            out[tag_key(attribute.keyword)] = element(
                attribute.vr, hit.values.get(attribute.keyword, [])
            )
    url = f"{root}/studies/{hit.study}"
    if hit.series:
        url += f"/series/{hit.series}"
    if hit.sop:
        url += f"/instances/{hit.sop}"
    out[tag_key("RetrieveURL")] = element("UR", [url])
    out[tag_key("InstanceAvailability")] = element("CS", ["ONLINE"])
    if query.file_fields and hit.path is not None:
        out.update(_from_file(hit, query.file_fields))
    return dict(sorted(out.items()))


def _from_file(hit: Hit, keywords: list[str]) -> dict[str, Any]:
    try:
        return read_metadata(hit.path, keywords) if hit.path else {}
    except Exception as exc:
        # One unreadable file must not fail the search; the index still answered.
        logger.warning("QIDO-RS could not read %s for includefield: %s", hit.sop, exc)
        return {}

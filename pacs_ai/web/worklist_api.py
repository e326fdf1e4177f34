"""``/api``: the worklist, a study's detail and key-slice preview, and reviews.

Reading needs the WORKLIST permission, reviewing and exporting reviews needs REVIEW. Bad
filter or review values answer 422 with a sentence saying what is allowed; an unknown study
or job answers 404. The access log records paths only, so the patient data in answers and
filters stays out of the logs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from pacs_ai.errors import InvalidArgument, NotFound
from pacs_ai.export import csv_text, parse_since
from pacs_ai.storage.tokens import Principal
from pacs_ai.web.auth import Permission, requires
from pacs_ai.web.context import WebContext
from pacs_ai.worklist import preview, reviews
from pacs_ai.worklist.queries import MAX_LIMIT, WorklistFilter, study_detail, worklist

router = APIRouter(tags=["worklist"])

Json = dict[str, Any]
Reader = Annotated[Principal, Depends(requires(Permission.WORKLIST))]
Reviewer = Annotated[Principal, Depends(requires(Permission.REVIEW))]


def _ctx(request: Request) -> WebContext:
    ctx: WebContext = request.app.state.ctx
    return ctx


@contextmanager
def http_errors() -> Iterator[None]:
    try:
        yield
    except NotFound as exc:
        raise HTTPException(404, str(exc)) from None
    except InvalidArgument as exc:
        raise HTTPException(422, str(exc)) from None


def worklist_filter(
    state: Annotated[str | None, Query(description="RECEIVING/COMPLETE or an AI state")] = None,
    priority: Annotated[str | None, Query(description="STAT, HIGH, ROUTINE or NONE")] = None,
    modality: Annotated[str | None, Query(max_length=16)] = None,
    date_from: Annotated[str | None, Query(description="StudyDate from, YYYYMMDD")] = None,
    date_to: Annotated[str | None, Query(description="StudyDate to, YYYYMMDD")] = None,
    review_state: Annotated[str | None, Query()] = None,
    model: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> WorklistFilter:
    # Empty form fields mean "any": a filter form submits them as "".
    return WorklistFilter(
        state=state or None,
        priority=priority or None,
        modality=modality or None,
        date_from=date_from,
        date_to=date_to,
        review_state=review_state or None,
        model=model or None,
        limit=limit,
        offset=offset,
    )


Filter = Annotated[WorklistFilter, Depends(worklist_filter)]


@router.get("/worklist")
def get_worklist(request: Request, _: Reader, f: Filter) -> Json:
    """Studies, most urgent first, then longest waiting."""
    with http_errors():
        return worklist(_ctx(request).engine, f)


@router.get("/studies/{study_id}")
def get_study(request: Request, _: Reader, study_id: int) -> Json:
    with http_errors():
        return study_detail(_ctx(request).engine, study_id)


@router.get(
    "/studies/{study_id}/preview.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
)
def get_preview(
    request: Request, _: Reader, study_id: int, job: Annotated[int, Query(ge=1)]
) -> Response:
    """The job's key slice with its segmentation drawn over it."""
    settings = _ctx(request).settings
    with http_errors():
        drawn = preview.render(
            _ctx(request).engine, settings.spool_dir, settings.node.data_dir, study_id, job
        )
    return Response(
        drawn.png,
        media_type="image/png",
        # Patient images: the browser may keep it for the page, nothing on the way may.
        headers={
            "Cache-Control": "private, max-age=60",
            "X-Source-SOP-Instance-UID": drawn.sop_instance_uid,
        },
    )


class ReviewIn(BaseModel):
    """A review: of a finding (job_id + finding), of a job (job_id), or of the study."""

    model_config = ConfigDict(extra="forbid")

    action: Literal["accept", "reject", "comment", "ACCEPT", "REJECT", "COMMENT"]
    job_id: int | None = Field(None, ge=1)
    finding: str = Field("", max_length=128, description='e.g. "Nodule 2", as in the SR')
    comment: str = Field("", max_length=reviews.COMMENT_CHARS)


@router.post("/studies/{study_id}/reviews", status_code=201)
def post_review(request: Request, who: Reviewer, study_id: int, body: ReviewIn) -> Json:
    ctx = _ctx(request)
    with http_errors():
        review, state = reviews.record(
            ctx.engine,
            study_id,
            body.action,
            who.name,
            ctx.clock(),
            job_id=body.job_id,
            finding=body.finding,
            comment=body.comment,
        )
    return {**review.as_json(), "review_state": state}


@router.get("/reviews/export", response_model=None)
def export_reviews(
    request: Request,
    _: Reviewer,
    format: Literal["csv", "json"] = "csv",
    since: Annotated[str | None, Query(description="UNIX seconds or ISO 8601")] = None,
) -> Response | Json:
    """Every review with its study UID, model and finding, to measure the models' precision."""
    with http_errors():
        rows = reviews.export(_ctx(request).engine, parse_since(since) if since else None)
    if format == "json":
        return {"by_model": reviews.by_model(rows), "reviews": rows}
    return Response(
        csv_text(rows, reviews.EXPORT_FIELDS),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": 'attachment; filename="pacs-ai-reviews.csv"'},
    )

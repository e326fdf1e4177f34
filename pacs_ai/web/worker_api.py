"""``/api/worker``: what a remote worker asks of the node, for one job at a time.

A GPU server that shares no disk with the node claims a job here, renews its lease, reads
the job's series (a WADO-RS multipart body), uploads the SEG and SR it built, and reports
the outcome. Every
call goes through :class:`~pacs_ai.pipeline.link.LocalLink`, the code a worker on the node's
own machine runs, so a job moves through the same states whoever runs it.

Each call after the claim names the worker that holds the job: a worker whose lease ran out
and whose job another worker took gets 409, and its late results are not recorded.
"""

from __future__ import annotations

import logging
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, HTTPException, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from pacs_ai.pipeline.dispatch import Dispatcher
from pacs_ai.pipeline.jobs import ClaimedJob, Output
from pacs_ai.pipeline.link import RESULT_KINDS, LocalLink, ResultRefused, result_path
from pacs_ai.results.uids import result_uid
from pacs_ai.storage.schema import SOURCE
from pacs_ai.web.auth import Permission, requires
from pacs_ai.web.context import WebContext
from pacs_ai.web.dicomweb.files import locate
from pacs_ai.web.dicomweb.wado import multipart_parts

logger = logging.getLogger(__name__)

router = APIRouter(tags=["worker"], dependencies=[Depends(requires(Permission.WORK))])

Json = dict[str, Any]
# Worker names are host:pid; kept printable and short, since they land in the jobs table.
WorkerName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$")]
# A SEG of a 1,000-slice series with many segments stays far below this.
MAX_RESULT_BYTES = 512 * 2**20


class Claim(BaseModel):
    worker: WorkerName


class Outcome(BaseModel):
    worker: WorkerName
    reason: str = Field("", max_length=4096)


class Encoded(BaseModel):
    worker: WorkerName
    # Every job writes an SR (with or without a SEG); each kind once.
    kinds: list[str] = Field(min_length=1, max_length=len(RESULT_KINDS))
    timings: dict[str, float] = Field(default_factory=dict, max_length=32)
    findings: str = Field("", max_length=4096)


def _link(request: Request, worker: str) -> LocalLink:
    ctx: WebContext = request.app.state.ctx
    if ctx.send_task is None:
        raise HTTPException(503, "this node runs no AI path (no broker): it has no jobs to give")
    # The runtime's own enqueueing: a broker that is down leaves the job or delivery for the
    # reconciler, and a retried job keeps its priority.
    dispatcher = Dispatcher(ctx.settings, ctx.engine, ctx.send_task, ctx.clock)
    return LocalLink(
        ctx.settings,
        ctx.engine,
        worker,
        ctx.clock,
        dispatcher.enqueue_delivery,
        dispatcher.enqueue_job,
    )


def _held(link: LocalLink, job_id: int) -> ClaimedJob:
    job = link.held(job_id)
    if job is None:
        raise HTTPException(
            409,
            f"job {job_id} is not running under worker {link.worker!r}: its lease ran out and "
            "it was taken back, or it was canceled; drop it",
        )
    return job


def job_json(job: ClaimedJob) -> Json:
    return {
        "id": job.id,
        "model": job.model,
        "attempt": job.attempt,
        "study_instance_uid": job.study_instance_uid,
        "series_instance_uid": job.series_instance_uid,
        "series_id": job.series_id,
        "study_id": job.study_id,
        "destinations": list(job.destinations),
        "priority": job.priority.value,
    }


@router.post("/jobs/{job_id}/claim")
def claim(request: Request, job_id: int, body: Claim) -> Json:
    link = _link(request, body.worker)
    job = link.claim(job_id)
    if job is None:
        raise HTTPException(409, f"job {job_id} is not claimable (done, canceled or running)")
    logger.info("job %d claimed by remote worker %s (attempt %d)", job_id, body.worker, job.attempt)
    # How many instances the series holds comes with the series itself (X-Instance-Count).
    return {"job": job_json(job), "lease_s": link.lease_s}


@router.post("/jobs/{job_id}/lease")
def renew(request: Request, job_id: int, body: Claim) -> Json:
    return {"renewed": _link(request, body.worker).renew(job_id)}


@router.get("/jobs/{job_id}/series")
def series(
    request: Request,
    job_id: int,
    worker: Annotated[str, Query(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$")],
) -> StreamingResponse:
    """The job's series as the node stored it: exactly the instances a local worker reads
    (this reception's source instances), as WADO-RS multipart, file by file."""
    link = _link(request, worker)
    job = _held(link, job_id)
    items = locate(
        link.engine,
        link.settings,
        job.study_instance_uid,
        series_id=job.series_id,
        kind=SOURCE,
    )
    boundary = uuid.uuid4().hex
    root = f"{request.url.scheme}://{request.url.netloc}/dicomweb"
    return StreamingResponse(
        multipart_parts(items, boundary, root),
        media_type=f'multipart/related; type="application/dicom"; boundary={boundary}',
        headers={"X-Instance-Count": str(len(items))},
    )


@router.put("/jobs/{job_id}/results/{kind}", status_code=201)
async def store(
    request: Request,
    job_id: int,
    kind: str,
    worker: Annotated[str, Query(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$")],
) -> Json:
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/dicom":
        raise HTTPException(415, "send the result as Content-Type: application/dicom")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_RESULT_BYTES:
            raise HTTPException(413, f"a result may be at most {MAX_RESULT_BYTES} bytes")
    link = _link(request, worker)

    def write() -> Output:
        # Database and fsync: off the event loop, which serves every other request.
        try:
            return link.store(_held(link, job_id), kind, bytes(data))
        except ResultRefused as exc:
            raise HTTPException(422, str(exc)) from None

    output = await run_in_threadpool(write)
    return {"kind": output.kind, "path": output.path, "sop_instance_uid": output.sop_instance_uid}


@router.post("/jobs/{job_id}/encoded")
def encoded(request: Request, job_id: int, body: Encoded) -> Json:
    link = _link(request, body.worker)
    job = _held(link, job_id)
    if "SR" not in body.kinds or len(set(body.kinds)) != len(body.kinds):
        raise HTTPException(422, f"kinds must name the SR and each result once, not {body.kinds}")
    outputs = []
    for kind in body.kinds:
        # The outputs are what the node itself stored for this job, never paths a worker names.
        if kind not in RESULT_KINDS:
            raise HTTPException(422, f"unknown result kind {kind!r}")
        path = result_path(job.id, kind)
        if not (link.settings.node.data_dir / path).is_file():
            raise HTTPException(422, f"job {job_id}'s {kind} was never uploaded")
        outputs.append(Output(kind, path.as_posix(), result_uid(job.id, RESULT_KINDS[kind])))
    return {"deliveries": link.encoded(job, outputs, body.timings, body.findings)}


@router.post("/jobs/{job_id}/skip")
def skip(request: Request, job_id: int, body: Annotated[Outcome, Body()]) -> Json:
    link = _link(request, body.worker)
    link.skip(_held(link, job_id), body.reason or "skipped by the worker")
    return {"state": "SKIPPED"}


@router.post("/jobs/{job_id}/fail")
def fail(request: Request, job_id: int, body: Annotated[Outcome, Body()]) -> Json:
    link = _link(request, body.worker)
    return {"state": link.fail(_held(link, job_id), body.reason or "failed on the worker")}

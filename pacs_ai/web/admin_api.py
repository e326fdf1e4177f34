"""``/api/admin``: the admin CLI over HTTP (what ``pacs-ai … --url`` calls). ADMIN only.

Each route returns what the matching :mod:`pacs_ai.admin` function returns, so ``--json``
prints the same whether the CLI read the database itself or asked here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request

from pacs_ai import admin
from pacs_ai.errors import InvalidArgument, NotFound, WrongState
from pacs_ai.storage import tokens
from pacs_ai.web.auth import Permission, requires
from pacs_ai.web.context import WebContext

router = APIRouter(tags=["admin"], dependencies=[Depends(requires(Permission.ADMIN))])

Json = dict[str, Any]
State = Annotated[str | None, Query(description="Filter by state (case-insensitive).")]


def _ctx(request: Request) -> WebContext:
    ctx: WebContext = request.app.state.ctx
    return ctx


@contextmanager
def _http_errors() -> Iterator[None]:
    try:
        yield
    except NotFound as exc:
        raise HTTPException(404, str(exc)) from None
    except WrongState as exc:
        raise HTTPException(409, str(exc)) from None
    except InvalidArgument as exc:
        raise HTTPException(400, str(exc)) from None


@router.get("/studies")
def studies(
    request: Request, state: State = None, limit: Annotated[int, Query(ge=1)] = 1000
) -> list[Json]:
    with _http_errors():
        return admin.studies_list(_ctx(request).engine, state, limit)


@router.get("/studies/{study_uid}")
def study(request: Request, study_uid: str) -> list[Json]:
    with _http_errors():
        return admin.study_show(_ctx(request).engine, study_uid)


@router.get("/jobs")
def jobs(
    request: Request, state: State = None, limit: Annotated[int, Query(ge=1)] = 200
) -> list[Json]:
    with _http_errors():
        return admin.jobs_list(_ctx(request).engine, state, limit)


@router.get("/jobs/{job_id}")
def job(request: Request, job_id: int) -> Json:
    with _http_errors():
        return admin.job_show(_ctx(request).engine, job_id)


@router.post("/jobs/{job_id}/retry")
def job_retry(request: Request, job_id: int) -> Json:
    ctx = _ctx(request)
    with _http_errors():
        return admin.job_retry(ctx.engine, job_id, ctx.clock())


@router.post("/jobs/{job_id}/cancel")
def job_cancel(request: Request, job_id: int) -> Json:
    ctx = _ctx(request)
    with _http_errors():
        return admin.job_cancel(ctx.engine, job_id, ctx.clock())


@router.get("/deliveries")
def deliveries(
    request: Request, state: State = None, limit: Annotated[int, Query(ge=1)] = 200
) -> list[Json]:
    with _http_errors():
        return admin.deliveries_list(_ctx(request).engine, state, limit)


@router.post("/deliveries/{delivery_id}/retry")
def delivery_retry(request: Request, delivery_id: int) -> Json:
    ctx = _ctx(request)
    with _http_errors():
        return admin.delivery_retry(ctx.engine, delivery_id, ctx.clock())


@router.get("/rules/check")
def rules_check(request: Request) -> Json:
    return admin.rules_check(_ctx(request).settings)


@router.get("/rules/explain/{study_uid}")
def rules_explain(request: Request, study_uid: str) -> list[Json]:
    ctx = _ctx(request)
    with _http_errors():
        return admin.rules_explain(ctx.settings, ctx.engine, study_uid)


@router.get("/status")
def status(request: Request) -> Json:
    ctx = _ctx(request)
    # The running node's own broker (an embedded one's socket, or the configured URL).
    return admin.node_status(ctx.settings, ctx.engine, ctx.broker_url or None)


@router.get("/tokens")
def token_list(request: Request) -> list[Json]:
    # list_tokens never reads the hashes: names, roles and dates only.
    return tokens.list_tokens(_ctx(request).engine)


@router.get("/audit")
def audit_trail(
    request: Request,
    since: Annotated[
        float | None, Query(description="UNIX seconds; oldest event to return.")
    ] = None,
    kind: Annotated[
        str | None, Query(description="One event kind, e.g. instances-received.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100_000)] = 10_000,
) -> list[Json]:
    """The audit trail, oldest first (read-only: it is append-only by design)."""
    from pacs_ai.audit import trail

    if kind is not None and kind not in trail.kinds():
        raise HTTPException(400, f"unknown kind {kind!r}; one of: {', '.join(trail.kinds())}")
    return trail.rows(_ctx(request).engine, since, kind, limit)

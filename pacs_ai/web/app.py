"""Build the FastAPI application from a :class:`WebContext`."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from starlette.concurrency import run_in_threadpool

from pacs_ai import __version__
from pacs_ai.audit.events import AuditEvent
from pacs_ai.audit.http import classify
from pacs_ai.audit.trail import Auditor
from pacs_ai.web import admin_api, health, metrics, pages, worker_api, worklist_api
from pacs_ai.web.auth import FailureLimiter
from pacs_ai.web.context import WebContext
from pacs_ai.web.dicomweb import router as dicomweb_router

access = logging.getLogger("pacs_ai.web.access")


def _audit_request(
    app: FastAPI, method: str, path: str, actor: str, address: str, status: int
) -> None:
    audited = classify(method, path, app.state.ctx.engine)
    if audited is not None:
        kind, target = audited
        detail = {"method": method, "status": status}
        app.state.auditor.record(AuditEvent(kind, actor, address, target=target, detail=detail))


def create_app(ctx: WebContext) -> FastAPI:
    app = FastAPI(
        title="pacs-ai",
        version=__version__,
        docs_url="/api/docs",
        redoc_url=None,
        openapi_url="/api/openapi.json",
    )
    app.state.ctx = ctx
    app.state.limiter = FailureLimiter(ctx.settings.http.auth_failures_per_minute)
    app.state.auditor = ctx.auditor or Auditor(ctx.engine, ctx.settings, ctx.clock)
    if ctx.settings.http.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(ctx.settings.http.cors_origins),
            allow_methods=["GET", "POST", "PUT", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "Accept"],
            expose_headers=["Content-Location", "Warning"],
        )

    @app.middleware("http")
    async def access_log(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        # Our own access log instead of uvicorn's: the path only, never the query string,
        # because QIDO-RS queries carry patient names and IDs.
        started = time.perf_counter()
        response = await call_next(request)
        principal = getattr(request.state, "principal", None)
        if principal is not None and response.status_code < 400:
            await run_in_threadpool(
                _audit_request,
                app,
                request.method,
                request.url.path,
                principal.name,
                request.client.host if request.client else "",
                response.status_code,
            )
        access.info(
            "%s %s %d %.1f ms %s",
            request.method,
            request.url.path,
            response.status_code,
            (time.perf_counter() - started) * 1000,
            principal.name if principal is not None else "-",
        )
        return response

    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(dicomweb_router, prefix="/dicomweb")
    app.include_router(worklist_api.router, prefix="/api")
    app.include_router(admin_api.router, prefix="/api/admin")
    app.include_router(worker_api.router, prefix="/api/worker")
    app.include_router(pages.router)
    return app

"""The radiologist's pages: login, the worklist, and a study with its preview and reviews.

Server-rendered with Jinja2 (autoescaping on: patient names and DICOM text are data, never
markup), with one small script per page for the live refresh and the review buttons. The
pages authenticate with the ``pacs_ai_token`` cookie that ``/login`` sets (HttpOnly,
SameSite=Strict), and send a visitor without a valid one to ``/login`` instead of a 401.
The cookie never leaves the site (SameSite=Strict) and the review API only takes JSON,
which a cross-site form cannot send, so the pages need no CSRF token.
"""

from __future__ import annotations

import datetime
import logging
import re
from importlib import resources
from typing import Annotated, Any
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, PackageLoader

from pacs_ai.errors import InvalidArgument, NotFound
from pacs_ai.storage.tokens import Principal
from pacs_ai.web.auth import (
    COOKIE,
    ROLE_PERMISSIONS,
    Permission,
    bearer_token,
    check_token,
    requires,
)
from pacs_ai.web.context import WebContext
from pacs_ai.web.worklist_api import worklist_filter
from pacs_ai.worklist.queries import AI_STATES, REVIEW_STATES, WorklistFilter
from pacs_ai.worklist.queries import study_detail as detail_of
from pacs_ai.worklist.queries import worklist as worklist_of

logger = logging.getLogger(__name__)

router = APIRouter(include_in_schema=False)

COOKIE_MAX_AGE_S = 12 * 3600  # one working day; the token itself stays valid until revoked
# No inline script or style anywhere: the policy can forbid them outright.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Pages carry patient data: no cache may keep them.
    "Cache-Control": "no-store",
}
STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}
_STATIC_NAME = re.compile(r"^[a-z0-9_-]+\.(css|js)$")


def _when(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return datetime.datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M")


def _dicom_date(value: str) -> str:
    return f"{value[:4]}-{value[4:6]}-{value[6:8]}" if len(value) == 8 else value


def _person(value: str) -> str:
    """A DICOM PN as people write it: FAMILY, Given (the alphabetic group only)."""
    family, _, rest = value.split("=", 1)[0].partition("^")
    given = rest.replace("^", " ").strip()
    return f"{family}, {given}" if given else family


def _environment() -> Environment:
    env = Environment(loader=PackageLoader("pacs_ai.web", "templates"), autoescape=True)
    env.filters.update(when=_when, dicom_date=_dicom_date, person=_person)
    return env


templates = Jinja2Templates(env=_environment())


def _ctx(request: Request) -> WebContext:
    ctx: WebContext = request.app.state.ctx
    return ctx


def _render(
    request: Request, name: str, context: dict[str, Any], status_code: int = 200
) -> HTMLResponse:
    response = templates.TemplateResponse(request, name, context, status_code=status_code)
    response.headers.update(PAGE_HEADERS)
    return response


def _local(target: str | None) -> str:
    """Only a path on this site may be a redirect target (no open redirect)."""
    if target and target.startswith("/") and not target.startswith(("//", "/\\")):
        return target
    return "/"


def viewer(request: Request) -> Principal | Response:
    """The page's user, if allowed to see the worklist; else the login page (or 403/429)."""
    path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    to_login = RedirectResponse("/login?" + urlencode({"next": path}), status_code=303)
    # No cookie yet is a first visit, not a failed authentication for the rate limit.
    if not bearer_token(request):
        return to_login
    try:
        return requires(Permission.WORKLIST)(request)
    except HTTPException as exc:
        if exc.status_code == 401:
            to_login.delete_cookie(COOKIE, path="/")
            return to_login
        return _render(request, "error.html", {"message": exc.detail}, exc.status_code)


def _page_context(request: Request, who: Principal, **values: Any) -> dict[str, Any]:
    return {
        "user": who.name,
        "role": who.role.value,
        "can_review": Permission.REVIEW in ROLE_PERMISSIONS[who.role],
        **values,
    }


_LOGIN_REFUSALS = {
    429: "Too many failed attempts from this address; wait a minute.",
    401: "This token is not valid (unknown or revoked).",
    403: "A token of this role cannot open the worklist.",
}


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str | None = None) -> HTMLResponse:
    return _render(request, "login.html", {"next": _local(next), "error": ""})


@router.post("/login", response_class=HTMLResponse, response_model=None)
async def login(request: Request) -> Response:
    ctx = _ctx(request)
    # A urlencoded form, parsed here: python-multipart is not needed for one field.
    form = parse_qs((await request.body()).decode("utf-8", "replace"), max_num_fields=4)
    token = (form.get("token") or [""])[0].strip()
    target = _local((form.get("next") or ["/"])[0])
    context = {"next": target, "error": ""}
    try:
        principal = check_token(request, token, Permission.WORKLIST)
    except HTTPException as exc:
        context["error"] = _LOGIN_REFUSALS[exc.status_code]
        return _render(request, "login.html", context, exc.status_code)
    logger.info("page login by token %r (%s)", principal.name, principal.role.value)
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        COOKIE,
        token,
        max_age=COOKIE_MAX_AGE_S,
        path="/",
        httponly=True,
        samesite="strict",
        secure=ctx.settings.http.secure_cookies,
    )
    return response


@router.api_route("/logout", methods=["GET", "POST"])
def logout() -> Response:
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


@router.get("/", response_class=HTMLResponse, response_model=None)
def worklist_page(
    request: Request, f: Annotated[WorklistFilter, Depends(worklist_filter)]
) -> Response:
    who = viewer(request)
    if isinstance(who, Response):
        return who
    ctx = _ctx(request)
    error = ""
    try:
        page = worklist_of(ctx.engine, f)
    except InvalidArgument as exc:
        error = str(exc)
        page = {"total": 0, "limit": f.limit, "offset": f.offset, "items": []}
    query = {k: v for k, v in request.query_params.items() if k != "offset" and v}

    def at(offset: int) -> str:
        return "/?" + urlencode({**query, "offset": offset})

    return _render(
        request,
        "worklist.html",
        _page_context(
            request,
            who,
            page=page,
            f=f,
            error=error,
            refresh_s=ctx.settings.http.worklist_refresh_s,
            api="/api/worklist?" + urlencode({**query, "offset": f.offset}),
            previous=at(max(0, f.offset - f.limit)) if f.offset > 0 else "",
            following=at(f.offset + f.limit) if f.offset + f.limit < page["total"] else "",
            ai_states=list(AI_STATES),
            review_states=REVIEW_STATES,
        ),
    )


@router.get("/studies/{study_id}", response_class=HTMLResponse, response_model=None)
def study_page(
    request: Request, study_id: int, job: Annotated[int | None, Query()] = None
) -> Response:
    who = viewer(request)
    if isinstance(who, Response):
        return who
    try:
        detail = detail_of(_ctx(request).engine, study_id)
    except NotFound as exc:
        return _render(request, "error.html", _page_context(request, who, message=str(exc)), 404)
    jobs = detail["jobs"]
    done = [j for j in jobs if j["state"] == "done"]
    selected = next((j for j in jobs if j["job_id"] == job), None) or next(
        (j for j in done if j["findings"]), done[0] if done else None
    )
    return _render(
        request,
        "study.html",
        _page_context(request, who, d=detail, s=detail["study"], selected=selected),
    )


@router.get("/static/{name}")
def static(name: str) -> Response:
    if not _STATIC_NAME.match(name):
        raise HTTPException(404, "no such file")
    source = resources.files("pacs_ai.web").joinpath("static", name)
    if not source.is_file():
        raise HTTPException(404, "no such file")
    return Response(
        source.read_bytes(),
        media_type=STATIC_TYPES[name[name.rindex(".") :]],
        headers={"Cache-Control": "public, max-age=300", "X-Content-Type-Options": "nosniff"},
    )

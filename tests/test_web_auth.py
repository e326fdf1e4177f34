"""Who may call what, for every route the app has.

:data:`SPEC` is the specification: which roles may use each route. The test walks the app's
routes, so a new endpoint that the table does not cover fails here until someone decides
who may call it, and an endpoint that forgets its permission fails as well.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from pacs_ai.storage import tokens
from pacs_ai.web.context import WebContext
from tests.web import bearer, web_client

PUBLIC = frozenset({"anyone"})
ADMIN = frozenset({"admin"})
READERS = frozenset({"admin", "radiologist"})  # the worklist and its pages
DICOMWEB_READERS = frozenset({"admin", "radiologist", "integration"})
DICOMWEB_WRITERS = frozenset({"admin", "integration"})
WORKERS = frozenset({"admin", "worker"})  # remote workers claim jobs and hand back results
ROLES = ("admin", "radiologist", "integration", "worker")


@dataclass(frozen=True)
class Rule:
    method: str
    path: str  # fnmatch pattern over the route's path template
    allowed: frozenset[str]
    # A browser page sends a visitor without a valid token to the login page (303), not 401.
    page: bool = False
    # The login form: the token comes in the form, and a good one is answered with a cookie.
    login: bool = False


# First match wins: specific entries before wildcards.
SPEC = (
    Rule("GET", "/healthz", PUBLIC),
    Rule("GET", "/readyz", PUBLIC),
    Rule("GET", "/api/openapi.json", PUBLIC),
    Rule("GET", "/api/docs", PUBLIC),
    Rule("GET", "/docs/oauth2-redirect", PUBLIC),
    Rule("GET", "/login", PUBLIC),
    Rule("POST", "/login", READERS, login=True),
    Rule("*", "/logout", PUBLIC),
    Rule("GET", "/static/*", PUBLIC),
    Rule("GET", "/metrics", ADMIN),
    Rule("*", "/api/admin/*", ADMIN),
    Rule("*", "/api/worker/*", WORKERS),
    Rule("GET", "/api/worklist", READERS),
    Rule("GET", "/api/studies/*", READERS),
    Rule("POST", "/api/studies/{study_id}/reviews", READERS),
    Rule("GET", "/api/reviews/export", READERS),
    Rule("POST", "/dicomweb/*", DICOMWEB_WRITERS),
    Rule("GET", "/dicomweb/*", DICOMWEB_READERS),
    Rule("GET", "/", READERS, page=True),
    Rule("GET", "/studies/{study_id}", READERS, page=True),
)


def spec_for(method: str, path: str) -> Rule | None:
    return next((r for r in SPEC if r.method in ("*", method) and fnmatchcase(path, r.path)), None)


def endpoints(app: FastAPI) -> Iterator[tuple[str, str]]:
    """(method, path template) of every route, routers included."""
    try:
        # FastAPI 0.16x includes routers lazily: app.routes holds the routers, not their routes.
        from fastapi.routing import iter_route_contexts

        routes = [(r.path, r.methods) for r in iter_route_contexts(app.routes)]
    except ImportError:
        routes = [(getattr(r, "path", None), getattr(r, "methods", None)) for r in app.routes]
    for path, methods in routes:
        assert path is not None and methods, f"a route without path or methods: {path}"
        for method in sorted(set(methods) - {"HEAD"}):
            yield method, path


def concrete(path: str) -> str:
    """A URL for a path template: UIDs for DICOMweb parameters, 1 for ids."""
    samples = {"study": "1.2.3", "series": "1.2.3.4", "sop": "1.2.3.4.5", "name": "none.css"}
    return re.sub(r"\{(\w+)(:\w+)?\}", lambda m: samples.get(m.group(1), "1"), path)


@pytest.fixture
def app_client(tmp_path: Path) -> Iterator[tuple[TestClient, WebContext]]:
    # Many refusals on purpose here: the failure limit is tested on its own below.
    with web_client(tmp_path, "[http]\nauth_failures_per_minute = 100000\n") as pair:
        yield pair


def test_every_route_is_in_the_spec(app_client: tuple[TestClient, WebContext]) -> None:
    client, _ctx = app_client
    found = list(endpoints(client.app))  # type: ignore[arg-type]
    missing = [f"{m} {p}" for m, p in found if spec_for(m, p) is None]
    assert not missing, f"routes without an entry in SPEC (who may call them?): {missing}"
    unused = [r for r in SPEC if not any(spec_for(m, p) is r for m, p in found)]
    assert not unused, f"SPEC entries that match no route (remove them): {unused}"


def test_each_route_answers_only_the_roles_it_allows(
    app_client: tuple[TestClient, WebContext],
) -> None:
    client, ctx = app_client
    headers = {role: bearer(ctx, role) for role in ROLES}
    revoked = bearer(ctx, "admin", name="revoked")
    tokens.revoke(ctx.engine, "revoked", 1.0)
    wrong: list[str] = []
    for method, template in endpoints(client.app):  # type: ignore[arg-type]
        rule = spec_for(method, template)
        assert rule is not None, f"{method} {template} is not in SPEC"
        path = concrete(template)
        if rule.login:
            wrong += check_login(client, path, rule, headers, revoked)
            continue
        if rule.allowed is PUBLIC:
            status = client.request(method, path, follow_redirects=False).status_code
            if status in (401, 403, 429):
                wrong.append(f"{method} {path} as nobody: {status}, but it is public")
            continue
        nobody = client.request(method, path, follow_redirects=False)
        gone = client.request(method, path, headers=revoked, follow_redirects=False)
        for who, response in (("nobody", nobody), ("a revoked token", gone)):
            if rule.page:
                expected = response.status_code == 303 and response.headers["location"].startswith(
                    "/login"
                )
            else:
                expected = response.status_code == 401
            if not expected:
                wrong.append(f"{method} {path} as {who}: {response.status_code}")
        for role in ROLES:
            allowed = role in rule.allowed
            response = client.request(method, path, headers=headers[role], follow_redirects=False)
            if allowed and response.status_code in (401, 403):
                wrong.append(f"{method} {path} as {role}: {response.status_code}, may call it")
            if not allowed and response.status_code != 403:
                wrong.append(f"{method} {path} as {role}: {response.status_code}, expected 403")
    assert not wrong, "\n".join(wrong)


def check_login(
    client: TestClient,
    path: str,
    rule: Rule,
    headers: dict[str, dict[str, str]],
    revoked: dict[str, str],
) -> list[str]:
    wrong = []
    tries = {"nobody": "", "a revoked token": revoked["Authorization"].split()[1]}
    tries.update((role, headers[role]["Authorization"].split()[1]) for role in ROLES)
    for who, token in tries.items():
        response = client.post(path, content=f"token={token}", follow_redirects=False)
        expected = 303 if who in rule.allowed else 403 if who in ROLES else 401
        if response.status_code != expected:
            wrong.append(f"POST {path} as {who}: {response.status_code}, expected {expected}")
    return wrong


def test_too_many_failures_from_one_address_get_429(tmp_path: Path) -> None:
    with web_client(tmp_path, "[http]\nauth_failures_per_minute = 3\n") as (client, ctx):
        admin = bearer(ctx, "admin")
        assert client.get("/api/admin/status", headers=admin).status_code == 200
        for _ in range(3):
            assert client.get("/api/admin/jobs").status_code == 401
        assert client.get("/api/admin/jobs").status_code == 429
        # Once blocked, even a valid token waits: guessing cannot go on beside real calls.
        blocked = client.get("/api/admin/jobs", headers=admin)
        assert blocked.status_code == 429 and "wait a minute" in blocked.json()["detail"]
        assert client.get("/healthz").status_code == 200  # probes need no token


def test_the_failure_limiter_blocks_per_address_and_forgets_quiet_ones() -> None:
    from pacs_ai.web.auth import FailureLimiter

    now = [0.0]
    limiter = FailureLimiter(3, clock=lambda: now[0])
    for _ in range(3):
        limiter.failed("10.0.0.1")
    assert limiter.blocked("10.0.0.1") and not limiter.blocked("10.0.0.2")
    for i in range(1000):
        limiter.failed(f"10.1.{i // 256}.{i % 256}")
    now[0] = 61.0
    assert not limiter.blocked("10.0.0.1")  # a minute later it may try again
    for i in range(1000):
        limiter.blocked(f"10.1.{i // 256}.{i % 256}")
    assert limiter._failures == {}  # nothing kept for addresses that went quiet

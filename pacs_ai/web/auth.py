"""Who may call what: bearer tokens (or the page's cookie), roles, and failure rate limits.

Each endpoint names the one permission it needs (``Depends(requires(Permission.X))``);
roles are sets of permissions. No token or an unknown/revoked one is 401, a valid token
without the permission is 403, and a client address with too many failures is 429.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from enum import StrEnum

from fastapi import HTTPException, Request

from pacs_ai.audit.events import AuditEvent, Kind, Outcome
from pacs_ai.storage.tokens import Principal, Role, authenticate

logger = logging.getLogger(__name__)

COOKIE = "pacs_ai_token"


class Permission(StrEnum):
    WORKLIST = "worklist"  # read the worklist, studies, previews
    REVIEW = "review"  # accept / reject / comment findings
    DICOMWEB_READ = "dicomweb-read"  # QIDO-RS, WADO-RS
    DICOMWEB_WRITE = "dicomweb-write"  # STOW-RS
    ADMIN = "admin"  # jobs, deliveries, rules, tokens, metrics
    WORK = "work"  # claim jobs and hand back their results (remote workers)


ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.ADMIN: frozenset(Permission),
    Role.RADIOLOGIST: frozenset({Permission.WORKLIST, Permission.REVIEW, Permission.DICOMWEB_READ}),
    Role.INTEGRATION: frozenset({Permission.DICOMWEB_READ, Permission.DICOMWEB_WRITE}),
    # A remote worker reads and writes only through the worker API: the series of a job it
    # holds, and nothing but that job's own SEG and SR.
    Role.WORKER: frozenset({Permission.WORK}),
}


class FailureLimiter:
    """Counts failed authentications per client address over a sliding minute."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def blocked(self, client: str) -> bool:
        with self._lock:
            window = self._failures.get(client)
            if window is None:
                return False
            self._expire(client, window)
            return len(window) >= self.per_minute

    def failed(self, client: str) -> None:
        with self._lock:
            window = self._failures.setdefault(client, deque())
            self._expire(client, window)
            window.append(self.clock())
            self._failures[client] = window

    def _expire(self, client: str, window: deque[float]) -> None:
        cutoff = self.clock() - 60.0
        while window and window[0] < cutoff:
            window.popleft()
        if not window:
            # Forget quiet clients, so that many addresses cannot grow the table forever.
            self._failures.pop(client, None)


def _audit_failure(request: Request, client: str, actor: str, reason: str) -> None:
    request.app.state.auditor.record(
        AuditEvent(
            Kind.AUTHENTICATION_FAILED,
            actor=actor,
            address=client,
            outcome=Outcome.MINOR_FAILURE,
            target=request.url.path,
            detail={"method": request.method, "reason": reason},
        )
    )


def bearer_token(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.cookies.get(COOKIE, "")


def check_token(request: Request, token: str, permission: Permission) -> Principal:
    """The principal for ``token`` if it holds ``permission``; else HTTPException 429/401/403.

    Every refusal counts against the client address and is audited, whether the token came
    in a header, the page's cookie or the login form.
    """
    ctx = request.app.state.ctx
    limiter: FailureLimiter = request.app.state.limiter
    client = request.client.host if request.client else "unknown"
    if limiter.blocked(client):
        raise HTTPException(429, "too many failed authentications; wait a minute")
    principal = authenticate(ctx.engine, token, ctx.clock()) if token else None
    if principal is None:
        reason = "bad or revoked token" if token else "no token"
        limiter.failed(client)
        _audit_failure(request, client, "", reason)
        logger.warning(
            "authentication failed from %s for %s %s (%s)",
            client,
            request.method,
            request.url.path,
            reason,
        )
        raise HTTPException(
            401,
            "a valid API token is required (Authorization: Bearer TOKEN); "
            "create one with: pacs-ai tokens create --role ROLE --name NAME",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if permission not in ROLE_PERMISSIONS[principal.role]:
        _audit_failure(
            request, client, principal.name, f"role {principal.role.value} lacks {permission}"
        )
        logger.warning(
            "token %r (%s) refused %s %s: needs %s",
            principal.name,
            principal.role.value,
            request.method,
            request.url.path,
            permission.value,
        )
        raise HTTPException(
            403, f"role {principal.role.value!r} may not do this (needs {permission.value!r})"
        )
    return principal


def requires(permission: Permission) -> Callable[[Request], Principal]:
    """A FastAPI dependency: the caller's :class:`Principal`, if it holds ``permission``."""

    def check(request: Request) -> Principal:
        principal = check_token(request, bearer_token(request), permission)
        request.state.principal = principal
        return principal

    return check

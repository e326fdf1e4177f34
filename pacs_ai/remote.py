"""The CLI against a node over HTTP (``--url`` / ``PACS_AI_URL``, ``--token`` / ``PACS_AI_TOKEN``).

:class:`RemoteAdmin` answers the same questions as :class:`pacs_ai.admin.LocalAdmin`, with the
same JSON, by calling the node's admin API (and the worklist API for ``pacs-ai worklist``).
Every failure becomes a :class:`~pacs_ai.errors.RemoteError` whose message says what to do.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote

import httpx

from pacs_ai.errors import RemoteError

Json = dict[str, Any]

_NEEDS = re.compile(r"needs '([\w-]+)'")


class RemoteAdmin:
    """A node's HTTP API; ``transport`` lets tests talk to an app in-process."""

    def __init__(
        self,
        url: str,
        token: str | None,
        timeout_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout_s, transport=transport
        )

    def close(self) -> None:
        self.client.close()

    def request(self, method: str, path: str, params: dict[str, Any] | None = None) -> Any:
        """Call the API; the decoded JSON body, or a :class:`RemoteError`."""
        response = self._send(method, path, params)
        try:
            return response.json()
        except ValueError:
            raise RemoteError(
                f"{self.url}{path} did not answer JSON; is {self.url} a pacs-ai node?",
                response.status_code,
            ) from None

    def _send(self, method: str, path: str, params: dict[str, Any] | None) -> httpx.Response:
        query = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            response = self.client.request(method, path, params=query)
        except httpx.TransportError as exc:
            why = str(exc) or type(exc).__name__
            raise RemoteError(
                f"cannot reach the node at {self.url} ({why}); check the URL and that the "
                "node runs with its HTTP service on node.http_port"
            ) from None
        if response.is_success:
            return response
        raise self._error(response)

    def _error(self, response: httpx.Response) -> RemoteError:
        status = response.status_code
        detail = _detail(response)
        if status == 401:
            return RemoteError(
                f"the node at {self.url} refused the request: token missing or revoked; create "
                "one with pacs-ai tokens create --role admin --name NAME on the node, then pass "
                "it with --token or PACS_AI_TOKEN",
                status,
            )
        if status == 403:
            return RemoteError(f"{detail}; {_roles_needed(detail)}", status)
        if status == 429:
            return RemoteError(f"the node at {self.url}: {detail}", status)
        if status in (400, 404, 409, 422):
            return RemoteError(detail, status)
        return RemoteError(f"the node at {self.url} answered HTTP {status}: {detail}", status)

    # --- the questions of pacs_ai.admin.Admin -----------------------------------------------

    def studies_list(self, state: str | None, limit: int) -> list[Json]:
        return list(self.request("GET", "/api/admin/studies", {"state": state, "limit": limit}))

    def study_show(self, study_uid: str) -> list[Json]:
        return list(self.request("GET", f"/api/admin/studies/{quote(study_uid, safe='')}"))

    def jobs_list(self, state: str | None, limit: int) -> list[Json]:
        return list(self.request("GET", "/api/admin/jobs", {"state": state, "limit": limit}))

    def job_show(self, job_id: int) -> Json:
        return dict(self.request("GET", f"/api/admin/jobs/{job_id}"))

    def job_retry(self, job_id: int) -> Json:
        return dict(self.request("POST", f"/api/admin/jobs/{job_id}/retry"))

    def job_cancel(self, job_id: int) -> Json:
        return dict(self.request("POST", f"/api/admin/jobs/{job_id}/cancel"))

    def deliveries_list(self, state: str | None, limit: int) -> list[Json]:
        params = {"state": state, "limit": limit}
        return list(self.request("GET", "/api/admin/deliveries", params))

    def delivery_retry(self, delivery_id: int) -> Json:
        return dict(self.request("POST", f"/api/admin/deliveries/{delivery_id}/retry"))

    def rules_check(self) -> Json:
        return dict(self.request("GET", "/api/admin/rules/check"))

    def rules_explain(self, study_uid: str) -> list[Json]:
        return list(self.request("GET", f"/api/admin/rules/explain/{quote(study_uid, safe='')}"))

    def status(self) -> Json:
        return dict(self.request("GET", "/api/admin/status"))

    def tokens_list(self) -> list[Json]:
        return list(self.request("GET", "/api/admin/tokens"))

    def worklist(self, filters: Json) -> Json:
        return dict(self.request("GET", "/api/worklist", filters))

    def reviews_export(self) -> Json:
        # Always JSON over the wire: the CLI writes CSV itself, the same way as locally.
        return dict(self.request("GET", "/api/reviews/export", {"format": "json"}))


def _detail(response: httpx.Response) -> str:
    """FastAPI's ``{"detail": ...}`` as one line, else the start of the body."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        return response.text[:200] or response.reason_phrase
    if isinstance(detail, list):  # request validation: [{"loc": [...], "msg": ...}]
        return "; ".join(
            f"{'.'.join(str(p) for p in d.get('loc', [])[1:])}: {d.get('msg', '')}"
            for d in detail
            if isinstance(d, dict)
        )
    return str(detail)


def _roles_needed(detail: str) -> str:
    """Which roles hold the permission a 403 names, so the user knows which token to make."""
    from pacs_ai.web.auth import ROLE_PERMISSIONS, Permission

    found = _NEEDS.search(detail)
    try:
        permission = Permission(found.group(1)) if found else None
    except ValueError:
        permission = None
    if permission is None:
        return "use a token of a role that may do this"
    roles = [role.value for role, held in ROLE_PERMISSIONS.items() if permission in held]
    return f"use a token of role {' or '.join(roles)}"

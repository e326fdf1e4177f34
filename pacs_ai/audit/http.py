"""Which HTTP requests enter the audit trail, and as what.

Reads of a study (WADO-RS, metadata, the study page, its preview), queries (QIDO-RS, review
export), every write (STOW-RS, reviews, admin actions) are audited. The worklist list itself
is not: the page polls it every few seconds, and it shows no more than the studies' rows.
"""

from __future__ import annotations

import re

from pacs_ai.audit.events import Kind

_QIDO = re.compile(r"^/dicomweb/(studies(/[^/]+/(series|instances))?|series|instances)$")
_STUDY = re.compile(r"^/(?:dicomweb|api)/studies/([^/]+)")
_PAGE = re.compile(r"^/studies/([^/]+)")


def classify(method: str, path: str) -> tuple[Kind, str] | None:
    """(kind, target) for a successful request worth auditing, else None."""
    if method == "POST" and path.startswith("/dicomweb/studies"):
        return Kind.INSTANCES_RECEIVED, path
    if method == "POST" and path.endswith("/reviews"):
        return Kind.REVIEW, path
    if method in ("POST", "PUT", "PATCH", "DELETE") and path.startswith("/api/admin/"):
        return Kind.ADMIN_ACTION, path
    if method != "GET":
        return None
    if _QIDO.match(path) or path == "/api/reviews/export" or path == "/api/admin/audit":
        return Kind.QUERY, path
    study = _STUDY.match(path) or _PAGE.match(path)
    if study:
        return Kind.INSTANCES_ACCESSED, study.group(1)
    return None

"""Which HTTP requests enter the audit trail, and as what.

Reads of a study (WADO-RS, metadata, the study page, its preview), queries (QIDO-RS, review
export), reviews and admin actions are audited here; STOW-RS records what it stored, per
study, itself (web/dicomweb/stow.py). The worklist list itself
is not: the page polls it every few seconds, and it shows no more than the studies' rows.
"""

from __future__ import annotations

import re

from sqlalchemy import Engine, select

from pacs_ai.audit.events import Kind
from pacs_ai.storage.schema import studies

_QIDO = re.compile(r"^/dicomweb/(studies(/[^/]+/(series|instances))?|series|instances)$")
_DICOMWEB_STUDY = re.compile(r"^/dicomweb/studies/([^/]+)")
# The worklist API and pages name a study by its row id; the trail names it by UID.
_STUDY_ROW = re.compile(r"^/(?:api/)?studies/(\d+)")


def study_uid(engine: Engine, study_id: int) -> str:
    with engine.connect() as conn:
        uid = conn.execute(
            select(studies.c.study_instance_uid).where(studies.c.id == study_id)
        ).scalar_one_or_none()
    return uid or f"study-id:{study_id}"


def classify(method: str, path: str, engine: Engine | None = None) -> tuple[Kind, str] | None:
    """(kind, target) for a successful request worth auditing, else None.

    With ``engine``, a study named by its row id is named by its Study Instance UID.
    """
    row = _STUDY_ROW.match(path)
    if row and engine is not None:
        path_target = study_uid(engine, int(row.group(1)))
    elif row:
        path_target = f"study-id:{row.group(1)}"
    else:
        path_target = path
    if method == "POST" and path.endswith("/reviews"):
        return Kind.REVIEW, path_target
    if method in ("POST", "PUT", "PATCH", "DELETE") and path.startswith("/api/admin/"):
        return Kind.ADMIN_ACTION, path
    if method != "GET":
        return None
    if _QIDO.match(path) or path == "/api/reviews/export" or path == "/api/admin/audit":
        return Kind.QUERY, path
    study = _DICOMWEB_STUDY.match(path)
    if study:
        return Kind.INSTANCES_ACCESSED, study.group(1)
    if row:
        return Kind.INSTANCES_ACCESSED, path_target
    return None

"""Where a stored instance's file is, and which instances a WADO-RS resource names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine, func, select

from pacs_ai.config import Settings
from pacs_ai.storage.schema import RESULT, instances, series, studies


def stored_path(settings: Settings, kind: str, relative: str) -> Path:
    """Received instances live under the spool root, results the node made under the data dir."""
    base = settings.node.data_dir if kind == RESULT else settings.spool_dir
    return base / relative


@dataclass(frozen=True)
class StoredInstance:
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: Path


def locate(
    engine: Engine,
    settings: Settings,
    study: str,
    series_uid: str | None = None,
    sop: str | None = None,
    series_id: int | None = None,
    kind: str | None = None,
) -> list[StoredInstance]:
    """The instances of a study, series or single instance, over every reception, in order.

    ``series_id`` narrows to one reception's series row, ``kind`` to sources or results (a
    worker's job reads exactly its own series' sources).
    """
    query = (
        select(
            studies.c.study_instance_uid,
            series.c.series_instance_uid,
            instances.c.sop_instance_uid,
            instances.c.sop_class_uid,
            instances.c.transfer_syntax_uid,
            instances.c.path,
            instances.c.kind,
        )
        .select_from(
            instances.join(series, series.c.id == instances.c.series_id).join(
                studies, studies.c.id == instances.c.study_id
            )
        )
        .where(studies.c.study_instance_uid == study)
        .order_by(
            func.coalesce(series.c.series_number, 0),
            series.c.series_instance_uid,
            func.coalesce(instances.c.instance_number, 0),
            instances.c.sop_instance_uid,
        )
    )
    if series_uid is not None:
        query = query.where(series.c.series_instance_uid == series_uid)
    if sop is not None:
        query = query.where(instances.c.sop_instance_uid == sop)
    if series_id is not None:
        query = query.where(instances.c.series_id == series_id)
    if kind is not None:
        query = query.where(instances.c.kind == kind)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return [
        StoredInstance(
            r.study_instance_uid,
            r.series_instance_uid,
            r.sop_instance_uid,
            r.sop_class_uid,
            r.transfer_syntax_uid,
            stored_path(settings, r.kind, r.path),
        )
        for r in rows
    ]

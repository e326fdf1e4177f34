"""The index: which studies, series and instances the node holds, and in what state.

Every function here takes an :class:`~sqlalchemy.Engine` and does one short transaction,
so receivers in several processes (or on several hosts, with PostgreSQL) can share it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, Row, and_, exists, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from pacs_ai.dicom.header import InstanceHeader
from pacs_ai.storage.schema import (
    COMPLETE,
    RECEIVING,
    RESULT,
    SOURCE,
    instances,
    series,
    studies,
)


def _dialect_insert(bind: Engine | Connection) -> Any:
    # ON CONFLICT DO NOTHING is spelled the same on both, but lives in each dialect's insert().
    return postgresql.insert if bind.dialect.name == "postgresql" else sqlite.insert


def insert_ignore(conn: Connection, table: Any, values: dict[str, Any], key: list[str]) -> bool:
    """INSERT … ON CONFLICT DO NOTHING; True if a row was added."""
    insert = _dialect_insert(conn)
    statement = insert(table).values(**values).on_conflict_do_nothing(index_elements=key)
    return conn.execute(statement.returning(*table.primary_key.columns)).first() is not None


def count_duplicate(engine: Engine, sop_instance_uid: str) -> bool:
    """Count one more reception of an indexed instance; whether it is indexed at all."""
    with engine.begin() as conn:
        counted = conn.execute(
            update(instances)
            .where(instances.c.sop_instance_uid == sop_instance_uid)
            .values(duplicates=instances.c.duplicates + 1)
        )
    return counted.rowcount > 0


def _has_sources(series_id: Any) -> Any:
    """True for a series with received instances (not only results the node made)."""
    return exists().where(instances.c.series_id == series_id, instances.c.kind == SOURCE)


def record_result(
    engine: Engine,
    study_id: int,
    header: InstanceHeader,
    path: str,
    size: int,
    made_by: str,
    now: float,
) -> bool:
    """Index a result object (SEG/SR) the node wrote, in the study reception it belongs to.

    ``path`` is relative to the data dir. The study's state and ``last_received_at`` are left
    alone: a result must never reopen a study or meet the rules again. Idempotent: a retried
    job writes the same SOP Instance UID, and the second call returns False.
    """
    with engine.begin() as conn:
        insert_ignore(
            conn, series, series_values(header, study_id, now), ["study_id", "series_instance_uid"]
        )
        series_id = conn.execute(
            select(series.c.id).where(
                series.c.study_id == study_id,
                series.c.series_instance_uid == header.series_instance_uid,
            )
        ).scalar_one()
        return insert_ignore(
            conn,
            instances,
            {
                "sop_instance_uid": header.sop_instance_uid,
                "sop_class_uid": header.sop_class_uid,
                "series_id": series_id,
                "study_id": study_id,
                "instance_number": header.instance_number,
                "transfer_syntax_uid": header.transfer_syntax_uid,
                "path": path,
                "size_bytes": size,
                "calling_ae": made_by,
                "received_at": now,
                "duplicates": 0,
                "kind": RESULT,
            },
            ["sop_instance_uid"],
        )


def series_values(h: InstanceHeader, study_id: int, now: float) -> dict[str, Any]:
    return {
        "study_id": study_id,
        "series_instance_uid": h.series_instance_uid,
        "modality": h.modality[:16],
        "series_number": h.series_number,
        "series_description": h.series_description[:64],
        "body_part_examined": h.body_part_examined[:64],
        "protocol_name": h.protocol_name[:64],
        "manufacturer": h.manufacturer[:64],
        "slice_thickness": h.slice_thickness,
        "image_type": h.image_type[:256],
        "first_received_at": now,
    }


# --- reading -------------------------------------------------------------------------------


# What the rules made of a study's latest completion (StudySummary.rules_state).
RULES_NOT_PLANNED = "NOT_PLANNED"  # never completed, or completed and not yet routed
RULES_MATCHED = "MATCHED"  # rules_fired names them
RULES_NONE_MATCHED = "NONE_MATCHED"  # kept, and nothing runs on it


def rules_state(completions: int, planned_completions: int, rules_fired: str) -> str:
    if completions == 0 or planned_completions < completions:
        return RULES_NOT_PLANNED
    return RULES_MATCHED if rules_fired else RULES_NONE_MATCHED


@dataclass(frozen=True)
class StudySummary:
    id: int
    study_instance_uid: str
    calling_ae: str
    state: str
    patient_id: str
    patient_name: str
    accession_number: str
    study_date: str
    study_description: str
    modalities: str
    series_count: int
    instance_count: int
    duplicates: int
    first_received_at: float
    last_received_at: float
    completed_at: float | None
    completions: int
    reopened: int
    planned_completions: int
    # The rules that matched completion number planned_completions, in rule order
    # (studies.rules_fired). Empty before any planning and when none matched, and a
    # completion not planned yet still shows the last one's: rules_state tells which.
    rules_fired: tuple[str, ...]
    rules_state: str

    def as_json(self) -> dict[str, Any]:
        return {**self.__dict__, "rules_fired": list(self.rules_fired)}


def _study_summaries(
    conn: Connection, where: Any = None, limit: int | None = None
) -> list[StudySummary]:
    counts = (
        select(
            instances.c.study_id,
            func.count(func.distinct(instances.c.series_id)).label("series_count"),
            func.count(instances.c.id).label("instance_count"),
            func.coalesce(func.sum(instances.c.duplicates), 0).label("duplicates"),
        )
        .where(instances.c.kind == SOURCE)
        .group_by(instances.c.study_id)
        .subquery()
    )
    query = (
        select(
            studies,
            func.coalesce(counts.c.series_count, 0).label("live_series"),
            func.coalesce(counts.c.instance_count, 0).label("live_instances"),
            func.coalesce(counts.c.duplicates, 0).label("live_duplicates"),
        )
        .select_from(studies.outerjoin(counts, counts.c.study_id == studies.c.id))
        .order_by(studies.c.last_received_at.desc())
    )
    if where is not None:
        query = query.where(where)
    if limit is not None:
        query = query.limit(limit)
    rows = conn.execute(query).all()
    ids = [r.id for r in rows]
    modalities: dict[int, set[str]] = {i: set() for i in ids}
    if ids:
        for study_id, modality in conn.execute(
            select(series.c.study_id, series.c.modality).where(
                series.c.study_id.in_(ids), _has_sources(series.c.id)
            )
        ):
            if modality:
                modalities[study_id].add(modality)
    return [_summary(r, modalities[r.id]) for r in rows]


def _summary(r: Row[Any], modalities: set[str]) -> StudySummary:
    return StudySummary(
        id=r.id,
        study_instance_uid=r.study_instance_uid,
        calling_ae=r.calling_ae,
        state=r.state,
        patient_id=r.patient_id,
        patient_name=r.patient_name,
        accession_number=r.accession_number,
        study_date=r.study_date,
        study_description=r.study_description,
        modalities="\\".join(sorted(modalities)),
        series_count=r.live_series,
        instance_count=r.live_instances,
        duplicates=r.live_duplicates,
        first_received_at=r.first_received_at,
        last_received_at=r.last_received_at,
        completed_at=r.completed_at,
        completions=r.completions,
        reopened=r.reopened,
        planned_completions=r.planned_completions,
        rules_fired=tuple(n for n in r.rules_fired.split(",") if n),
        rules_state=rules_state(r.completions, r.planned_completions, r.rules_fired),
    )


def list_studies(engine: Engine, state: str | None = None, limit: int = 1000) -> list[StudySummary]:
    with engine.connect() as conn:
        where = studies.c.state == state if state else None
        return _study_summaries(conn, where, limit)


def find_studies(engine: Engine, study_instance_uid: str) -> list[StudySummary]:
    """Every reception of the study (one per calling AE)."""
    with engine.connect() as conn:
        return _study_summaries(conn, studies.c.study_instance_uid == study_instance_uid)


@dataclass(frozen=True)
class SeriesSummary:
    series_instance_uid: str
    modality: str
    series_number: int | None
    series_description: str
    body_part_examined: str
    instance_count: int

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def list_series(engine: Engine, study_id: int) -> list[SeriesSummary]:
    query = (
        select(
            series.c.series_instance_uid,
            series.c.modality,
            series.c.series_number,
            series.c.series_description,
            series.c.body_part_examined,
            func.count(instances.c.id).label("instance_count"),
        )
        .select_from(
            series.join(
                instances, and_(instances.c.series_id == series.c.id, instances.c.kind == SOURCE)
            )
        )
        .where(series.c.study_id == study_id)
        .group_by(series.c.id)
        .order_by(series.c.series_number, series.c.series_instance_uid)
    )
    with engine.connect() as conn:
        return [SeriesSummary(**row._mapping) for row in conn.execute(query)]


def instance_paths(engine: Engine, study_id: int) -> list[str]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                select(instances.c.path)
                .where(instances.c.study_id == study_id, instances.c.kind == SOURCE)
                .order_by(instances.c.id)
            ).scalars()
        )


def totals(engine: Engine) -> dict[str, int]:
    """Counts for ``pacs-ai status``: studies by state, series, instances, duplicates."""
    with engine.connect() as conn:
        by_state: dict[str, int] = {
            state: n
            for state, n in conn.execute(
                select(studies.c.state, func.count()).group_by(studies.c.state)
            ).all()
        }
        n_instances, n_dups, n_bytes, n_series = conn.execute(
            select(
                func.count(instances.c.id),
                func.coalesce(func.sum(instances.c.duplicates), 0),
                func.coalesce(func.sum(instances.c.size_bytes), 0),
                func.count(func.distinct(instances.c.series_id)),
            ).where(instances.c.kind == SOURCE)
        ).one()
    return {
        "studies_receiving": int(by_state.get(RECEIVING, 0)),
        "studies_complete": int(by_state.get(COMPLETE, 0)),
        "series": int(n_series),
        "instances": int(n_instances),
        "duplicates": int(n_dups),
        "bytes": int(n_bytes),
    }


# --- assembly ------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuietStudy:
    id: int
    last_received_at: float


def receiving_studies(engine: Engine) -> list[QuietStudy]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(studies.c.id, studies.c.last_received_at).where(studies.c.state == RECEIVING)
        ).all()
    return [QuietStudy(r.id, r.last_received_at) for r in rows]


@dataclass(frozen=True)
class Completion:
    study_id: int
    study_instance_uid: str
    calling_ae: str
    series_count: int
    instance_count: int
    completed_at: float
    completions: int


def mark_complete(engine: Engine, study_id: int, cutoff: float, now: float) -> Completion | None:
    """COMPLETE the study if it is still RECEIVING and quiet since ``cutoff``.

    The guarded UPDATE makes this safe when several nodes share the database: exactly one
    of them sees ``rowcount == 1`` and reports the completion.
    """
    with engine.begin() as conn:
        n_series, n_instances = conn.execute(
            select(
                func.count(func.distinct(instances.c.series_id)), func.count(instances.c.id)
            ).where(instances.c.study_id == study_id, instances.c.kind == SOURCE)
        ).one()
        result = conn.execute(
            update(studies)
            .where(
                and_(
                    studies.c.id == study_id,
                    studies.c.state == RECEIVING,
                    studies.c.last_received_at <= cutoff,
                )
            )
            .values(
                state=COMPLETE,
                completed_at=now,
                series_count=n_series,
                instance_count=n_instances,
                completions=studies.c.completions + 1,
            )
            .returning(studies.c.study_instance_uid, studies.c.calling_ae, studies.c.completions)
        ).first()
    if result is None:
        return None
    return Completion(
        study_id=study_id,
        study_instance_uid=result.study_instance_uid,
        calling_ae=result.calling_ae,
        series_count=int(n_series),
        instance_count=int(n_instances),
        completed_at=now,
        completions=int(result.completions),
    )


def unplanned_completions(engine: Engine, completed_before: float) -> list[Completion]:
    """COMPLETE studies whose latest completion (before ``completed_before``) was never
    planned: the node stopped between completing them and routing them."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(
                studies.c.id,
                studies.c.study_instance_uid,
                studies.c.calling_ae,
                studies.c.series_count,
                studies.c.instance_count,
                studies.c.completed_at,
                studies.c.completions,
            ).where(
                studies.c.state == COMPLETE,
                studies.c.planned_completions < studies.c.completions,
                studies.c.completed_at < completed_before,
            )
        ).all()
    return [
        Completion(
            study_id=r.id,
            study_instance_uid=r.study_instance_uid,
            calling_ae=r.calling_ae,
            series_count=r.series_count,
            instance_count=r.instance_count,
            completed_at=r.completed_at,
            completions=r.completions,
        )
        for r in rows
    ]

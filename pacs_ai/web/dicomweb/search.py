"""QIDO-RS searches as SQL on the index: matching in WHERE, paging in LIMIT/OFFSET.

A study is the union of its receptions (one ``studies`` row per calling AE): searches group
by UID, so two senders of one study give one answer. Each search first finds one page of
UIDs (with a representative row each), then reads that page's attributes, counts and
modalities in a few queries bounded by the page size, whatever the size of the index.
Results the node made (SEG/SR, ``kind = "result"``) are found like received instances.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, and_, exists, false, func, select
from sqlalchemy.engine import Connection

from pacs_ai.config import Settings
from pacs_ai.storage.schema import instances, series, studies
from pacs_ai.web.dicomweb.attributes import Level, at_levels
from pacs_ai.web.dicomweb.files import stored_path
from pacs_ai.web.dicomweb.query import Kind, Match, Query

Values = dict[str, list[Any]]


@dataclass
class Hit:
    """One answer: attribute values by keyword, the UIDs that make its RetrieveURL, its file."""

    values: Values
    study: str
    series: str = ""
    sop: str = ""
    path: Path | None = None


def search(
    conn: Connection,
    settings: Settings,
    query: Query,
    study: str | None = None,
    series_uid: str | None = None,
) -> tuple[list[Hit], bool]:
    """The page of answers at the query's lowest level, and whether more follow it."""
    where = [_clause(m) for m in query.matches]
    if study is not None:
        where.append(studies.c.study_instance_uid == study)
    if series_uid is not None:
        where.append(series.c.series_instance_uid == series_uid)
    lowest = max(query.levels)
    if lowest is Level.STUDY:
        return _studies(conn, query, where)
    if lowest is Level.SERIES:
        return _series(conn, query, where)
    return _instances(conn, settings, query, where)


def exists_study(conn: Connection, study: str, series_uid: str | None = None) -> bool:
    query = select(studies.c.id).where(studies.c.study_instance_uid == study)
    if series_uid is not None:
        query = query.join(series, series.c.study_id == studies.c.id).where(
            series.c.series_instance_uid == series_uid
        )
    return conn.execute(query.limit(1)).first() is not None


# --- matching --------------------------------------------------------------------------------


def _like(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def _upper_time(value: str) -> str:
    # "1300" as the end of a range means up to 13:00:59.999999, not 13:00:00 sharp.
    full = "235959.999999"
    if len(value) < 6:
        return value + full[len(value) :]
    head, _, fraction = value.partition(".")
    return f"{head}.{fraction.ljust(6, '9')}"


def _clause(match: Match) -> ColumnElement[bool]:
    attribute = match.attribute
    if attribute.keyword == "ModalitiesInStudy":
        other = series.alias("mis")
        condition = (
            other.c.modality.ilike(_like(match.values[0]), escape="\\")
            if match.kind is Kind.WILDCARD
            else other.c.modality.in_(match.values)
        )
        return exists().where(other.c.study_id == studies.c.id, condition)
    column: ColumnElement[Any] | None = attribute.column
    if column is None:  # parse_query only lets matchable attributes through
        raise ValueError(f"{attribute.keyword} cannot be matched")
    value = match.values[0]
    if match.kind is Kind.WILDCARD:
        return column.ilike(_like(value), escape="\\")
    if match.kind is Kind.LIST:
        return column.in_(match.values)
    if match.kind is Kind.RANGE:
        low, high = match.values
        bounds = [column != ""]
        if low:
            bounds.append(column >= low)
        if high:
            bounds.append(column <= (_upper_time(high) if attribute.vr == "TM" else high))
        return and_(*bounds)
    if attribute.vr == "IS":
        number = float(value)
        return column == int(number) if number.is_integer() else false()
    if attribute.vr == "DS":
        return column == float(value)
    if attribute.vr == "PN":
        return func.lower(column) == value.lower()
    return column == value


# --- studies ---------------------------------------------------------------------------------


def _studies(
    conn: Connection, query: Query, where: list[ColumnElement[bool]]
) -> tuple[list[Hit], bool]:
    page = (
        select(studies.c.study_instance_uid, func.min(studies.c.id).label("rep"))
        .where(*where)
        .group_by(studies.c.study_instance_uid)
        # Newest first; max(id) comes from the UID index itself on SQLite (no table reads).
        .order_by(func.max(studies.c.id).desc(), studies.c.study_instance_uid)
        .limit(query.limit + 1)
        .offset(query.offset)
    )
    rows = conn.execute(page).all()
    more = len(rows) > query.limit
    reps = {r.study_instance_uid: r.rep for r in rows[: query.limit]}
    values = _study_values(conn, reps)
    return [Hit(values[uid], uid) for uid in reps], more


def _study_values(conn: Connection, reps: dict[str, int]) -> dict[str, Values]:
    """Study attributes from each UID's representative row; counts over all its receptions."""
    if not reps:
        return {}
    uids = list(reps)
    columns = [a for a in at_levels(frozenset({Level.STUDY})) if a.column is not None]
    found: dict[str, Values] = {}
    for row in conn.execute(select(studies).where(studies.c.id.in_(list(reps.values())))):
        mapping = row._mapping
        found[row.study_instance_uid] = {a.keyword: [mapping[a.column]] for a in columns}
    counts = conn.execute(
        select(
            studies.c.study_instance_uid,
            func.count(func.distinct(series.c.series_instance_uid)),
            func.count(instances.c.id),
        )
        .select_from(
            instances.join(series, series.c.id == instances.c.series_id).join(
                studies, studies.c.id == instances.c.study_id
            )
        )
        .where(studies.c.study_instance_uid.in_(uids))
        .group_by(studies.c.study_instance_uid)
    ).all()
    for uid, n_series, n_instances in counts:
        found[uid]["NumberOfStudyRelatedSeries"] = [int(n_series)]
        found[uid]["NumberOfStudyRelatedInstances"] = [int(n_instances)]
    modalities: dict[str, set[str]] = defaultdict(set)
    for uid, modality in conn.execute(
        select(studies.c.study_instance_uid, series.c.modality)
        .select_from(series.join(studies, studies.c.id == series.c.study_id))
        .where(studies.c.study_instance_uid.in_(uids))
        .distinct()
    ):
        if modality:
            modalities[uid].add(modality)
    for uid, values in found.items():
        values.setdefault("NumberOfStudyRelatedSeries", [0])
        values.setdefault("NumberOfStudyRelatedInstances", [0])
        values["ModalitiesInStudy"] = sorted(modalities[uid])
        values["StudyID"] = []
    return found


# --- series ----------------------------------------------------------------------------------


def _series(
    conn: Connection, query: Query, where: list[ColumnElement[bool]]
) -> tuple[list[Hit], bool]:
    page = (
        select(
            studies.c.study_instance_uid,
            series.c.series_instance_uid,
            func.min(series.c.id).label("rep"),
            func.min(studies.c.id).label("study_rep"),
        )
        .select_from(series.join(studies, studies.c.id == series.c.study_id))
        .where(*where)
        .group_by(studies.c.study_instance_uid, series.c.series_instance_uid)
        # Series of one study together (its receptions have different ids), by number.
        .order_by(
            studies.c.study_instance_uid,
            func.min(func.coalesce(series.c.series_number, 0)),
            series.c.series_instance_uid,
        )
        .limit(query.limit + 1)
        .offset(query.offset)
    )
    rows = conn.execute(page).all()
    more = len(rows) > query.limit
    rows = rows[: query.limit]
    series_values = _series_values(
        conn, {(r.study_instance_uid, r.series_instance_uid): r.rep for r in rows}
    )
    study_values: dict[str, Values] = {}
    if Level.STUDY in query.levels:
        study_values = _study_values(conn, {r.study_instance_uid: r.study_rep for r in rows})
    hits = []
    for r in rows:
        key = (r.study_instance_uid, r.series_instance_uid)
        values = {**study_values.get(r.study_instance_uid, {}), **series_values[key]}
        hits.append(Hit(values, r.study_instance_uid, r.series_instance_uid))
    return hits, more


def _series_values(
    conn: Connection, reps: dict[tuple[str, str], int]
) -> dict[tuple[str, str], Values]:
    if not reps:
        return {}
    columns = [a for a in at_levels(frozenset({Level.SERIES})) if a.column is not None]
    by_id = {rep: key for key, rep in reps.items()}
    found: dict[tuple[str, str], Values] = {}
    for row in conn.execute(select(series).where(series.c.id.in_(list(by_id)))):
        mapping = row._mapping
        found[by_id[row.id]] = {a.keyword: [mapping[a.column]] for a in columns}
        found[by_id[row.id]]["NumberOfSeriesRelatedInstances"] = [0]
    counts = conn.execute(
        select(
            studies.c.study_instance_uid,
            series.c.series_instance_uid,
            func.count(instances.c.id),
        )
        .select_from(
            instances.join(series, series.c.id == instances.c.series_id).join(
                studies, studies.c.id == instances.c.study_id
            )
        )
        .where(series.c.series_instance_uid.in_([key[1] for key in reps]))
        .group_by(studies.c.study_instance_uid, series.c.series_instance_uid)
    ).all()
    for study_uid, series_uid, n in counts:
        if (study_uid, series_uid) in found:
            found[(study_uid, series_uid)]["NumberOfSeriesRelatedInstances"] = [int(n)]
    return found


# --- instances -------------------------------------------------------------------------------


def _instances(
    conn: Connection, settings: Settings, query: Query, where: list[ColumnElement[bool]]
) -> tuple[list[Hit], bool]:
    page = (
        select(
            instances,
            studies.c.study_instance_uid,
            series.c.series_instance_uid,
            studies.c.id.label("study_rep"),
        )
        .select_from(
            instances.join(series, series.c.id == instances.c.series_id).join(
                studies, studies.c.id == instances.c.study_id
            )
        )
        .where(*where)
        .order_by(
            studies.c.study_instance_uid,
            func.coalesce(series.c.series_number, 0),
            series.c.series_instance_uid,
            func.coalesce(instances.c.instance_number, 0),
            instances.c.sop_instance_uid,
        )
        .limit(query.limit + 1)
        .offset(query.offset)
    )
    rows = conn.execute(page).all()
    more = len(rows) > query.limit
    rows = rows[: query.limit]
    series_values: dict[tuple[str, str], Values] = {}
    if Level.SERIES in query.levels:
        series_values = _series_values(
            conn, {(r.study_instance_uid, r.series_instance_uid): r.series_id for r in rows}
        )
    study_values: dict[str, Values] = {}
    if Level.STUDY in query.levels:
        study_values = _study_values(conn, {r.study_instance_uid: r.study_rep for r in rows})
    columns = [a for a in at_levels(frozenset({Level.INSTANCE})) if a.column is not None]
    hits = []
    for r in rows:
        mapping = r._mapping
        values: Values = {
            **study_values.get(r.study_instance_uid, {}),
            **series_values.get((r.study_instance_uid, r.series_instance_uid), {}),
            **{a.keyword: [mapping[a.column]] for a in columns},
        }
        hits.append(
            Hit(
                values,
                r.study_instance_uid,
                r.series_instance_uid,
                r.sop_instance_uid,
                stored_path(settings, r.kind, r.path),
            )
        )
    return hits, more

"""The recorder: indexes stored instances as they are received, in batches.

:class:`InstanceRecorder` commits the instances of concurrent associations together (group
commit); :class:`_DriverCursor` runs its statements on the database driver itself, around
SQLAlchemy's per-statement cost, within SQLAlchemy's transaction.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.engine import Connection
from sqlalchemy.engine.interfaces import DBAPICursor, DBAPIModule
from sqlalchemy.exc import DBAPIError, IntegrityError, StatementError

from pacs_ai.dicom.header import InstanceHeader
from pacs_ai.storage.db import writer_turn
from pacs_ai.storage.index import insert_ignore, series_values
from pacs_ai.storage.schema import COMPLETE, RECEIVING, SOURCE, series, studies

logger = logging.getLogger(__name__)


def _study_values(h: InstanceHeader, calling_ae: str, now: float) -> dict[str, Any]:
    return {
        "study_instance_uid": h.study_instance_uid,
        "calling_ae": calling_ae,
        "state": RECEIVING,
        "patient_id": h.patient_id[:64],
        "patient_name": h.patient_name[:324],
        "patient_birth_date": h.patient_birth_date[:8],
        "patient_sex": h.patient_sex[:16],
        "accession_number": h.accession_number[:16],
        "study_date": h.study_date[:8],
        "study_time": h.study_time[:16],
        "study_description": h.study_description[:64],
        "referring_physician_name": h.referring_physician_name[:324],
        "first_received_at": now,
        "last_received_at": now,
        "completed_at": None,
        "series_count": 0,
        "instance_count": 0,
        "completions": 0,
        "reopened": 0,
    }


# The columns of a received instance's row, in the order of :func:`_instance_row`.
_INSTANCE_COLUMNS = (
    "sop_instance_uid",
    "sop_class_uid",
    "series_id",
    "study_id",
    "instance_number",
    "transfer_syntax_uid",
    "path",
    "size_bytes",
    "calling_ae",
    "received_at",
    "duplicates",
    "kind",
)

# Instance rows in one INSERT at most, so that its parameters stay within SQLite's limit.
_INSERT_ROWS = 100


def _instance_row(item: _Pending, series_id: int) -> tuple[Any, ...]:
    h = item.header
    return (
        h.sop_instance_uid,
        h.sop_class_uid,
        series_id,
        item.study_id,
        h.instance_number,
        h.transfer_syntax_uid,
        item.path,
        item.size,
        item.calling_ae,
        item.now,
        0,
        SOURCE,
    )


@dataclass
class _Pending:
    """One instance waiting to be indexed, and, once its batch is committed, the outcome."""

    header: InstanceHeader
    calling_ae: str
    path: str
    size: int
    now: float
    study_id: int = 0
    added: bool | None = None
    error: Exception | None = None
    done: bool = False


def _close_kept(kept: list[Connection]) -> None:
    while kept:
        kept.pop().close()


class _DriverCursor:
    """A DBAPI cursor on a connection in a transaction, its errors raised as SQLAlchemy's.

    The recorder runs its few statements on the driver itself: SQLAlchemy's execution
    (parameters, contexts, results) cost more Python time per instance than the driver's
    did; going around it took the recorder from about 100 to 40 µs of CPU an instance on
    SQLite, and from 330 to 180 on PostgreSQL, in batches of one. The transaction is still
    SQLAlchemy's. What SQLAlchemy would have done with a driver error is done here too:
    the same exception classes (IntegrityError, OperationalError, ...), and a connection
    the dialect calls disconnected is invalidated, with ``connection_invalidated`` set.
    """

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._dialect = conn.dialect
        self._error: type[DBAPIModule.Error] = conn.dialect.loaded_dbapi.Error
        self._dbapi_connection = conn.connection.dbapi_connection
        assert self._dbapi_connection is not None  # conn is open and valid: it just began
        try:
            self._cursor: DBAPICursor = self._dbapi_connection.cursor()
        except self._error as exc:  # psycopg: a connection already known to be closed
            raise self._translated(exc, None, None, None, False) from exc

    def rows(self, sql: str, params: Sequence[Any]) -> list[Any]:
        """What a statement with RETURNING returned."""
        try:
            self._cursor.execute(sql, params)
            return list(self._cursor.fetchall())
        except self._error as exc:
            raise self._translated(exc, self._cursor, sql, params, False) from exc

    def execute(self, sql: str, params: Sequence[Any]) -> int:
        """The count of rows the statement changed."""
        try:
            self._cursor.execute(sql, params)
        except self._error as exc:
            raise self._translated(exc, self._cursor, sql, params, False) from exc
        return self._cursor.rowcount

    def executemany(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        try:
            self._cursor.executemany(sql, params)
        except self._error as exc:
            raise self._translated(exc, self._cursor, sql, params, True) from exc

    def close(self) -> None:
        # sqlite3 refuses to close a cursor of a closed connection: one invalidated above.
        with contextlib.suppress(self._error):
            self._cursor.close()

    def _translated(
        self,
        exc: DBAPIModule.Error,
        cursor: DBAPICursor | None,
        sql: str | None,
        params: Any,
        many: bool,
    ) -> StatementError:
        disconnected = self._dialect.is_disconnect(exc, self._dbapi_connection, cursor)
        if disconnected:
            self._conn.invalidate(exc)
        return DBAPIError.instance(
            sql,
            params,
            exc,
            self._error,
            hide_parameters=self._conn.engine.hide_parameters,
            connection_invalidated=disconnected,
            dialect=self._dialect,
            ismulti=many,
        )


class InstanceRecorder:
    """Indexes stored instances; one per process, shared by its associations.

    Study and series rows are looked up once and their ids kept, so a typical instance
    costs one row in a multi-row INSERT. The statements are built once, in the driver's own
    SQL (see :class:`_DriverCursor`): at hundreds of instances a second, building SQL per
    call costs more than running it.

    Group commit: instances that arrive while a transaction is running are indexed together
    in the next one, by whichever caller gets there first, and every caller returns only
    after the transaction holding its own row has committed. One association alone still
    gets a transaction of its own, with no hand-off to another thread.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._study_ids: dict[tuple[str, str], int] = {}
        self._series_ids: dict[tuple[int, str], int] = {}
        self._queue: list[_Pending] = []
        self._writing = False
        # Kept between batches, used by one writer at a time (``_writing``): checking a
        # connection out of the pool and back in (a ping on PostgreSQL, a rollback on
        # SQLite) cost as much Python time as the INSERT itself. A list, so that the
        # finalizer can give it back to the pool without holding the recorder alive.
        self._kept: list[Connection] = []
        weakref.finalize(self, _close_kept, self._kept)
        self._writer_turn = writer_turn(engine)
        if self._writer_turn is not None:
            weakref.finalize(self, self._writer_turn.close)
        self._turn = threading.Condition()
        # The statements of every batch, in the driver's own SQL (see _DriverCursor):
        # sqlite3 takes qmark parameters, psycopg format ones.
        on_sqlite = engine.dialect.name == "sqlite"
        mark = "?" if on_sqlite else "%s"
        greatest = "max" if on_sqlite else "greatest"
        self._row_marks = "(" + ", ".join([mark] * len(_INSTANCE_COLUMNS)) + ")"
        self._inserts: dict[int, str] = {}  # by row count, see _insert_sql
        self._touch = (
            f"UPDATE studies SET last_received_at = {greatest}(last_received_at, {mark})"
            f" WHERE id = {mark} RETURNING state"
        )
        self._reopen = (
            f"UPDATE studies SET state = {mark}, reopened = reopened + 1"
            f" WHERE id = {mark} AND state = {mark}"
        )
        self._duplicate = (
            f"UPDATE instances SET duplicates = duplicates + 1 WHERE sop_instance_uid = {mark}"
        )

    def record(
        self, header: InstanceHeader, calling_ae: str, path: str, size: int, now: float
    ) -> bool:
        """Index one stored instance; False if its SOP Instance UID was already indexed.

        Returns once the row is committed. A new instance for a COMPLETE study puts it back
        to RECEIVING (and counts the reopening), so the assembler completes it again after
        the next quiet period.
        """
        item = _Pending(header, calling_ae, path, size, now)
        with self._turn:
            self._queue.append(item)
            while self._writing and not item.done:
                self._turn.wait()
            batch: list[_Pending] = []
            if not item.done:
                batch, self._queue = self._queue, []
                self._writing = True
        if batch:
            self._write(batch)
        if item.error is not None:
            raise item.error
        if item.added is None:
            raise RuntimeError(f"instance {header.sop_instance_uid} was not indexed")
        return item.added

    def _write(self, batch: list[_Pending]) -> None:
        try:
            self._run(batch)
        finally:
            with self._turn:
                for item in batch:
                    item.done = True
                self._writing = False
                self._turn.notify_all()

    def _run(self, batch: list[_Pending]) -> None:
        """Index ``batch`` in one transaction; each entry gets its outcome or its error."""
        try:
            for item, added in zip(batch, self._record_retrying(batch), strict=True):
                item.added = added
        except Exception as exc:
            # Not handled here: the waiting caller raises it in its own thread.
            self._forget_ids()
            if len(batch) == 1:
                batch[0].error = exc
                return
            # One bad instance must not fail the others that happened to share its batch.
            for item in batch:
                self._run([item])

    def _record_retrying(self, batch: list[_Pending]) -> list[bool]:
        try:
            return self._record(batch)
        except DBAPIError as exc:
            # A cached study or series row was removed (purge: IntegrityError), or the kept
            # connection died (database restarted: what the pool's pre-ping would have caught
            # at check-out). Nothing was committed: forget the ids, once more on a new one.
            if not (isinstance(exc, IntegrityError) or exc.connection_invalidated):
                raise
            self._forget_ids()
            return self._record(batch)

    def _connection(self) -> Connection:
        if self._kept and (self._kept[0].invalidated or self._kept[0].closed):
            _close_kept(self._kept)
        if not self._kept:
            self._kept.append(self.engine.connect())
        return self._kept[0]

    def close(self) -> None:
        """Give the kept connection back to the pool (the recorder stays usable)."""
        with self._turn:
            while self._writing:
                self._turn.wait()
            _close_kept(self._kept)
            if self._writer_turn is not None:
                self._writer_turn.close()

    def _insert_sql(self, n: int) -> str:
        """INSERT of ``n`` instance rows; built once for each ``n`` (at most _INSERT_ROWS)."""
        sql = self._inserts.get(n)
        if sql is None:
            # RETURNING tells "inserted" from "conflict" on both dialects; rowcount does not
            # (PostgreSQL reports an implicit RETURNING's rowcount differently).
            sql = self._inserts[n] = (
                f"INSERT INTO instances ({', '.join(_INSTANCE_COLUMNS)})"
                f" VALUES {', '.join([self._row_marks] * n)}"
                " ON CONFLICT (sop_instance_uid) DO NOTHING RETURNING sop_instance_uid"
            )
        return sql

    def _forget_ids(self) -> None:
        # Ids learnt in a transaction that rolled back may name rows that never existed.
        self._study_ids.clear()
        self._series_ids.clear()

    def _record(self, batch: list[_Pending]) -> list[bool]:
        conn = self._connection()
        turn = self._writer_turn() if self._writer_turn is not None else contextlib.nullcontext()
        with turn, conn.begin():
            first: dict[str, int] = {}
            rows: list[tuple[Any, ...]] = []
            for i, item in enumerate(batch):
                h = item.header
                item.study_id = self._study_id(conn, h, item.calling_ae, item.now)
                series_id = self._series_id(conn, h, item.study_id, item.now)
                if h.sop_instance_uid not in first:
                    first[h.sop_instance_uid] = i
                    rows.append(_instance_row(item, series_id))
            cursor = _DriverCursor(conn)
            try:
                inserted = self._insert(cursor, rows)
                added = [
                    first[item.header.sop_instance_uid] == i
                    and item.header.sop_instance_uid in inserted
                    for i, item in enumerate(batch)
                ]
                self._count_duplicates(cursor, batch, added)
                reopened = self._touch_studies(cursor, batch, added)
            finally:
                cursor.close()
        for item in reopened:
            logger.info(
                "study %s from %s reopened by new instance %s",
                item.header.study_instance_uid,
                item.calling_ae,
                item.header.sop_instance_uid,
            )
        return added

    def _insert(self, cursor: _DriverCursor, rows: list[tuple[Any, ...]]) -> set[str]:
        """Insert ``rows`` (distinct SOP Instance UIDs); the UIDs that were not there yet."""
        inserted: set[str] = set()
        for start in range(0, len(rows), _INSERT_ROWS):
            chunk = rows[start : start + _INSERT_ROWS]
            params = [value for row in chunk for value in row]
            inserted.update(row[0] for row in cursor.rows(self._insert_sql(len(chunk)), params))
        return inserted

    def _count_duplicates(
        self, cursor: _DriverCursor, batch: list[_Pending], added: list[bool]
    ) -> None:
        # Stored a moment ago by another association, or earlier in this same batch.
        repeats = [
            (item.header.sop_instance_uid,)
            for item, new in zip(batch, added, strict=True)
            if not new
        ]
        if repeats:
            cursor.executemany(self._duplicate, repeats)

    def _touch_studies(
        self, cursor: _DriverCursor, batch: list[_Pending], added: list[bool]
    ) -> list[_Pending]:
        """Note new activity on each study that got instances; return those that reopened."""
        latest: dict[int, _Pending] = {}
        for item, new in zip(batch, added, strict=True):
            if new and (item.study_id not in latest or latest[item.study_id].now < item.now):
                latest[item.study_id] = item
        reopened = []
        for sid, item in latest.items():
            # The touch reports the state, so the reopening UPDATE runs only when it matters.
            touched = cursor.rows(self._touch, (item.now, sid))
            state = touched[0][0] if touched else None
            if state == COMPLETE and cursor.execute(self._reopen, (RECEIVING, sid, COMPLETE)):
                reopened.append(item)
        return reopened

    def _study_id(self, conn: Connection, h: InstanceHeader, calling_ae: str, now: float) -> int:
        key = (h.study_instance_uid, calling_ae)
        if key not in self._study_ids:
            insert_ignore(
                conn,
                studies,
                _study_values(h, calling_ae, now),
                ["study_instance_uid", "calling_ae"],
            )
            self._study_ids[key] = conn.execute(
                select(studies.c.id).where(
                    studies.c.study_instance_uid == h.study_instance_uid,
                    studies.c.calling_ae == calling_ae,
                )
            ).scalar_one()
        return self._study_ids[key]

    def _series_id(self, conn: Connection, h: InstanceHeader, study_id: int, now: float) -> int:
        key = (study_id, h.series_instance_uid)
        if key not in self._series_ids:
            insert_ignore(
                conn, series, series_values(h, study_id, now), ["study_id", "series_instance_uid"]
            )
            self._series_ids[key] = conn.execute(
                select(series.c.id).where(
                    series.c.study_id == study_id,
                    series.c.series_instance_uid == h.series_instance_uid,
                )
            ).scalar_one()
        return self._series_ids[key]

"""Group commit in the index: many associations at once, each told only what its row became."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.exc import DBAPIError, IntegrityError

from pacs_ai.dicom.header import InstanceHeader, read_header
from pacs_ai.storage import db as db_module
from pacs_ai.storage import index
from pacs_ai.storage.db import WriterTurn, open_database, writer_turn
from pacs_ai.storage.recorder import _INSERT_ROWS, InstanceRecorder, _Pending
from pacs_ai.storage.schema import COMPLETE, RECEIVING, SOURCE, instances
from tests.peers import wait_for
from tests.realdata import real_file

HEADER = read_header(real_file("CT_small.dcm").read_bytes())


@pytest.fixture
def rec(engine: Engine) -> Iterator[InstanceRecorder]:
    """A recorder on the test's index, closed (its kept connection given back) at the end."""
    recorder = InstanceRecorder(engine)
    yield recorder
    recorder.close()


def _instance(i: int, series: str = "1.2.3") -> InstanceHeader:
    return replace(
        HEADER, sop_instance_uid=f"{HEADER.sop_instance_uid}.{i}", series_instance_uid=series
    )


def _record_all(rec: InstanceRecorder, headers: list[InstanceHeader]) -> list[object]:
    """Record each header from its own thread, all released at once; return each outcome."""
    results: list[object] = [None] * len(headers)
    start = threading.Barrier(len(headers))

    def work(i: int) -> None:
        start.wait()
        try:
            results[i] = rec.record(headers[i], "MOD", f"{i}.dcm", 10, now=100.0 + i)
        except Exception as exc:  # collected for the assertion below
            results[i] = exc

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(headers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_concurrent_instances_are_all_indexed_and_batched(
    engine: Engine, rec: InstanceRecorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches: list[int] = []
    real_record = rec._record

    def counting_record(batch: list[_Pending]) -> list[bool]:
        batches.append(len(batch))
        return real_record(batch)

    monkeypatch.setattr(rec, "_record", counting_record)
    headers = [_instance(i, series=f"1.2.3.{i % 3}") for i in range(24)]
    assert _record_all(rec, headers) == [True] * 24
    assert sum(batches) == 24 and max(batches) > 1  # group commit happened
    (study,) = index.list_studies(engine)
    assert (study.instance_count, study.series_count, study.duplicates) == (24, 3, 0)
    assert study.last_received_at == 123.0


def test_the_same_instance_from_two_associations_is_stored_once_and_counted(
    engine: Engine,
    rec: InstanceRecorder,
) -> None:
    headers = [_instance(1)] * 6 + [_instance(2)] * 2
    results = _record_all(rec, headers)
    assert results[:6].count(True) == 1 and results[6:].count(True) == 1
    (study,) = index.list_studies(engine)
    assert (study.instance_count, study.duplicates) == (2, 6)


def test_one_bad_instance_fails_alone(engine: Engine, rec: InstanceRecorder) -> None:
    bad = replace(_instance(99), sop_class_uid=None)  # type: ignore[arg-type]  # NOT NULL
    headers = [_instance(i) for i in range(7)] + [bad]
    results = _record_all(rec, headers)
    assert results[:7] == [True] * 7
    # SQLAlchemy's class, as if SQLAlchemy had run the INSERT: ingest answers "index
    # unavailable" to any SQLAlchemyError.
    assert isinstance(results[7], IntegrityError)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(instances)).scalar_one() == 7


def test_a_batch_reopens_a_complete_study_once(engine: Engine, rec: InstanceRecorder) -> None:
    rec.record(_instance(0), "MOD", "0.dcm", 10, now=1.0)
    (study,) = index.list_studies(engine)
    assert index.mark_complete(engine, study.id, cutoff=5.0, now=5.0) is not None
    assert _record_all(rec, [_instance(i) for i in range(1, 9)]) == [True] * 8
    (study,) = index.list_studies(engine)
    assert (study.state, study.reopened, study.instance_count) == (RECEIVING, 1, 9)
    assert study.state != COMPLETE


def test_a_batch_stores_every_column_and_its_own_repeats_as_duplicates(
    engine: Engine, rec: InstanceRecorder
) -> None:
    first, unnumbered = _instance(1), replace(_instance(2), instance_number=None)
    batch = [
        _Pending(first, "MOD", "1.dcm", 1234, now=10.5),
        _Pending(unnumbered, "MOD", "2.dcm", 5678, now=11.25),
        _Pending(first, "MOD", "1b.dcm", 99, now=12.0),  # the same instance again
    ]
    assert rec._record(batch) == [True, True, False]
    with engine.connect() as conn:
        rows = conn.execute(select(instances).order_by(instances.c.sop_instance_uid)).mappings()
        got = [
            {k: v for k, v in row.items() if k not in ("id", "series_id", "study_id")}
            for row in rows
        ]
    expected = {
        "sop_class_uid": HEADER.sop_class_uid,
        "transfer_syntax_uid": HEADER.transfer_syntax_uid,
        "calling_ae": "MOD",
        "kind": SOURCE,
    }
    assert got == [
        {
            **expected,
            "sop_instance_uid": first.sop_instance_uid,
            "instance_number": first.instance_number,
            "path": "1.dcm",
            "size_bytes": 1234,
            "received_at": 10.5,
            "duplicates": 1,
        },
        {
            **expected,
            "sop_instance_uid": unnumbered.sop_instance_uid,
            "instance_number": None,
            "path": "2.dcm",
            "size_bytes": 5678,
            "received_at": 11.25,
            "duplicates": 0,
        },
    ]
    (study,) = index.list_studies(engine)
    assert study.last_received_at == 11.25  # the repeat is no new activity


def test_a_batch_larger_than_one_insert_takes_several(
    engine: Engine, rec: InstanceRecorder
) -> None:
    count, held = 2 * _INSERT_ROWS + 3, _INSERT_ROWS + 4  # three INSERTs
    assert rec.record(_instance(held), "MOD", f"{held}.dcm", 10, now=1.0)
    batch = [_Pending(_instance(i), "MOD", f"{i}.dcm", 10, now=2.0) for i in range(count)]
    assert rec._record(batch) == [i != held for i in range(count)]
    (study,) = index.list_studies(engine)
    assert (study.instance_count, study.duplicates) == (count, 1)


def test_a_driver_error_is_raised_as_sqlalchemys_and_keeps_the_connection(
    engine: Engine,
    rec: InstanceRecorder,
) -> None:
    assert rec.record(_instance(0), "MOD", "0.dcm", 10, now=1.0)
    kept = rec._kept[0]
    on_sqlite = engine.dialect.name == "sqlite"
    kept.exec_driver_sql(
        "PRAGMA query_only = ON"
        if on_sqlite
        else "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY"
    )
    kept.commit()
    with pytest.raises(DBAPIError) as raised:  # not retried: neither of the two known causes
        rec.record(_instance(1), "MOD", "1.dcm", 10, now=2.0)
    assert not isinstance(raised.value, IntegrityError)
    assert not raised.value.connection_invalidated
    assert rec._kept == [kept] and not kept.invalidated
    kept.exec_driver_sql(
        "PRAGMA query_only = OFF"
        if on_sqlite
        else "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE"
    )
    kept.commit()
    assert rec.record(_instance(1), "MOD", "1.dcm", 10, now=3.0)
    rec.close()


def test_a_kept_connection_closed_under_the_recorder_is_replaced(
    engine: Engine, rec: InstanceRecorder
) -> None:
    assert rec.record(_instance(0), "MOD", "0.dcm", 10, now=1.0)
    dbapi_connection = rec._kept[0].connection.dbapi_connection
    assert dbapi_connection is not None
    dbapi_connection.close()  # the driver's connection, behind SQLAlchemy's back
    assert rec.record(_instance(1), "MOD", "1.dcm", 10, now=2.0)
    assert not rec.record(_instance(1), "MOD", "1.dcm", 10, now=3.0)  # seen: a duplicate
    assert engine.pool.checkedout() == 1  # type: ignore[attr-defined]  # the new one, kept
    (study,) = index.list_studies(engine)
    assert (study.instance_count, study.duplicates, study.last_received_at) == (2, 1, 2.0)
    rec.close()


def test_the_kept_connection_goes_back_to_the_pool_on_close(
    engine: Engine, rec: InstanceRecorder
) -> None:
    assert rec.record(_instance(0), "MOD", "0.dcm", 10, now=1.0)
    assert rec.record(_instance(1), "MOD", "1.dcm", 10, now=2.0)
    assert engine.pool.checkedout() == 1  # type: ignore[attr-defined]  # one, kept
    rec.close()
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert rec.record(_instance(2), "MOD", "2.dcm", 10, now=3.0)  # and still usable
    rec.close()


@pytest.mark.postgres
def test_a_kept_connection_the_server_ended_is_replaced(postgres_url: str) -> None:
    engine = open_database(postgres_url)
    try:
        rec = InstanceRecorder(engine)
        assert rec.record(_instance(0), "MOD", "0.dcm", 10, now=1.0)
        # What a PostgreSQL restart does to every open connection.
        with engine.connect() as admin:
            ended = admin.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    " AND backend_type = 'client backend'"
                )
            ).scalar_one()
        assert ended == 1
        assert rec.record(_instance(1), "MOD", "1.dcm", 10, now=2.0)
        assert not rec.record(_instance(1), "MOD", "1.dcm", 10, now=3.0)  # seen: a duplicate
        with engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(instances)).scalar_one() == 2
        rec.close()
    finally:
        engine.dispose()


def _turn_is_held(path: Path) -> bool:
    """Whether some open file holds the turn at ``path`` (asked from a file of our own)."""
    probe = WriterTurn(path, wait_s=0)
    try:
        fd = probe._open()
        try:
            db_module.fcntl.flock(fd, db_module.fcntl.LOCK_EX | db_module.fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        db_module.fcntl.flock(fd, db_module.fcntl.LOCK_UN)
        return False
    finally:
        probe.close()


def test_postgresql_needs_no_turns(engine: Engine) -> None:
    assert (writer_turn(engine) is None) == (engine.dialect.name != "sqlite")


def test_receivers_take_turns_at_an_sqlite_index_and_wait_for_each_other(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = open_database(f"sqlite:///{tmp_path / 'index.sqlite3'}")
    turn = writer_turn(engine)
    assert turn is not None and turn.path.name == "index.sqlite3-writer.lock"
    # Another receiver process: its own open file, so flock() keeps the two apart.
    other = WriterTurn(turn.path)
    rec = InstanceRecorder(engine)
    done = threading.Event()

    def record() -> None:
        rec.record(_instance(1), "MOD", "1.dcm", 10, now=100.0)
        done.set()

    def waiting_for_its_turn() -> bool:
        frame = sys._current_frames().get(writer.ident or 0)
        while frame is not None and frame.f_code is not WriterTurn._take.__code__:
            frame = frame.f_back
        return frame is not None

    try:
        with other():
            writer = threading.Thread(target=record)
            writer.start()
            wait_for(waiting_for_its_turn, 10, "the recorder to wait for its turn", interval=0.01)
            assert not done.is_set(), "the recorder wrote while another held the turn"
            with engine.connect() as conn:
                assert conn.execute(select(func.count()).select_from(instances)).scalar_one() == 0
        assert done.wait(10), "the recorder did not write once the turn was free"
        writer.join()
        assert "no turn at the index" not in caplog.text  # it had the turn: it did not give up
        with engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(instances)).scalar_one() == 1
    finally:
        rec.close()
        other.close()
        engine.dispose()


def test_a_turn_not_had_in_time_or_not_possible_means_writing_without(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "index.sqlite3-writer.lock"
    stuck, turn = WriterTurn(path), WriterTurn(path, wait_s=0.2)
    with stuck(), turn():
        pass  # entered: after the wait, without the turn
    assert "no turn at the index" in caplog.text and turn.enabled
    with turn():
        assert _turn_is_held(path)  # and with it, now that it is free
    assert not _turn_is_held(path)
    stuck.close()
    turn.close()

    # A lock file that cannot be had (here: its folder is gone; on NFS, flock's ENOLCK).
    lost = WriterTurn(tmp_path / "gone" / "index.sqlite3-writer.lock")
    with lost():
        pass
    assert not lost.enabled and "cannot take turns" in caplog.text
    lost.close()


def test_a_forked_child_does_not_end_the_parents_turn(tmp_path: Path) -> None:
    turn = WriterTurn(tmp_path / "index.sqlite3-writer.lock", wait_s=0.1)
    with turn():
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                # The child takes a turn of its own (it cannot: the parent holds it) and
                # leaves it. Sharing the parent's open file, its unlock would end the parent's.
                with turn():
                    pass
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert _turn_is_held(turn.path)
    turn.close()

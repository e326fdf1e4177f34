"""Group commit in the index: many associations at once, each told only what its row became."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
from sqlalchemy import Engine, func, select, text

from pacs_ai.dicom.header import InstanceHeader, read_header
from pacs_ai.storage import index
from pacs_ai.storage.db import open_database
from pacs_ai.storage.schema import COMPLETE, RECEIVING, instances
from tests.realdata import real_file

HEADER = read_header(real_file("CT_small.dcm").read_bytes())


def _instance(i: int, series: str = "1.2.3") -> InstanceHeader:
    return replace(
        HEADER, sop_instance_uid=f"{HEADER.sop_instance_uid}.{i}", series_instance_uid=series
    )


def _record_all(rec: index.InstanceRecorder, headers: list[InstanceHeader]) -> list[object]:
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
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = index.InstanceRecorder(engine)
    batches: list[int] = []
    real_record = rec._record

    def counting_record(batch: list[index._Pending]) -> list[bool]:
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
) -> None:
    rec = index.InstanceRecorder(engine)
    headers = [_instance(1)] * 6 + [_instance(2)] * 2
    results = _record_all(rec, headers)
    assert results[:6].count(True) == 1 and results[6:].count(True) == 1
    (study,) = index.list_studies(engine)
    assert (study.instance_count, study.duplicates) == (2, 6)


def test_one_bad_instance_fails_alone(engine: Engine) -> None:
    rec = index.InstanceRecorder(engine)
    bad = replace(_instance(99), sop_class_uid=None)  # type: ignore[arg-type]  # NOT NULL
    headers = [_instance(i) for i in range(7)] + [bad]
    results = _record_all(rec, headers)
    assert results[:7] == [True] * 7
    assert isinstance(results[7], Exception)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(instances)).scalar_one() == 7


def test_a_batch_reopens_a_complete_study_once(engine: Engine) -> None:
    rec = index.InstanceRecorder(engine)
    rec.record(_instance(0), "MOD", "0.dcm", 10, now=1.0)
    (study,) = index.list_studies(engine)
    assert index.mark_complete(engine, study.id, cutoff=5.0, now=5.0) is not None
    assert _record_all(rec, [_instance(i) for i in range(1, 9)]) == [True] * 8
    (study,) = index.list_studies(engine)
    assert (study.state, study.reopened, study.instance_count) == (RECEIVING, 1, 9)
    assert study.state != COMPLETE


def test_the_kept_connection_goes_back_to_the_pool_on_close(engine: Engine) -> None:
    rec = index.InstanceRecorder(engine)
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
        rec = index.InstanceRecorder(engine)
        assert rec.record(_instance(0), "MOD", "0.dcm", 10, now=1.0)
        # What a PostgreSQL restart does to every open connection.
        with engine.connect() as admin:
            ended = admin.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
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

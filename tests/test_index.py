"""The index on a real database: migrations, recording, duplicates, reopening, completion."""

from __future__ import annotations

from dataclasses import replace

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, text

from pacs_ai.dicom.header import read_header
from pacs_ai.storage import index
from pacs_ai.storage.db import open_database
from pacs_ai.storage.recorder import InstanceRecorder
from pacs_ai.storage.schema import COMPLETE, RECEIVING, metadata
from tests.realdata import real_file


def test_migrations_build_exactly_the_schema(engine: Engine) -> None:
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []


def test_migrations_are_idempotent(engine: Engine) -> None:
    open_database(str(engine.url.render_as_string(hide_password=False))).dispose()


HEADER = read_header(real_file("CT_small.dcm").read_bytes())


def test_record_duplicate_and_reopen(engine: Engine) -> None:
    rec = InstanceRecorder(engine)
    assert rec.record(HEADER, "MOD", "a.dcm", 10, now=100.0)
    assert not rec.record(HEADER, "MOD", "a.dcm", 10, now=101.0)  # same SOP Instance UID
    (study,) = index.list_studies(engine)
    assert (study.state, study.instance_count, study.duplicates) == (RECEIVING, 1, 1)
    assert study.last_received_at == 100.0  # a duplicate is not new activity

    done = index.mark_complete(engine, study.id, cutoff=200.0, now=200.0)
    assert done is not None and (done.series_count, done.instance_count) == (1, 1)
    assert index.mark_complete(engine, study.id, cutoff=300.0, now=300.0) is None  # once only

    second = replace(
        HEADER, sop_instance_uid=HEADER.sop_instance_uid + ".2", series_instance_uid="1.2.3"
    )
    assert rec.record(second, "MOD", "b.dcm", 10, now=250.0)
    (study,) = index.list_studies(engine)
    assert (study.state, study.reopened, study.instance_count, study.series_count) == (
        RECEIVING,
        1,
        2,
        2,
    )
    again = index.mark_complete(engine, study.id, cutoff=260.0, now=260.0)
    assert again is not None and again.completions == 2 and again.instance_count == 2


def test_same_study_from_two_senders_is_two_receptions(engine: Engine) -> None:
    rec = InstanceRecorder(engine)
    rec.record(HEADER, "CT1", "a.dcm", 10, now=1.0)
    other = replace(HEADER, sop_instance_uid=HEADER.sop_instance_uid + ".9")
    rec.record(other, "CT2", "b.dcm", 10, now=1.0)
    found = index.find_studies(engine, HEADER.study_instance_uid)
    assert sorted(s.calling_ae for s in found) == ["CT1", "CT2"]


def test_completion_guard_respects_late_instances(engine: Engine) -> None:
    rec = InstanceRecorder(engine)
    rec.record(HEADER, "MOD", "a.dcm", 10, now=100.0)
    (study,) = index.list_studies(engine)
    # The assembler decided at cutoff 90 (before the instance); the guard must refuse.
    assert index.mark_complete(engine, study.id, cutoff=90.0, now=130.0) is None
    assert index.list_studies(engine)[0].state == RECEIVING


def test_recorder_survives_a_purged_study(engine: Engine) -> None:
    rec = InstanceRecorder(engine)
    rec.record(HEADER, "MOD", "a.dcm", 10, now=1.0)
    with engine.begin() as conn:  # what a retention purge will do
        conn.execute(text("DELETE FROM instances"))
        conn.execute(text("DELETE FROM series"))
        conn.execute(text("DELETE FROM studies"))
    other = replace(HEADER, sop_instance_uid=HEADER.sop_instance_uid + ".3")
    assert rec.record(other, "MOD", "c.dcm", 10, now=2.0)
    assert index.totals(engine)["instances"] == 1
    assert index.list_studies(engine)[0].state != COMPLETE

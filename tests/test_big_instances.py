"""Instances of 2 GiB and more (enhanced multi-frame, whole-slide, long cine) are indexed.

PostgreSQL's INTEGER is 32 bits; SQLite's already holds 64, so there these guard the change.
"""

from __future__ import annotations

from contextlib import closing
from dataclasses import replace
from io import BytesIO
from pathlib import Path

import pydicom
from alembic import command
from sqlalchemy import Engine, insert, select, text

from pacs_ai.audit.events import AuditEvent, Kind
from pacs_ai.audit.trail import Auditor, rows
from pacs_ai.config import Settings, load_settings
from pacs_ai.dicom.header import read_header
from pacs_ai.storage import db, index, retention, stats
from pacs_ai.storage.recorder import InstanceRecorder
from pacs_ai.storage.schema import SOURCE, audit, instances, series, studies
from tests.databases import alembic
from tests.realdata import real_file

BIG = 3 * 2**31  # 6 GiB
# DICOM caps IS at 2**31 - 1 (PS3.5 6.2), but a sender's 12 characters may hold more.
BIG_NUMBER = 10**11
HEADER = read_header(real_file("CT_small.dcm").read_bytes())
DAY = 86400.0


def test_a_6_gib_instance_is_recorded_and_counted(engine: Engine, tmp_path: Path) -> None:
    small = replace(HEADER, sop_instance_uid=HEADER.sop_instance_uid + ".2")
    with closing(InstanceRecorder(engine)) as rec:
        assert rec.record(HEADER, "WSI", "big.dcm", BIG, now=100.0)
        assert rec.record(small, "WSI", "small.dcm", 10, now=100.0)

    with engine.connect() as conn:
        stored = conn.execute(
            select(instances.c.size_bytes).where(instances.c.path == "big.dcm")
        ).scalar_one()
    assert stored == BIG
    assert index.totals(engine)["bytes"] == BIG + 10  # pacs-ai status
    assert stats.counts(engine).received_bytes == BIG + 10  # /metrics

    (study,) = index.list_studies(engine)
    assert index.mark_complete(engine, study.id, cutoff=200.0, now=200.0) is not None
    config = tmp_path / "pacs-ai.toml"
    config.write_text(
        f'[node]\ndata_dir = "{tmp_path / "data"}"\n[retention]\nkeep_days = 7\n'
        f'[database]\nurl = "{engine.url.render_as_string(hide_password=False)}"\n'
    )
    (candidate,) = retention.candidates(engine, load_settings(config), now=100.0 + 8 * DAY)
    assert (candidate.instances, candidate.bytes) == (2, BIG + 10)  # pacs-ai purge --dry-run


def test_numbers_past_the_is_range_are_recorded(engine: Engine) -> None:
    odd = replace(HEADER, instance_number=BIG_NUMBER, series_number=-BIG_NUMBER)
    with closing(InstanceRecorder(engine)) as rec:
        assert rec.record(odd, "MOD", "a.dcm", 10, now=1.0)
    with engine.connect() as conn:
        stored = conn.execute(
            select(instances.c.instance_number, series.c.series_number).join(
                series, series.c.id == instances.c.series_id
            )
        ).one()
    assert tuple(stored) == (BIG_NUMBER, -BIG_NUMBER)


def test_an_instance_number_past_64_bits_is_recorded_as_absent(engine: Engine) -> None:
    """20 digits where IS allows 12: pydicom reads them, and no index column holds them."""
    buffer = BytesIO()
    ds = pydicom.dcmread(real_file("CT_small.dcm"))
    ds.InstanceNumber = 1
    ds.save_as(buffer, enforce_file_format=True)
    plain = b"\x20\x00\x13\x00IS\x02\x001 "
    data = buffer.getvalue().replace(plain, b"\x20\x00\x13\x00IS\x14\x00" + b"9" * 20)
    assert data != buffer.getvalue()
    header = read_header(data)
    assert header.instance_number is None
    with closing(InstanceRecorder(engine)) as rec:
        assert rec.record(header, "MOD", "long.dcm", len(data), now=1.0)
    with engine.connect() as conn:
        assert conn.execute(select(instances.c.instance_number)).scalar_one() is None


def test_keys_run_past_2_to_the_31(engine: Engine) -> None:
    """A row per image and per audit event, never reused: a busy node's keys pass 2^31."""
    last = 2**31 + 9
    auditor = Auditor(engine, Settings())
    with closing(InstanceRecorder(engine)) as rec:
        assert rec.record(HEADER, "CT", "first.dcm", 10, now=1.0)
        # The key counters where years of traffic leave them.
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                # commitment_items' sequence too: a key it cannot hand out fails here.
                for table in ("instances", "audit", "commitment_items"):
                    conn.execute(
                        text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), {last})")
                    )
            else:  # SQLite takes the largest key so far, plus one
                conn.execute(text(f"UPDATE instances SET id = {last}"))
                conn.execute(  # the audit table refuses UPDATE: a row with that key
                    insert(audit).values(
                        id=last, at=1.0, kind="query", event_id="110112", action="E"
                    )
                )
        later = replace(HEADER, sop_instance_uid=HEADER.sop_instance_uid + ".9")
        assert rec.record(later, "CT", "later.dcm", 10, now=2.0)
    auditor.record(AuditEvent(Kind.QUERY, actor="someone", target="/dicomweb/studies"))

    with engine.connect() as conn:
        ids = conn.execute(select(instances.c.path, instances.c.id)).all()
    assert dict(ids)["later.dcm"] == last + 1
    assert rows(engine)[-1]["actor"] == "someone"
    with engine.connect() as conn:
        assert conn.execute(select(audit.c.id).order_by(audit.c.id.desc())).first() == (last + 1,)


def test_migrating_from_0009_keeps_rows_and_takes_big_instances(bare_engine: Engine) -> None:
    alembic(bare_engine, command.upgrade, "0009")
    largest = 2**31 - 1  # what a 32-bit column could hold
    with bare_engine.begin() as conn:
        study_id = conn.execute(
            insert(studies)
            .values(
                study_instance_uid=HEADER.study_instance_uid,
                calling_ae="OLD",
                state="RECEIVING",
                first_received_at=1.0,
                last_received_at=1.0,
            )
            .returning(studies.c.id)
        ).scalar_one()
        series_id = conn.execute(
            insert(series)
            .values(
                study_id=study_id,
                series_instance_uid=HEADER.series_instance_uid,
                series_number=largest,
                first_received_at=1.0,
            )
            .returning(series.c.id)
        ).scalar_one()
        conn.execute(
            insert(instances).values(
                sop_instance_uid="1.2.3.4",
                sop_class_uid=HEADER.sop_class_uid,
                series_id=series_id,
                study_id=study_id,
                instance_number=largest,
                transfer_syntax_uid=HEADER.transfer_syntax_uid,
                path="old.dcm",
                size_bytes=largest,
                calling_ae="OLD",
                received_at=1.0,
                duplicates=2,
                kind=SOURCE,
            )
        )

    db.migrate(bare_engine)

    with bare_engine.connect() as conn:
        old = conn.execute(
            select(
                instances.c.sop_instance_uid,
                instances.c.size_bytes,
                instances.c.instance_number,
                instances.c.duplicates,
                series.c.series_number,
            ).join(series, series.c.id == instances.c.series_id)
        ).one()
    assert tuple(old) == ("1.2.3.4", largest, largest, 2, largest)

    big = replace(HEADER, instance_number=BIG_NUMBER)
    with closing(InstanceRecorder(bare_engine)) as rec:
        assert rec.record(big, "OLD", "big.dcm", BIG, now=2.0)
    assert index.totals(bare_engine)["bytes"] == largest + BIG

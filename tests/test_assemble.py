"""Study assembly with an injected clock on a real database."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import Engine

from pacs_ai.dicom.header import read_header
from pacs_ai.pipeline.assemble import Assembler, StudyCompleted, due, lull_after, lulled
from pacs_ai.storage import index
from pacs_ai.storage.db import open_database
from pacs_ai.storage.index import QuietStudy
from pacs_ai.storage.recorder import InstanceRecorder
from tests.databases import index_database
from tests.realdata import real_file

HEADER = read_header(real_file("CT_small.dcm").read_bytes())


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    with index_database(tmp_path / "i.sqlite3") as url:
        engine = open_database(url)
        yield engine
        engine.dispose()


def instance(n: int, series: str = "1.2.3.1") -> object:
    return replace(HEADER, sop_instance_uid=f"1.2.3.1.{n}", series_instance_uid=series)


def test_due_is_pure_and_inclusive() -> None:
    studies = [QuietStudy(1, 70.0), QuietStudy(2, 71.0), QuietStudy(3, 100.0)]
    assert [d.study_id for d in due(studies, now=100.0, quiet_period_s=30)] == [1]
    assert [d.study_id for d in due(studies, now=101.0, quiet_period_s=30)] == [1, 2]
    assert due([], now=0, quiet_period_s=1) == []


def test_completes_after_quiet_period_once_with_counts(engine: Engine) -> None:
    clock = Clock()
    heard: list[StudyCompleted] = []
    rec = InstanceRecorder(engine)
    for n in range(3):
        rec.record(instance(n), "CT1", f"{n}.dcm", 1, clock())
    rec.record(instance(9, series="1.2.3.2"), "CT1", "9.dcm", 1, clock())
    assembler = Assembler(engine, quiet_period_s=30, listeners=[heard.append], clock=clock)

    clock.now += 29.9
    assert assembler.poll() == [] and heard == []
    clock.now += 0.2
    (done,) = assembler.poll()
    assert (done.series_count, done.instance_count, done.calling_ae, done.completions) == (
        2,
        4,
        "CT1",
        1,
    )
    assert heard == [done]
    assert assembler.poll() == []  # already COMPLETE: nothing more to say


def test_late_instance_reopens_and_completes_again(engine: Engine) -> None:
    clock = Clock()
    heard: list[StudyCompleted] = []
    rec = InstanceRecorder(engine)
    rec.record(instance(1), "CT1", "1.dcm", 1, clock())
    assembler = Assembler(engine, 5, [heard.append], clock)
    clock.now += 6
    assembler.poll()
    clock.now += 100
    rec.record(instance(2), "CT1", "2.dcm", 1, clock())  # after completion: must not be dropped
    (study,) = index.list_studies(engine)
    assert study.state == "RECEIVING" and study.reopened == 1
    clock.now += 6
    (again,) = assembler.poll()
    assert again.instance_count == 2 and again.completions == 2
    assert [h.completions for h in heard] == [1, 2]


def test_a_failing_listener_does_not_stop_the_others(engine: Engine) -> None:
    clock = Clock()
    rec = InstanceRecorder(engine)
    rec.record(instance(1), "CT1", "1.dcm", 1, clock())
    rec.record(
        replace(HEADER, sop_instance_uid="1.9.9", study_instance_uid="1.9"), "CT1", "x", 1, clock()
    )
    heard: list[str] = []

    def broken(event: StudyCompleted) -> None:
        raise RuntimeError("listener bug")

    assembler = Assembler(engine, 1, [broken, lambda e: heard.append(e.study_instance_uid)], clock)
    clock.now += 2
    assert len(assembler.poll()) == 2
    assert sorted(heard) == sorted([HEADER.study_instance_uid, "1.9"])


def test_two_nodes_sharing_a_database_complete_a_study_once(engine: Engine) -> None:
    clock = Clock()
    InstanceRecorder(engine).record(instance(1), "CT1", "1.dcm", 1, clock())
    other_engine = open_database(
        engine.url.render_as_string(hide_password=False), run_migrations=False
    )
    heard: list[StudyCompleted] = []
    first = Assembler(engine, 1, [heard.append], clock)
    second = Assembler(other_engine, 1, [heard.append], clock)
    clock.now += 2
    # Both see the study due; the guarded UPDATE lets exactly one of them complete it.
    due_first = due(index.receiving_studies(engine), clock(), 1)
    due_second = due(index.receiving_studies(other_engine), clock(), 1)
    assert len(due_first) == len(due_second) == 1
    results = [first.poll(), second.poll()]
    assert sorted(len(r) for r in results) == [0, 1]
    assert len(heard) == 1
    other_engine.dispose()


def test_lulled_is_pure_and_stops_where_due_begins() -> None:
    assert lull_after(30) == 2.0 and lull_after(2) == 0.5  # a quarter, at most 2 s
    studies = [QuietStudy(1, 69.0), QuietStudy(2, 70.5), QuietStudy(3, 98.0), QuietStudy(4, 98.5)]
    assert [s.id for s in lulled(studies, now=100.0, quiet_period_s=30)] == [2, 3]
    assert [d.study_id for d in due(studies, now=100.0, quiet_period_s=30)] == [1]


def test_lull_listeners_hear_of_each_lull_once(engine: Engine) -> None:
    clock = Clock()
    rec = InstanceRecorder(engine)
    rec.record(instance(1), "CT1", "1.dcm", 1, clock())
    (study,) = index.list_studies(engine)
    lulls: list[int] = []
    completed: list[StudyCompleted] = []
    assembler = Assembler(engine, 8, [completed.append], clock)
    assembler.add_lull_listener(lulls.append)

    clock.now += 1.9
    assembler.poll()
    assert lulls == []  # still sending, as far as anyone can tell
    clock.now += 0.2
    assembler.poll()
    clock.now += 1
    assembler.poll()
    assert lulls == [study.id]  # once, however many passes the lull lasts

    rec.record(instance(2), "CT1", "2.dcm", 1, clock())  # the sender had not finished
    clock.now += 2.1
    assembler.poll()
    assert lulls == [study.id, study.id]
    clock.now += 6
    assert len(assembler.poll()) == 1 and len(completed) == 1
    assert lulls == [study.id, study.id]  # complete: no lull to tell of


def test_a_failing_lull_listener_does_not_stop_completion(engine: Engine) -> None:
    clock = Clock()
    InstanceRecorder(engine).record(instance(1), "CT1", "1.dcm", 1, clock())
    completed: list[StudyCompleted] = []
    assembler = Assembler(engine, 4, [completed.append], clock)

    calls: list[int] = []

    def broken(study_id: int) -> None:
        calls.append(study_id)
        raise RuntimeError("broker down")

    assembler.add_lull_listener(broken)
    clock.now += 1.5
    assert assembler.poll() == [] and len(calls) == 1
    clock.now += 3
    assert len(assembler.poll()) == 1 and len(completed) == 1
    assert len(calls) == 1  # not told again: the failed guess is not retried

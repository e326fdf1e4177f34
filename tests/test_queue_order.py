"""The Celery settings that long GPU jobs rely on, and the priority queues that let a STAT
study jump ahead of the ROUTINE ones already waiting.

The first test reads the app :func:`pacs_ai.pipeline.queues.create_app` builds from real
settings. The second runs it: jobs planned over real studies in the index, enqueued on a
real Redis by the node's dispatcher, and taken by a real ``pacs-ai worker``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, Row

from pacs_ai.config import load_settings
from pacs_ai.errors import ConfigError
from pacs_ai.pipeline import jobs
from pacs_ai.pipeline.dispatch import Dispatcher
from pacs_ai.pipeline.queues import (
    INFER_TASK,
    PREPARE_TASK,
    PRIORITY_STEPS,
    SEND_TASK,
    create_app,
    send_item,
)
from pacs_ai.pipeline.route import DEFAULT_RULES, Priority
from pacs_ai.processes import stop_process
from tests.databases import node_database
from tests.peers import RedisServer, kill_tree, wait_for, without_node_settings
from tests.records import node_on_disk, plan_jobs, store_chest_ct

ROOT = Path(__file__).resolve().parent.parent

# Not a default, nor a round number: only a value read from the settings can match it.
TIME_LIMIT_S = 1234.5


@pytest.fixture(autouse=True)
def _no_env_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The test run's own PACS_AI_* settings (a broker URL, say) must not leak into these.
    for key in list(os.environ):
        if key.startswith("PACS_AI_") and key != "PACS_AI_TEST":
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # no stray ./pacs-ai.toml


def test_the_app_is_configured_for_long_jobs_and_priorities(tmp_path: Path) -> None:
    config = tmp_path / "pacs-ai.toml"
    config.write_text(
        f'[node]\ndata_dir = "{tmp_path / "data"}"\n'
        f"[worker]\ntask_time_limit_s = {TIME_LIMIT_S}\n"
        '[broker]\nurl = "redis://127.0.0.1:9/3"\n'
    )
    settings = load_settings(config)
    assert settings.worker.task_time_limit_s == TIME_LIMIT_S

    app = create_app(settings)
    try:
        conf = app.conf
        visibility_s = conf.broker_transport_options["visibility_timeout"]
        assert conf.broker_url == settings.broker.url
        # A job is acknowledged when it ends, and goes back on the queue if its worker dies;
        # a worker holds no more than the job it runs, so the others wait on the broker,
        # where a later STAT job can still pass them.
        assert conf.task_acks_late is True
        assert conf.task_reject_on_worker_lost is True
        assert conf.worker_prefetch_multiplier == 1
        # The time limits are the configured one; the soft one lets a job end cleanly first.
        assert conf.task_time_limit == settings.worker.task_time_limit_s
        assert 0 < conf.task_soft_time_limit < conf.task_time_limit
        options = conf.broker_transport_options
        # Redis hands an unacknowledged message to another worker after this: never while
        # the job may still be running.
        assert options["visibility_timeout"] > conf.task_time_limit
        assert options["priority_steps"] == list(PRIORITY_STEPS)
        assert options["queue_order_strategy"] == "priority"
        # Each priority the rules give a job lands on a step of its own, STAT's served first.
        steps = {p: p.celery_priority for p in Priority}
        assert set(steps.values()) <= set(options["priority_steps"])
        assert steps[Priority.STAT] < steps[Priority.HIGH] < steps[Priority.ROUTINE]
        # CUDA cannot be initialised in a forked child of a process that touched it.
        assert conf.worker_pool_start_method == "spawn"
        # Where Celery's router sends each task (what send_task uses without a queue).
        router = app.amqp.router
        routed = {
            task: router.route({}, task, (1,), {})["queue"].name
            for task in (INFER_TASK, PREPARE_TASK, SEND_TASK)
        }
        assert routed == {INFER_TASK: "infer", PREPARE_TASK: "infer", SEND_TASK: "send"}
    finally:
        app.close()

    # An explicit broker URL (the node's own Redis) wins over the configured one.
    other = create_app(settings, "redis://127.0.0.1:9/5")
    try:
        assert other.conf.broker_url == "redis://127.0.0.1:9/5"
    finally:
        other.close()

    # Another limit changes every value derived from it.
    shorter = settings.model_copy(
        update={"worker": settings.worker.model_copy(update={"task_time_limit_s": 42.0})}
    )
    app = create_app(shorter)
    try:
        assert app.conf.task_time_limit == 42.0
        assert app.conf.task_soft_time_limit < 42.0
        assert 42.0 < app.conf.broker_transport_options["visibility_timeout"] < visibility_s
    finally:
        app.close()

    # No broker anywhere: refused with the key to set, not a worker that never connects.
    unset = settings.model_copy(update={"broker": settings.broker.model_copy(update={"url": ""})})
    with pytest.raises(ConfigError) as refused:
        create_app(unset)
    assert [key for key, _ in refused.value.problems] == ["broker.url"]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(workdir=tmp_path / "redis").start()
    yield server
    server.stop()


ROUTINE_STUDIES = 3


@pytest.mark.slow
def test_a_stat_job_enqueued_last_runs_before_the_routine_jobs_waiting(
    tmp_path: Path, broker: RedisServer
) -> None:
    """Three ROUTINE studies wait on the infer queue; a STAT study arrives after them. A worker
    that starts only then (one process, one message at a time) runs the STAT job first and
    the ROUTINE ones after it, in the order they came. Nothing here depends on timing: every
    message is on the broker before the worker exists, so the broker alone decides."""
    stat_rules = (DEFAULT_RULES[0].model_copy(update={"priority": Priority.STAT}),)
    with node_database() as database_url:
        (tmp_path / "node").mkdir()
        settings, ingest = node_on_disk(tmp_path / "node", database_url)
        try:
            engine = ingest.engine
            app = create_app(settings, broker.url)
            try:
                dispatcher = Dispatcher(settings, engine, lambda *m: send_item(app, *m))
                routine: list[int] = []
                for seed in range(ROUTINE_STUDIES):
                    truth = store_chest_ct(ingest, tmp_path / f"ct{seed}", seed=seed)
                    (job_id,) = plan_jobs(engine, truth.study_instance_uid)
                    dispatcher.enqueue_job(job_id, Priority.ROUTINE)
                    routine.append(job_id)
                truth = store_chest_ct(ingest, tmp_path / "stat", seed=ROUTINE_STUDIES)
                (stat,) = plan_jobs(engine, truth.study_instance_uid, rules=stat_rules)
                row = jobs.job_row(engine, stat)
                assert row is not None and row.priority == Priority.STAT.value
                dispatcher.enqueue_job(stat, Priority(row.priority))
            finally:
                app.close()
            waiting = broker.queued()
            assert sorted(item for _, item, _, _ in waiting) == sorted([*routine, stat])
            assert {queue for _, _, queue, _ in waiting} == {"infer"}

            worker, log = _start_worker(tmp_path, broker.url)
            everyone = [*routine, stat]
            try:
                wait_for(
                    lambda: worker.poll() is not None or _all_done(engine, everyone),
                    90,
                    "every job run",
                    interval=0.5,
                )
                assert worker.poll() is None, log.read_text()
            finally:
                stop_process(worker, 20, kill=lambda p: kill_tree(p.pid))
            rows = {job_id: jobs.job_row(engine, job_id) for job_id in everyone}
            assert {r.state for r in rows.values() if r is not None} == {"ENCODED"}, log.read_text()
            started = sorted(everyone, key=lambda j: _started_at(rows[j]))
            assert started == [stat, *routine], (
                f"claimed in order {started}; STAT job {stat}, ROUTINE jobs {routine}"
            )
            # Nothing left for inference; the results' deliveries wait for a send worker.
            assert {queue for _, _, queue, _ in broker.queued()} <= {"send"}
        finally:
            ingest.close()


def _start_worker(tmp_path: Path, broker_url: str) -> tuple[subprocess.Popen[bytes], Path]:
    """``pacs-ai worker`` on the node's machine: the same configuration file (data dir and
    database), the infer queue only, one process."""
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "pacs_ai", "worker", "--config", str(tmp_path / "node" /
             "pacs-ai.toml"), "--queues", "infer", "--concurrency", "1", "--device", "cpu"],
            cwd=ROOT,
            env=without_node_settings(PACS_AI_BROKER__URL=broker_url),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    return worker, log


def _all_done(engine: Engine, job_ids: list[int]) -> bool:
    rows = [jobs.job_row(engine, job_id) for job_id in job_ids]
    return all(r is not None and r.state not in ("QUEUED", "RUNNING") for r in rows)


def _started_at(row: Row[Any] | None) -> float:
    # Set by the claim, from the worker's clock: one process, so one job after another.
    assert row is not None and isinstance(row.started_at, float), row
    return float(row.started_at)

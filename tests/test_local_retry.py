"""A job that fails on a worker of the node's own machine goes back on the queue at its
rule's priority.

The worker is the real one: a separate process builds ``workers.tasks.context()`` from the
node's configuration and a real Redis broker, claims the job and records a failed attempt,
as ``run_job`` does when a model raises. The test reads the message off Redis.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pacs_ai.pipeline import jobs
from pacs_ai.pipeline.queues import INFER_TASK
from pacs_ai.pipeline.route import DEFAULT_RULES, Priority
from tests.peers import RedisServer
from tests.records import plan_jobs, store_chest_ct
from tests.web import web_client

ROOT = Path(__file__).resolve().parent.parent

# What workers.tasks.infer does when the model raises, cut down to the link's calls.
FAIL_ONCE = """
import sys
from workers.tasks import context
ctx = context()
job = ctx.link.claim(int(sys.argv[1]))
assert job is not None, "job not claimable"
print(ctx.link.fail(job, "RuntimeError: CUDA out of memory"))
"""


def test_a_failed_stat_job_is_queued_again_as_stat(tmp_path: Path) -> None:
    stat_rules = (DEFAULT_RULES[0].model_copy(update={"priority": Priority.STAT}),)
    broker = RedisServer().start()
    try:
        with web_client(tmp_path) as (_, ctx):
            truth = store_chest_ct(ctx.ingest, tmp_path / "ct", slices=24)
            (job_id,) = plan_jobs(ctx.engine, truth.study_instance_uid, rules=stat_rules)
            env = {
                **os.environ,
                "PACS_AI_CONFIG": str(tmp_path / "pacs-ai.toml"),
                "PACS_AI_BROKER__URL": broker.url,
            }
            done = subprocess.run(
                [sys.executable, "-c", FAIL_ONCE, str(job_id)],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode == 0, done.stderr
            assert done.stdout.split()[-1] == "QUEUED"
            row = jobs.job_row(ctx.engine, job_id)
            assert row is not None and (row.state, row.attempts) == ("QUEUED", 1)
            assert row.reason == "RuntimeError: CUDA out of memory"
    finally:
        queued = broker.queued()
        broker.stop()
    # On Redis at STAT's priority (0, served first), not ROUTINE's nor the default 5.
    assert queued == [(INFER_TASK, job_id, "infer", Priority.STAT.celery_priority)]
    assert Priority.STAT.celery_priority not in (Priority.ROUTINE.celery_priority, 5)

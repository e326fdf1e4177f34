"""A job that fails on a worker of the node's own machine goes back on the queue at its
rule's priority.

The worker is the real one: a separate process builds ``workers.tasks.context()`` from the
node's configuration and a real Redis broker, and runs the job, which fails. The test reads
the message it put back off Redis.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pacs_ai.pipeline import jobs
from pacs_ai.pipeline.queues import INFER_TASK
from pacs_ai.pipeline.route import DEFAULT_RULES, Priority
from tests.peers import RedisServer, without_node_settings
from tests.records import plan_jobs, store_chest_ct
from tests.web import web_client

ROOT = Path(__file__).resolve().parent.parent

# What the infer task runs, without Celery around it.
RUN_JOB = """
import sys
from pacs_ai.pipeline.infer import run_job
from workers.tasks import context
print(run_job(context(), int(sys.argv[1])))
"""


def test_a_failed_stat_job_is_queued_again_as_stat(tmp_path: Path) -> None:
    stat_rules = (DEFAULT_RULES[0].model_copy(update={"priority": Priority.STAT}),)
    broker = RedisServer().start()
    try:
        with web_client(tmp_path) as (_, ctx):
            truth = store_chest_ct(ctx.ingest, tmp_path / "ct", slices=24)
            (job_id,) = plan_jobs(ctx.engine, truth.study_instance_uid, rules=stat_rules)
            # A failure worth another attempt: the series' files are gone (a disk unmounted
            # under the worker, say), so reading the volume raises FileNotFoundError.
            for path in (tmp_path / "data" / "studies").rglob("*.dcm"):
                path.unlink()
            env = without_node_settings(
                PACS_AI_CONFIG=str(tmp_path / "pacs-ai.toml"), PACS_AI_BROKER__URL=broker.url
            )
            done = subprocess.run(
                [sys.executable, "-c", RUN_JOB, str(job_id)],
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
            assert row.reason.startswith("FileNotFoundError"), row.reason
    finally:
        queued = broker.queued()
        broker.stop()
    # On Redis at STAT's priority (0, served first), not ROUTINE's nor the default 5.
    assert queued == [(INFER_TASK, job_id, "infer", Priority.STAT.celery_priority)]
    assert Priority.STAT.celery_priority not in (Priority.ROUTINE.celery_priority, 5)

"""The job and delivery state machines on a real database (SQLite and PostgreSQL)."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from sqlalchemy import Engine

from pacs_ai.config import PeerSettings, load_settings
from pacs_ai.dicom.header import read_header
from pacs_ai.pipeline import jobs
from pacs_ai.pipeline.deliver import run_delivery
from pacs_ai.pipeline.facts import series_facts
from pacs_ai.pipeline.infer import ModelCache, WorkerContext
from pacs_ai.pipeline.route import DEFAULT_RULES, Priority, RuleSettings, evaluate
from pacs_ai.storage import index
from pacs_ai.storage.recorder import InstanceRecorder
from tests.ports import free_port
from tests.realdata import real_file

HEADER = read_header(real_file("CT_small.dcm").read_bytes())
PACS = PeerSettings(name="pacs", ae_title="PACS", host="127.0.0.1", port=104, receive=True)
MODALITY = PeerSettings(name="ct", ae_title="CT1", host="127.0.0.1", port=104, receive=False)


def study_with_series(engine: Engine, calling_ae: str = "PACS", slices: int = 25) -> int:
    rec = InstanceRecorder(engine)
    for n in range(slices):
        rec.record(
            replace(HEADER, sop_instance_uid=f"1.2.3.{n}", series_instance_uid="1.2.3"),
            calling_ae,
            f"{n}.dcm",
            1,
            1.0,
        )
    rec.record(
        replace(
            HEADER,
            sop_instance_uid="1.2.4.1",
            series_instance_uid="1.2.4",
            image_type="ORIGINAL\\PRIMARY\\LOCALIZER",
        ),
        calling_ae,
        "s.dcm",
        1,
        1.0,
    )
    (study,) = index.list_studies(engine)
    return study.id


def make_jobs(
    engine: Engine, rules: tuple[RuleSettings, ...] = DEFAULT_RULES, calling_ae: str = "PACS"
) -> list[int]:
    study_id = study_with_series(engine, calling_ae)
    facts = series_facts(engine, study_id)
    specs, forwards = jobs.plan(
        evaluate(rules, facts), facts, rules, study_id, calling_ae, 1, [PACS, MODALITY]
    )
    created, _ = jobs.create(engine, specs, forwards, max_attempts=2, delivery_attempts=2, now=10.0)
    return [job_id for job_id, _ in created]


def test_plan_runs_the_default_rule_on_the_axial_series_only(engine: Engine) -> None:
    study_id = study_with_series(engine)
    facts = series_facts(engine, study_id)
    specs, forwards = jobs.plan(
        evaluate(DEFAULT_RULES, facts), facts, DEFAULT_RULES, study_id, "PACS", 1, [PACS]
    )
    assert [(s.model, s.destinations) for s in specs] == [("ct-organs-threshold", ("pacs",))]
    assert forwards == []
    # Planned twice (a node restarted mid-way): nothing is created twice.
    first, _ = jobs.create(engine, specs, forwards, 3, 3, now=1.0)
    again, _ = jobs.create(engine, specs, forwards, 3, 3, now=2.0)
    assert len(first) == 1 and again == []


def test_results_go_back_only_to_a_sender_that_may_receive(engine: Engine) -> None:
    (job_id,) = make_jobs(engine, calling_ae="CT1")
    claimed = jobs.claim(engine, job_id, "w1", 60, now=11.0)
    assert claimed is not None and claimed.destinations == ()


def test_forwards_become_deliveries(engine: Engine) -> None:
    rule = RuleSettings(name="fwd", forward=("pacs",), forward_level="study")
    study_id = study_with_series(engine)
    facts = series_facts(engine, study_id)
    specs, forwards = jobs.plan(
        evaluate((rule,), facts), facts, (rule,), study_id, "PACS", 1, [PACS]
    )
    assert specs == [] and [(f.peer, f.kind) for f in forwards] == [("pacs", "STUDY")]
    _, deliveries = jobs.create(engine, specs, forwards, 3, 3, now=1.0)
    assert len(deliveries) == 1


def test_only_one_worker_claims_a_job(engine: Engine) -> None:
    (job_id,) = make_jobs(engine)
    assert jobs.claim(engine, job_id, "w1", lease_s=60, now=11.0) is not None
    assert jobs.claim(engine, job_id, "w2", lease_s=60, now=12.0) is None
    # The first worker died: once its lease runs out the job can be taken again.
    redo = jobs.reconcile(engine, now=100.0, requeue_after_s=600)
    assert [j for j, _ in redo.jobs] == [job_id]
    second = jobs.claim(engine, job_id, "w2", lease_s=60, now=100.0)
    assert second is not None and second.attempt == 2


def test_failed_attempts_requeue_then_fail_with_reason(engine: Engine) -> None:
    (job_id,) = make_jobs(engine)
    jobs.claim(engine, job_id, "w", 60, now=11.0)
    assert jobs.fail_attempt(engine, job_id, "RuntimeError: boom", now=12.0) == "QUEUED"
    jobs.claim(engine, job_id, "w", 60, now=13.0)
    assert jobs.fail_attempt(engine, job_id, "RuntimeError: boom again", now=14.0) == "FAILED"
    (row,) = jobs.job_rows(engine)
    assert (row.state, row.attempts, row.reason) == ("FAILED", 2, "RuntimeError: boom again")
    assert jobs.claim(engine, job_id, "w", 60, now=15.0) is None
    assert jobs.retry(engine, job_id, now=16.0)
    (row,) = jobs.job_rows(engine)
    assert (row.state, row.attempts) == ("QUEUED", 0)


def test_encoded_job_is_delivered_when_every_delivery_is_done(engine: Engine) -> None:
    (job_id,) = make_jobs(engine)
    job = jobs.claim(engine, job_id, "w", 60, now=11.0)
    assert job is not None
    outputs = [
        jobs.Output("SEG", "results/1/SEG.dcm", "2.25.1"),
        jobs.Output("SR", "results/1/SR.dcm", "2.25.2"),
    ]
    ids = jobs.encoded(
        engine,
        job_id,
        outputs,
        job.destinations,
        {"inference": 1.0},
        "{}",
        job.study_id,
        3,
        now=12.0,
    )
    assert len(ids) == 2
    for n, delivery_id in enumerate(ids):
        claimed = jobs.claim_delivery(engine, delivery_id, now=13.0)
        assert claimed is not None
        assert jobs.claim_delivery(engine, delivery_id, now=13.0) is None  # one sender only
        jobs.delivered(engine, claimed, now=14.0)
        (row,) = jobs.job_rows(engine)
        assert row.state == ("ENCODED" if n == 0 else "DELIVERED")


def test_delivery_backs_off_then_fails_visibly_and_can_be_retried(engine: Engine) -> None:
    (job_id,) = make_jobs(engine)
    job = jobs.claim(engine, job_id, "w", 60, now=11.0)
    assert job is not None
    (delivery_id,) = jobs.encoded(
        engine,
        job_id,
        [jobs.Output("SR", "r/SR.dcm", "2.25.9")],
        job.destinations,
        {},
        "{}",
        job.study_id,
        2,
        now=12.0,
    )
    claimed = jobs.claim_delivery(engine, delivery_id, now=20.0)
    assert claimed is not None
    assert jobs.delivery_failed(engine, claimed, "peer down", now=20.0, backoff_s=5) == 5
    # Not due before its backoff has passed.
    assert delivery_id not in jobs.reconcile(engine, now=24.0, requeue_after_s=600).deliveries
    assert delivery_id in jobs.reconcile(engine, now=25.0, requeue_after_s=600).deliveries
    claimed = jobs.claim_delivery(engine, delivery_id, now=25.0)
    assert claimed is not None
    assert jobs.delivery_failed(engine, claimed, "peer still down", now=25.0, backoff_s=5) is None
    (row,) = jobs.delivery_rows(engine)
    assert (row.state, row.last_error, row.attempts) == ("FAILED", "peer still down", 2)
    assert jobs.retry_delivery(engine, delivery_id, now=30.0)
    assert delivery_id in jobs.reconcile(engine, now=30.0, requeue_after_s=600).deliveries


def test_a_failing_delivery_backs_off_doubling_until_its_last_attempt(
    engine: Engine, tmp_path: Path
) -> None:
    """The whole retry schedule, through the worker's own send path to a real peer that is
    down (a loopback port nothing listens on): each retry waits backoff_s * 2 ** (n - 1)
    after attempt n, at most [delivery] backoff_max_s, and after [delivery] max_attempts the
    delivery is FAILED with the attempt count and the reason, and never tried again."""
    backoff_s, backoff_max_s, attempts = 3.0, 20.0, 6
    config = tmp_path / "pacs-ai.toml"
    config.write_text(
        f'[node]\ndata_dir = "{tmp_path / "data"}"\n'
        f"[delivery]\nmax_attempts = {attempts}\nbackoff_s = {backoff_s}\ntimeout_s = 5\n"
        f"backoff_max_s = {backoff_max_s}\n"
        f'[[peers]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\n'
        f"port = {free_port()}\n"
    )
    settings = load_settings(config)
    clock = [1000.0]
    ctx = WorkerContext(
        settings, engine, ModelCache("cpu"), lambda _: None, lambda *_: None, lambda: clock[0]
    )
    # A real result file, so that each attempt fails at the association, not at reading it.
    result = settings.node.data_dir / "results" / "1" / "SR.dcm"
    result.parent.mkdir(parents=True)
    shutil.copy(real_file("test-SR.dcm"), result)
    (job_id,) = make_jobs(engine)
    job = jobs.claim(engine, job_id, "w", 60, now=11.0)
    assert job is not None and job.destinations == ("pacs",)
    (delivery_id,) = jobs.encoded(
        engine,
        job_id,
        [jobs.Output("SR", "results/1/SR.dcm", "2.25.9")],
        job.destinations,
        {},
        "{}",
        job.study_id,
        settings.delivery.max_attempts,
        now=12.0,
    )

    delays: list[float] = []
    for attempt in range(1, attempts + 1):
        assert delivery_id in jobs.reconcile(engine, clock[0], requeue_after_s=600).deliveries
        outcome = run_delivery(ctx, delivery_id)
        row = jobs.delivery_row(engine, delivery_id)
        assert row is not None and row.attempts == attempt
        assert "no association with PACS@127.0.0.1" in row.last_error
        if attempt == attempts:
            break
        assert (outcome, row.state) == ("PENDING", "PENDING")
        delay = row.next_attempt_at - clock[0]
        delays.append(delay)
        # Not due a moment before its backoff has passed.
        early = clock[0] + delay - 0.01
        assert delivery_id not in jobs.reconcile(engine, early, requeue_after_s=600).deliveries
        clock[0] += delay
    assert delays == [min(backoff_s * 2 ** (n - 1), backoff_max_s) for n in range(1, attempts)]
    assert delays == [3.0, 6.0, 12.0, 20.0, 20.0]  # the same, spelled out: doubling to the cap

    # The last attempt: FAILED, with its count and reason kept, no next attempt.
    assert outcome == "FAILED"
    row = jobs.delivery_row(engine, delivery_id)
    assert row is not None
    assert (row.state, row.attempts, row.next_attempt_at) == ("FAILED", attempts, None)
    assert row.last_error.startswith("no association with PACS@127.0.0.1")
    (job_row,) = jobs.job_rows(engine)
    assert job_row.state == "ENCODED"  # never DELIVERED while its one delivery failed
    # Never tried again: not due however long one waits, and a stray message claims nothing.
    far = clock[0] + 10 * 365 * 86400
    assert delivery_id not in jobs.reconcile(engine, far, requeue_after_s=600).deliveries
    clock[0] = far
    assert run_delivery(ctx, delivery_id) == "NOT_CLAIMED"
    after = jobs.delivery_row(engine, delivery_id)
    assert after is not None and (after.state, after.attempts, after.last_error) == (
        "FAILED",
        attempts,
        row.last_error,
    )


def test_lost_queue_messages_are_sent_again(engine: Engine) -> None:
    (job_id,) = make_jobs(engine)
    assert [j for j, _ in jobs.reconcile(engine, now=11.0, requeue_after_s=60).jobs] == [job_id]
    jobs.mark_enqueued(engine, [job_id], now=11.0)
    assert jobs.reconcile(engine, now=30.0, requeue_after_s=60).jobs == []
    # Redis lost its data: the job is still QUEUED long after it was enqueued.
    assert jobs.reconcile(engine, now=80.0, requeue_after_s=60).jobs == [(job_id, Priority.ROUTINE)]


def test_cancel_stops_a_job(engine: Engine) -> None:
    (job_id,) = make_jobs(engine)
    assert jobs.cancel(engine, job_id, now=11.0)
    assert jobs.claim(engine, job_id, "w", 60, now=12.0) is None
    assert not jobs.cancel(engine, job_id, now=13.0)


def test_our_own_results_are_never_routed_again(engine: Engine, tmp_path: Path) -> None:
    from pacs_ai.config import load_settings
    from pacs_ai.pipeline.assemble import Assembler
    from pacs_ai.pipeline.dispatch import Dispatcher

    config = tmp_path / "pacs-ai.toml"
    config.write_text(
        '[[peers]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\n'
        '[[rules]]\nname = "everything"\nforward = ["pacs"]\n'  # no conditions: matches all
    )
    sent: list[tuple[str, int]] = []
    dispatcher = Dispatcher(
        load_settings(config), engine, lambda t, i, q, p: sent.append((t, i)), clock=lambda: 100.0
    )
    rec = InstanceRecorder(engine)
    # A PACS sends back a study holding a CT series and our own SEG of it.
    rec.record(
        replace(HEADER, sop_instance_uid="1.9.1", series_instance_uid="1.9"),
        "PACS",
        "a.dcm",
        1,
        1.0,
    )
    rec.record(
        replace(
            HEADER,
            sop_instance_uid="1.9.2",
            series_instance_uid="1.8",
            modality="SEG",
            manufacturer="pacs-ai",
        ),
        "PACS",
        "b.dcm",
        1,
        1.0,
    )
    Assembler(engine, 1, [dispatcher.on_study_complete], clock=lambda: 100.0).poll()
    forwarded = {r.payload for r in jobs.delivery_rows(engine)}
    assert forwarded == {"1.9"}  # the CT series; the SEG is ours and stays put
    assert [task for task, _ in sent] == ["pacs_ai.send"]


def test_a_completion_the_node_never_planned_is_planned_by_the_reconciler(
    engine: Engine, tmp_path: Path
) -> None:
    from pacs_ai.config import load_settings
    from pacs_ai.pipeline.assemble import Assembler
    from pacs_ai.pipeline.dispatch import PLANNING_GRACE_S, Dispatcher

    config = tmp_path / "pacs-ai.toml"
    config.write_text('[[peers]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\n')
    now = [100.0]
    sent: list[tuple[str, int]] = []
    dispatcher = Dispatcher(
        load_settings(config), engine, lambda t, i, q, p: sent.append((t, i)), clock=lambda: now[0]
    )
    study_id = study_with_series(engine)
    # The node completes the study and dies before its listener plans it.
    (done,) = Assembler(engine, 1, [], clock=lambda: now[0]).poll()
    assert done.study_id == study_id and jobs.job_rows(engine) == []

    # A fresh completion may still be being planned: left alone.
    dispatcher.reconcile()
    assert jobs.job_rows(engine) == []

    now[0] += PLANNING_GRACE_S + 1
    dispatcher.reconcile()
    (job,) = jobs.job_rows(engine)
    assert job.state == "QUEUED" and sent == [("pacs_ai.infer", job.id)]
    # Planned once: the next passes find nothing more to plan.
    now[0] += PLANNING_GRACE_S + 1
    dispatcher.reconcile()
    assert len(jobs.job_rows(engine)) == 1

    # A completion planned by its listener is never planned again by the reconciler.
    assert index.unplanned_completions(engine, now[0] + 1000) == []


def test_a_completion_is_planned_once_even_when_two_try(engine: Engine) -> None:
    study_id = study_with_series(engine)
    rules = (RuleSettings(name="fwd", forward=("pacs",)),)
    facts = series_facts(engine, study_id)
    specs, forwards = jobs.plan(evaluate(rules, facts), facts, rules, study_id, "PACS", 1, [PACS])
    assert forwards
    first = jobs.create(engine, specs, forwards, 2, 2, 10.0, completion=(study_id, 1))
    again = jobs.create(engine, specs, forwards, 2, 2, 11.0, completion=(study_id, 1))
    assert first[1] and again == ([], [])
    # Without the completion guard a forward (no job, no unique key) would be added twice.
    assert len(jobs.delivery_rows(engine)) == len(first[1])


def test_a_job_whose_lease_runs_out_on_every_attempt_fails(engine: Engine) -> None:
    (job_id,) = make_jobs(engine)  # max_attempts = 2
    assert jobs.claim(engine, job_id, "w1", 60, now=100.0) is not None  # worker killed
    again = jobs.claim(engine, job_id, "w2", 60, now=200.0)  # lease ran out: taken back
    assert again is not None and again.attempt == 2  # killed again
    assert jobs.claim(engine, job_id, "w3", 60, now=300.0) is None  # no third attempt
    assert jobs.reconcile(engine, now=300.0, requeue_after_s=60).jobs == []
    row = jobs.job_row(engine, job_id)
    assert row is not None and row.state == "FAILED" and "lease ran out" in row.reason
    assert jobs.retry(engine, job_id, now=301.0)  # the admin can still try again


def test_a_send_cut_off_by_a_kill_is_sent_again(engine: Engine) -> None:
    rules = (RuleSettings(name="fwd", forward=("pacs",)),)
    study_id = study_with_series(engine)
    facts = series_facts(engine, study_id)
    _, forwards = jobs.plan(evaluate(rules, facts), facts, rules, study_id, "PACS", 1, [PACS])
    _, (delivery_id, *_) = jobs.create(engine, [], forwards, 2, 3, 10.0)
    assert jobs.claim_delivery(engine, delivery_id, now=100.0) is not None  # then killed
    redo = jobs.reconcile(engine, now=150.0, requeue_after_s=600, sending_stale_s=60)
    assert delivery_id not in redo.deliveries  # may still be sending
    redo = jobs.reconcile(engine, now=161.0, requeue_after_s=600, sending_stale_s=60)
    assert delivery_id in redo.deliveries
    row = jobs.delivery_row(engine, delivery_id)
    assert row is not None and row.state == "PENDING" and "cut off" in row.last_error
    again = jobs.claim_delivery(engine, delivery_id, now=162.0)
    assert again is not None and again.attempt == 2


def test_a_quiet_study_has_the_series_its_models_will_read_prepared(
    engine: Engine, tmp_path: Path
) -> None:
    """While a study is quiet, each series that a rule runs a model on is sent once for
    preparation, at its most urgent rule's priority; forwards and unmatched series are not.
    Through a real Redis: the message is read back from the list Celery's worker takes it
    from."""
    import base64
    import json

    import redis

    from pacs_ai.config import load_settings
    from pacs_ai.pipeline.dispatch import Dispatcher
    from pacs_ai.pipeline.queues import PRIORITY_SEP, create_app, queue_keys, send_item
    from tests.peers import RedisServer
    from tests.ports import free_port

    config = tmp_path / "pacs-ai.toml"
    config.write_text(
        '[[peers]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\n'
        '[[rules]]\nname = "ct"\nmodels = ["ct-organs-threshold"]\n'
        '[rules.match]\nModality = "CT"\nNumberOfSeriesRelatedInstances = { min = 20 }\n'
        '[[rules]]\nname = "urgent"\nmodels = ["ct-organs-threshold"]\npriority = "STAT"\n'
        '[rules.match]\nModality = "CT"\nNumberOfSeriesRelatedInstances = { min = 20 }\n'
        '[[rules]]\nname = "archive"\nforward = ["pacs"]\n'
    )
    settings = load_settings(config)
    study_id = study_with_series(engine)
    axial = next(f for f in series_facts(engine, study_id) if f.series_instance_uid == "1.2.3")
    server = RedisServer().start()
    app = create_app(settings, server.url)
    try:
        Dispatcher(settings, engine, lambda *m: send_item(app, *m)).on_study_lull(study_id)
        client = redis.Redis.from_url(server.url)
        waiting = {key: client.lrange(key, 0, -1) for key in queue_keys("infer")}
        step = Priority.STAT.celery_priority
        stat_list = "infer" if step == 0 else f"infer{PRIORITY_SEP}{step}"
        assert {k for k, v in waiting.items() if v} == {stat_list}
        (raw,) = waiting[stat_list]
        message = json.loads(raw)
        args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        assert (message["headers"]["task"], args) == ("pacs_ai.prepare", [axial.series_id])
        assert client.llen("send") == 0
        assert jobs.job_rows(engine) == [] and jobs.delivery_rows(engine) == []  # only a guess
    finally:
        app.close()
        server.stop()

    # No broker at all: the guess is dropped, nothing raises into the assembler.
    down = create_app(settings, f"redis://127.0.0.1:{free_port()}/0")
    try:
        Dispatcher(settings, engine, lambda *m: send_item(down, *m)).on_study_lull(study_id)
    finally:
        down.close()


def test_a_restart_sends_again_what_the_last_run_had_enqueued(
    engine: Engine, tmp_path: Path
) -> None:
    """A message enqueued before the node stopped may have died with the worker that held it
    (the broker keeps it unacknowledged for hours). The restarted node's reconciler sends
    every QUEUED job and PENDING delivery again at once, not after the requeue window;
    through a real Redis, read back from the lists Celery's worker takes them from."""
    import threading
    import time

    from pacs_ai.config import load_settings
    from pacs_ai.pipeline.dispatch import Dispatcher
    from pacs_ai.pipeline.queues import create_app, send_item
    from tests.peers import RedisServer, wait_for

    config = tmp_path / "pacs-ai.toml"
    config.write_text(
        "[worker]\nreconcile_interval_s = 0.2\n"
        '[[peers]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\n'
    )
    settings = load_settings(config)
    rules = (*DEFAULT_RULES, RuleSettings(name="fwd", forward=("pacs",)))
    study_id = study_with_series(engine)
    facts = series_facts(engine, study_id)
    specs, forwards = jobs.plan(evaluate(rules, facts), facts, rules, study_id, "PACS", 1, [PACS])
    now = time.time()
    created, (delivery_id,) = jobs.create(engine, specs, forwards[:1], 2, 3, now)
    ((job_id, _),) = created
    # The last run enqueued both; their messages went down with it.
    jobs.mark_enqueued(engine, [job_id], now)
    jobs.mark_delivery_scheduled(engine, delivery_id, now + settings.worker.requeue_after_s)
    redo = jobs.reconcile(engine, now + 1, settings.worker.requeue_after_s)
    assert redo == jobs.Redo([], [])  # left to the requeue window by an ordinary pass

    server = RedisServer().start()
    app = create_app(settings, server.url)
    stop = threading.Event()
    dispatcher = Dispatcher(settings, engine, lambda *m: send_item(app, *m))
    reconciler = threading.Thread(target=dispatcher.run_reconciler, args=(stop,))
    reconciler.start()
    try:
        wait_for(lambda: len(server.queued()) == 2, 10, "both sent again")
        sent = {(task, item, queue) for task, item, queue, _ in server.queued()}
        assert sent == {("pacs_ai.infer", job_id, "infer"), ("pacs_ai.send", delivery_id, "send")}
        time.sleep(1.0)  # five more passes: what was just sent waits out its window again
        assert len(server.queued()) == 2
    finally:
        stop.set()
        reconciler.join()
        app.close()
        server.stop()


def test_a_peer_gets_at_most_per_peer_deliveries_in_flight(engine: Engine) -> None:
    (job_id,) = make_jobs(engine)
    job = jobs.claim(engine, job_id, "w", 60, now=11.0)
    assert job is not None
    outputs = [jobs.Output("SR", f"r/SR{n}.dcm", f"2.25.{n}") for n in (1, 2, 3)]
    jobs.encoded(engine, job_id, outputs, ("a", "b"), {}, "{}", job.study_id, 3, now=12.0)
    by_peer: dict[str, list[int]] = {}
    for row in sorted(jobs.delivery_rows(engine), key=lambda r: r.id):
        by_peer.setdefault(row.peer, []).append(row.id)
    a1, a2, a3 = by_peer["a"]

    first = jobs.claim_delivery(engine, a1, now=20.0, per_peer=2)
    second = jobs.claim_delivery(engine, a2, now=20.0, per_peer=2)
    assert isinstance(first, jobs.ClaimedDelivery) and isinstance(second, jobs.ClaimedDelivery)
    # The third to the same peer waits, uncounted, and is due again at the next pass.
    assert jobs.claim_delivery(engine, a3, now=20.0, per_peer=2) == jobs.PEER_BUSY
    waiting = jobs.delivery_row(engine, a3)
    assert waiting is not None
    assert (waiting.state, waiting.attempts) == ("PENDING", 0)
    assert waiting.next_attempt_at == 20.0 + jobs.PEER_BUSY_RETRY_S
    assert a3 not in jobs.reconcile(engine, now=20.5, requeue_after_s=600).deliveries
    assert a3 in jobs.reconcile(engine, now=21.0, requeue_after_s=600).deliveries
    # Another peer is not held by it.
    for b in by_peer["b"][:2]:
        assert isinstance(
            jobs.claim_delivery(engine, b, now=20.0, per_peer=2), jobs.ClaimedDelivery
        )
    # One done, one slot free; without a limit, nothing is put off.
    jobs.delivered(engine, first, now=21.0)
    assert isinstance(jobs.claim_delivery(engine, a3, now=21.0, per_peer=2), jobs.ClaimedDelivery)
    b3 = by_peer["b"][2]
    assert jobs.claim_delivery(engine, b3, now=21.0, per_peer=2) == jobs.PEER_BUSY
    assert isinstance(jobs.claim_delivery(engine, b3, now=21.0), jobs.ClaimedDelivery)


def test_a_cut_off_attempt_does_not_record_over_the_next_one(engine: Engine) -> None:
    (job_id,) = make_jobs(engine)
    job = jobs.claim(engine, job_id, "w", 60, now=11.0)
    assert job is not None
    (delivery_id,) = jobs.encoded(
        engine, job_id, [jobs.Output("SR", "r/SR.dcm", "2.25.9")], job.destinations, {}, "{}",
        job.study_id, 5, now=12.0,
    )  # fmt: skip
    slow = jobs.claim_delivery(engine, delivery_id, now=20.0)
    assert isinstance(slow, jobs.ClaimedDelivery)
    # Still sending long after: taken for cut off, and claimed again by another sender.
    assert jobs.release_cut_off_sends(engine, now=500.0, stale_after_s=240) == 1
    again = jobs.claim_delivery(engine, delivery_id, now=500.0)
    assert isinstance(again, jobs.ClaimedDelivery) and again.attempt == slow.attempt + 1
    # The first attempt ends late: what it says is not the delivery's state any more.
    jobs.delivered(engine, slow, now=501.0)
    assert jobs.delivery_failed(engine, slow, "late failure", now=501.0, backoff_s=5) == 5
    row = jobs.delivery_row(engine, delivery_id)
    assert row is not None and (row.state, row.attempts) == ("SENDING", 2)
    assert "late failure" not in row.last_error
    jobs.delivered(engine, again, now=502.0)
    row = jobs.delivery_row(engine, delivery_id)
    assert row is not None and row.state == "DONE"

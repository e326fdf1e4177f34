"""``[worker] preload`` / ``pacs-ai worker --preload``: the models a worker loads at start.

A worker on another machine has no rules of its own (they live on the node), so without it
its first job would pay for the model load. Real parts throughout: the built-in models, the
registry, ``pacs-ai worker`` processes, and, for the last test, a node's HTTP service, Redis
and a remote worker that runs a job.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from pacs_ai.config import Settings, load_settings
from pacs_ai.errors import ConfigError
from pacs_ai.models.registry import available, check_preload
from pacs_ai.pipeline import jobs, warmup
from pacs_ai.pipeline.infer import ModelCache
from pacs_ai.pipeline.queues import INFER_TASK
from tests.peers import kill_tree, wait_for, without_node_settings
from tests.test_remote_workers import start_remote_worker
from tests.web import Remote

MODEL = "ct-organs-threshold"  # a built-in with no weights: loading it is cheap

# A rule whose model the tests never load: with preload set, the rules' models are not loaded.
OTHER_RULE = """
[[rules]]
name = "nodules"
models = ["lung-nodule-demo"]
"""


def _settings(tmp_path: Path, toml: str) -> Settings:
    config = tmp_path / "pacs-ai.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n{toml}')
    return load_settings(config)


# --- the setting ------------------------------------------------------------------------------


def test_preload_comes_from_the_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _settings(tmp_path, "").worker.preload == ()
    settings = _settings(tmp_path, f'[worker]\npreload = ["{MODEL}", "lung-nodule-demo"]\n')
    assert settings.worker.preload == (MODEL, "lung-nodule-demo")
    monkeypatch.setenv("PACS_AI_WORKER__PRELOAD", json.dumps(["lung-nodule-demo"]))
    assert _settings(tmp_path, "").worker.preload == ("lung-nodule-demo",)
    monkeypatch.delenv("PACS_AI_WORKER__PRELOAD")
    with pytest.raises(ConfigError) as bad:
        _settings(tmp_path, '[worker]\npreload = [""]\n')
    assert [key for key, _ in bad.value.problems] == ["worker.preload[0]"]


# --- the warm-up ------------------------------------------------------------------------------


def test_warm_up_loads_exactly_the_preload_models(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings(tmp_path, f'[worker]\npreload = ["{MODEL}", "{MODEL}"]\n{OTHER_RULE}')
    assert warmup.models_to_load(settings) == [MODEL]
    cache = ModelCache("cpu")
    with caplog.at_level(logging.INFO, logger="pacs_ai.pipeline.warmup"):
        warmup.warm_up(settings, cache)
    assert list(cache.loaded) == [MODEL]  # not the rule's lung-nodule-demo
    assert f"models loaded: {MODEL}" in caplog.text
    # The first job finds it loaded: no load in its timings.
    model, _, loading = cache.timed_get(MODEL)
    assert model.manifest.name == MODEL and loading == 0.0


def test_without_preload_the_rules_models_are_loaded(tmp_path: Path) -> None:
    settings = _settings(tmp_path, OTHER_RULE)
    assert warmup.models_to_load(settings) == warmup.rule_models(settings) == ["lung-nodule-demo"]


# --- the check at worker start ----------------------------------------------------------------


def test_an_unknown_preload_model_is_a_config_error_naming_it_and_the_installed_ones(
    tmp_path: Path,
) -> None:
    check_preload(_settings(tmp_path, f'[worker]\npreload = ["{MODEL}"]\n'))
    settings = _settings(tmp_path, f'[worker]\npreload = ["{MODEL}", "ct-organs-thresold"]\n')
    with pytest.raises(ConfigError) as refused:
        check_preload(settings)
    ((key, message),) = refused.value.problems
    assert key == "worker.preload"
    assert "'ct-organs-thresold' is not installed" in message
    assert f"(installed: {', '.join(available())})" in message
    # A delivery-only worker loads no model, so its preload does not matter.
    check_preload(
        _settings(tmp_path, '[worker]\nqueues = ["send"]\npreload = ["ct-organs-thresold"]\n')
    )


def _refused_worker(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``pacs-ai worker ARGS`` run in ``cwd``, which must stop before it reaches a broker."""
    # No broker answers at this URL: the command must stop before it tries one.
    env = without_node_settings(PACS_AI_BROKER__URL="redis://127.0.0.1:9/0")
    return subprocess.run(
        [sys.executable, "-m", "pacs_ai", "worker", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("where", ["option", "file"])
def test_the_worker_command_refuses_to_start_with_an_unknown_model(
    tmp_path: Path, where: str
) -> None:
    (tmp_path / "pacs-ai.toml").write_text(
        '[worker]\nnode_url = "http://127.0.0.1:9"\ntoken = "t"\n'
        + ('preload = ["no-such-model"]\n' if where == "file" else "")
    )
    args = ["--preload", MODEL, "--preload", "no-such-model"] if where == "option" else []
    done = _refused_worker(tmp_path, *args)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "invalid configuration" in done.stderr
    assert "worker.preload: model 'no-such-model' is not installed" in done.stderr
    assert f"(installed: {', '.join(available())})" in done.stderr
    assert f"'{MODEL}'" not in done.stderr  # the installed one passed


def test_the_worker_command_refuses_preload_for_a_delivery_only_worker(tmp_path: Path) -> None:
    done = _refused_worker(tmp_path, "--queues", "send", "--preload", MODEL)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--preload loads models for inference: add infer to --queues" in done.stderr


# --- a remote worker, its first job -----------------------------------------------------------


def test_a_remote_worker_with_preload_runs_its_first_job_without_loading_a_model(
    tmp_path: Path, remote: Remote
) -> None:
    ctx, url, broker = remote.ctx, remote.url, remote.broker
    job_id = remote.job(tmp_path)  # a job of MODEL, the default rule's
    token = remote.token()
    home = tmp_path / "gpu"
    # As a GPU server runs it: no config file, and no rules of its own.
    worker = start_remote_worker(
        home, broker.url, url, token, "--preload", MODEL, env={"PACS_AI_RULES": "[]"}
    )
    log = home / "worker.log"
    try:
        wait_for(
            lambda: worker.poll() is not None or b"warm-up done" in log.read_bytes(),
            120,
            "the worker's warm-up",
        )
        assert worker.poll() is None, log.read_text()
        assert f"models loaded: {MODEL}\n" in log.read_text()
        assert ctx.send_task is not None
        ctx.send_task(INFER_TASK, job_id, "infer", 5)

        def state() -> str:
            row = jobs.job_row(ctx.engine, job_id)
            return row.state if row is not None else ""

        wait_for(lambda: state() == "ENCODED", 120, f"job {job_id} encoded", interval=0.5)
        row = jobs.job_row(ctx.engine, job_id)
        assert row is not None
        timings = json.loads(row.timings)
        assert timings["load"] == 0.0 and timings["inference"] > 0, timings
    finally:
        if worker.poll() is None:
            kill_tree(worker.pid)
        worker.wait()

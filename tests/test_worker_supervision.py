"""How ``pacs-ai serve`` looks after its embedded workers: real ``pacs-ai worker`` processes.

The node runs one worker for inference and one for delivery. A worker that dies is started
again; one that keeps dying young is started later each time;
one that refused its configuration (exit 2) is not started again, since the same file would
be refused the same way twice a second for as long as the node runs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pacs_ai.config import Settings, load_settings
from pacs_ai.errors import ConfigError
from pacs_ai.pipeline import runtime
from pacs_ai.pipeline.runtime import AIRuntime, EmbeddedWorker, embedded_queues

# Nothing answers here: a worker that got as far as the broker would only retry.
UNREACHABLE = "redis://127.0.0.1:9/0"


class Clock:
    """The supervisor's clock, moved by the test: restart delays without waiting for them."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _runtime(tmp_path: Path, config: Path, clock: Clock) -> AIRuntime:
    settings: Settings = load_settings(_write(tmp_path / "node.toml", tmp_path))
    # The engine is not used by the supervisor; the workers read their settings from `config`.
    ai = AIRuntime(settings, None, config, clock=clock)  # type: ignore[arg-type]
    ai.broker_url = UNREACHABLE
    return ai


def _worker(config: Path, clock: Clock) -> EmbeddedWorker:
    return EmbeddedWorker(("infer",), UNREACHABLE, config, clock)


def _write(path: Path, tmp_path: Path, extra: str = "") -> Path:
    path.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n{extra}')
    return path


def test_a_worker_that_refuses_its_configuration_is_not_restarted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The file the node started with, edited since: an AE title longer than 16 characters.
    edited = _write(tmp_path / "edited.toml", tmp_path, 'ae_title = "A_TITLE_TOO_LONG_X"\n')
    with pytest.raises(ConfigError, match=r"node\.ae_title"):
        load_settings(edited)
    clock = Clock()
    worker = _worker(edited, clock)
    worker.start()
    refused = worker.process
    assert refused is not None
    assert refused.wait(60) == runtime.REFUSED
    try:
        with caplog.at_level(logging.INFO, logger="pacs_ai.pipeline.runtime"):
            for _ in range(3):
                worker.supervise()
                clock.now += runtime.MAX_DELAY_S
    finally:
        _stop(worker)
    assert worker.process is refused and worker.refused
    assert caplog.text.count("refused its configuration") == 1
    assert "embedded worker (infer) started" not in caplog.text
    assert "pacs-ai config check" in caplog.text


def test_a_worker_that_keeps_dying_young_is_restarted_later_each_time(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    worker = _worker(_write(tmp_path / "pacs-ai.toml", tmp_path), clock)
    worker.start()
    delays = []
    try:
        for _ in range(3):
            dying = worker.process
            assert dying is not None
            dying.kill()
            dying.wait(60)
            worker.supervise()
            assert worker.process is dying, "restarted before its delay"
            delays.append(worker.restart_delay)
            clock.now += worker.restart_delay - 0.01
            worker.supervise()
            assert worker.process is dying, "restarted before its delay"
            clock.now += 0.01
            worker.supervise()
            assert worker.process is not dying and worker.process is not None
        assert delays == [
            runtime.FIRST_DELAY_S,
            2 * runtime.FIRST_DELAY_S,
            4 * runtime.FIRST_DELAY_S,
        ]

        # A worker that ran for a while before it died is restarted at once, and its next
        # young death starts the delays over.
        clock.now += runtime.STEADY_S
        steady = worker.process
        assert steady is not None
        steady.kill()
        steady.wait(60)
        with caplog.at_level(logging.ERROR, logger="pacs_ai.pipeline.runtime"):
            worker.supervise()
        assert worker.process is not steady and worker.restart_delay == 0
        assert f"(infer) exited with -9 after {runtime.STEADY_S:.0f} s; restarting\n" in caplog.text
        young = worker.process
        assert young is not None
        young.kill()
        young.wait(60)
        worker.supervise()
        assert worker.process is young and worker.restart_delay == runtime.FIRST_DELAY_S
    finally:
        _stop(worker)


def test_inference_and_delivery_get_a_worker_each(tmp_path: Path) -> None:
    assert embedded_queues(("infer", "send")) == [("infer",), ("send",)]
    assert embedded_queues(("send", "infer")) == [("infer",), ("send",)]
    assert embedded_queues(("send",)) == [("send",)]
    assert embedded_queues(("infer",)) == [("infer",)]

    # The node's default: two processes; one that dies is started again, the other untouched.
    clock = Clock()
    ai = _runtime(tmp_path, _write(tmp_path / "pacs-ai.toml", tmp_path), clock)
    assert ai.settings.worker.queues == ("infer", "send")
    ai.start_workers()
    try:
        assert [w.queues for w in ai.workers] == [("infer",), ("send",)]
        infer, send = ai.workers
        assert infer.process is not None and send.process is not None
        assert "--queues infer" in " ".join(map(str, list(infer.process.args)))  # type: ignore[arg-type]
        assert "--queues send" in " ".join(map(str, list(send.process.args)))  # type: ignore[arg-type]
        first_infer, dying = infer.process, send.process
        dying.kill()
        dying.wait(60)
        clock.now += runtime.STEADY_S
        ai.supervise()
        assert send.process is not dying and send.process.poll() is None
        assert infer.process is first_infer and first_infer.poll() is None
    finally:
        for worker in ai.workers:
            _stop(worker)


def _stop(worker: EmbeddedWorker) -> None:
    if worker.process is not None and worker.process.poll() is None:
        worker.process.kill()
        worker.process.wait(60)

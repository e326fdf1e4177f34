"""How ``pacs-ai serve`` looks after its embedded worker: real ``pacs-ai worker`` processes.

A worker that dies is started again; one that keeps dying young is started later each time;
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
from pacs_ai.pipeline.runtime import AIRuntime


class Clock:
    """The supervisor's clock, moved by the test: restart delays without waiting for them."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _runtime(tmp_path: Path, config: Path, clock: Clock) -> AIRuntime:
    settings: Settings = load_settings(_write(tmp_path / "node.toml", tmp_path))
    # The engine is not used by the supervisor; the worker reads its settings from `config`.
    ai = AIRuntime(settings, None, config, clock=clock)  # type: ignore[arg-type]
    # Nothing answers here: a worker that got as far as the broker would only retry.
    ai.broker_url = "redis://127.0.0.1:9/0"
    return ai


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
    ai = _runtime(tmp_path, edited, clock)
    ai._start_worker()
    refused = ai.worker
    assert refused is not None
    assert refused.wait(60) == runtime.REFUSED
    try:
        with caplog.at_level(logging.INFO, logger="pacs_ai.pipeline.runtime"):
            for _ in range(3):
                ai.supervise()
                clock.now += runtime.MAX_DELAY_S
    finally:
        _stop(ai)
    assert ai.worker is refused and ai.refused
    assert caplog.text.count("refused its configuration") == 1
    assert "embedded worker started" not in caplog.text
    assert "pacs-ai config check" in caplog.text


def test_a_worker_that_keeps_dying_young_is_restarted_later_each_time(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    ai = _runtime(tmp_path, _write(tmp_path / "pacs-ai.toml", tmp_path), clock)
    ai._start_worker()
    delays = []
    try:
        for _ in range(3):
            dying = ai.worker
            assert dying is not None
            dying.kill()
            dying.wait(60)
            ai.supervise()
            assert ai.worker is dying, "restarted before its delay"
            delays.append(ai.restart_delay)
            clock.now += ai.restart_delay - 0.01
            ai.supervise()
            assert ai.worker is dying, "restarted before its delay"
            clock.now += 0.01
            ai.supervise()
            assert ai.worker is not dying and ai.worker is not None
        assert delays == [
            runtime.FIRST_DELAY_S,
            2 * runtime.FIRST_DELAY_S,
            4 * runtime.FIRST_DELAY_S,
        ]

        # A worker that ran for a while before it died is restarted at once, and its next
        # young death starts the delays over.
        clock.now += runtime.STEADY_S
        steady = ai.worker
        steady.kill()
        steady.wait(60)
        with caplog.at_level(logging.ERROR, logger="pacs_ai.pipeline.runtime"):
            ai.supervise()
        assert ai.worker is not steady and ai.restart_delay == 0
        assert f"exited with -9 after {runtime.STEADY_S:.0f} s; restarting\n" in caplog.text
        young = ai.worker
        assert young is not None
        young.kill()
        young.wait(60)
        ai.supervise()
        assert ai.worker is young and ai.restart_delay == runtime.FIRST_DELAY_S
    finally:
        _stop(ai)


def _stop(ai: AIRuntime) -> None:
    if ai.worker is not None and ai.worker.poll() is None:
        ai.worker.kill()
        ai.worker.wait(60)

"""stop_process against real child processes."""

from __future__ import annotations

import subprocess
import sys
import time

from pacs_ai.processes import stop_process

IGNORES_SIGTERM = (
    "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('ready', flush=True); time.sleep(60)"
)


def test_a_process_that_stops_on_sigterm_gets_its_own_exit() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    assert stop_process(child, 10) == -15  # ended by SIGTERM, not killed


def test_a_process_ignoring_sigterm_is_killed_after_the_timeout() -> None:
    with subprocess.Popen([sys.executable, "-c", IGNORES_SIGTERM], stdout=subprocess.PIPE) as child:
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        started = time.monotonic()
        assert stop_process(child, 0.5) == -9
    assert 0.5 <= time.monotonic() - started < 10


def test_an_exited_process_is_only_reaped() -> None:
    child = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    child.wait()
    killed: list[int] = []
    assert stop_process(child, 1, kill=lambda p: killed.append(p.pid)) == 3
    assert killed == []

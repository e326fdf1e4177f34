"""Stopping a child process: ask, wait, then insist."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from typing import Any


def stop_process(
    process: subprocess.Popen[Any],
    timeout_s: float,
    kill: Callable[[subprocess.Popen[Any]], None] = subprocess.Popen.kill,
) -> int:
    """SIGTERM ``process``, give it ``timeout_s`` to finish, then ``kill`` it; its exit status.

    A process that has already exited is only reaped. ``kill`` may take a whole process tree
    (Celery's pool processes outlive a SIGKILLed main process).
    """
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            kill(process)
            process.wait()
    return process.returncode

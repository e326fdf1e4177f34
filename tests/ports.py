"""A free loopback port; on its own so that every test helper can import it, including
tests.databases' private PostgreSQL, which tests.peers itself imports."""

from __future__ import annotations

import os
import socket


def free_port() -> int:
    """A loopback port that nothing listens on now.

    Under pytest-xdist (``make test`` runs two workers) the workers draw from one kernel pool,
    and a port that one worker found free could be handed to the other before the first binds
    it. So each worker keeps only its own share of the ports: ``(port >> 1) % workers`` equal
    to its index. Not ``port % workers``: the kernel gives ``bind(0)`` ports of one parity.
    """
    index, workers = _worker_slot()
    for _ in range(1000):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if (port >> 1) % workers == index:
            return port
    raise RuntimeError(f"no free loopback port for test worker {index} of {workers}")


def _worker_slot() -> tuple[int, int]:
    """This pytest-xdist worker's index and the number of workers; (0, 1) without xdist."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if not (name.startswith("gw") and name[2:].isdigit() and count.isdigit()):
        return 0, 1
    return int(name[2:]), max(1, int(count))

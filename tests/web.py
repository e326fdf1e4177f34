"""The HTTP service in-process (FastAPI TestClient) over a real spool and database."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from fastapi.testclient import TestClient

from pacs_ai.config import load_settings
from pacs_ai.node import make_ingest
from pacs_ai.storage import tokens
from pacs_ai.web.app import create_app
from pacs_ai.web.context import WebContext
from pacs_ai.web.server import HttpServer
from tests.databases import node_database
from tests.peers import free_port


@contextmanager
def web_client(
    tmp_path: Path, extra_toml: str = "", database_url: str = ""
) -> Iterator[tuple[TestClient, WebContext]]:
    """A client for a node's HTTP service with its own data dir; no DICOM listener.

    Without ``database_url``, the database is this test run's (tests/databases.py).
    """
    with ExitStack() as stack:
        if not database_url:
            database_url = stack.enter_context(node_database())
        config = tmp_path / "pacs-ai.toml"
        config.write_text(
            "[node]\n"
            f'data_dir = "{tmp_path / "data"}"\n'
            "[storage]\nreserve_mb = 1\n"
            f"[database]\nurl = {database_url!r}\n".replace("'", '"')
            + extra_toml
        )
        settings = load_settings(config)
        ingest = make_ingest(settings, run_migrations=True)
        ctx = WebContext(settings, ingest.engine, ingest)
        try:
            with TestClient(create_app(ctx)) as client:
                yield client, ctx
        finally:
            ingest.close()


def bearer(ctx: WebContext, role: str, name: str = "", peer: str = "") -> dict[str, str]:
    """Authorization headers with a new token of ``role``."""
    token = tokens.create(
        ctx.engine, name or f"t-{role}-{time.monotonic_ns()}", role, time.time(), peer
    )
    return {"Authorization": f"Bearer {token}"}


@contextmanager
def served(ctx: WebContext) -> Iterator[str]:
    """The same app on a real loopback port, as ``pacs-ai serve`` runs it; yields its URL."""
    node = ctx.settings.node.model_copy(update={"http_port": free_port(), "bind": "127.0.0.1"})
    server = HttpServer(
        dataclasses.replace(ctx, settings=ctx.settings.model_copy(update={"node": node}))
    )
    server.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()

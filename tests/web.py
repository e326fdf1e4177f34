"""The HTTP service in-process (FastAPI TestClient) over a real spool and database."""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from fastapi.testclient import TestClient

from pacs_ai.config import load_settings
from pacs_ai.node import make_ingest
from pacs_ai.pipeline.node_client import RemoteLink
from pacs_ai.pipeline.queues import create_app as create_celery_app
from pacs_ai.pipeline.queues import send_item
from pacs_ai.storage import tokens
from pacs_ai.web.app import create_app
from pacs_ai.web.context import WebContext
from pacs_ai.web.server import HttpServer
from tests.databases import node_database
from tests.peers import RedisServer, free_port
from tests.records import plan_jobs, store_chest_ct


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


@dataclasses.dataclass
class Remote:
    """A node's HTTP service on loopback, its context, and the tasks it put on the broker."""

    ctx: WebContext
    url: str
    broker: RedisServer

    @property
    def sent(self) -> list[tuple[str, int, str, int]]:
        """What the node put on its broker: (task, id, queue, priority)."""
        return self.broker.queued()

    def token(self, role: str = "worker") -> str:
        from pacs_ai.storage import tokens

        return tokens.create(self.ctx.engine, f"{role}-{time.monotonic_ns()}", role, time.time())

    def link(self, worker: str, role: str = "worker") -> RemoteLink:
        return RemoteLink(self.url, self.token(role), worker, timeout_s=30)

    def job(self, tmp_path: Path, seed: int = 0) -> int:
        truth = store_chest_ct(self.ctx.ingest, tmp_path / f"ct{seed}", slices=24, seed=seed)
        (job_id, *_) = plan_jobs(self.ctx.engine, truth.study_instance_uid)
        return job_id


@contextmanager
def remote_node(tmp_path: Path) -> Iterator[Remote]:
    """A node's HTTP service on loopback with a real Redis as its broker, for workers that
    share no disk with it."""
    broker = RedisServer().start()
    try:
        with web_client(tmp_path) as (_, ctx):
            app = create_celery_app(ctx.settings, broker.url)
            # What AIRuntime.send_task does, onto a real Redis.
            ctx.send_task = functools.partial(send_item, app)
            try:
                with served(ctx) as url:
                    yield Remote(ctx, url, broker)
            finally:
                app.close()
    finally:
        broker.stop()

"""``pacs-ai status`` shows the broker, the queue depths and the Celery workers, read from a
real redis-server and real ``pacs-ai worker`` processes, locally and over the admin API; and
it answers within its time bound when the broker is down or does not answer."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pacs_ai.admin import LocalAdmin, broker_status, node_broker_url
from pacs_ai.config import load_settings
from pacs_ai.pipeline.queues import INFER_TASK, SEND_TASK, create_app, masked_url
from pacs_ai.processes import stop_process
from pacs_ai.storage.db import open_database
from pacs_ai.web.metrics import NodeCollector
from tests.peers import NodeProcess, RedisServer, free_port, kill_tree, wait_for
from tests.web import web_client


class Workers:
    """``pacs-ai worker`` processes, each in its own process as on a GPU server."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, node: NodeProcess, queues: str) -> subprocess.Popen[bytes]:
        log = (node.workdir / f"worker-{queues}.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "pacs_ai", "worker", "--config", str(node.config),
             "--queues", queues, "--concurrency", "1", "--device", "cpu"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        self.started.append(process)
        return process

    @staticmethod
    def stop(process: subprocess.Popen[bytes]) -> None:
        # Celery's warm shutdown first; its pool processes outlive a killed main process.
        stop_process(process, 20, kill=lambda p: kill_tree(p.pid))


@pytest.fixture
def workers() -> Iterator[Workers]:
    found = Workers()
    yield found
    for process in found.started:
        found.stop(process)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(workdir=tmp_path).start()
    yield server
    server.stop()


def worker_name(process: subprocess.Popen[bytes]) -> str:
    return f"pacs-ai-{process.pid}@{socket.gethostname()}"  # as `pacs-ai worker` names it


def answering(url: str) -> dict[str, Any]:
    return {w["name"]: w for w in broker_status(url)["workers"]}


def once_listed(read: Callable[[], Any], listed: Callable[[Any], bool]) -> Any:
    """``read()`` (a status), again until ``listed`` says it names the workers expected.

    A status gives workers one second to answer. On a CPU shared with other tests (the suite
    runs on two workers) a worker can miss that window once; it answers the next status.
    """
    seen: list[Any] = []

    def done() -> bool:
        seen.append(read())
        return listed(seen[-1])

    wait_for(done, 60, "a status that lists the running workers", interval=0.5)
    return seen[-1]


def names(status: dict[str, Any]) -> set[str]:
    return {w["name"] for w in status["workers"]}


@pytest.mark.slow
def test_status_lists_workers_and_flags_a_queue_nobody_consumes(
    tmp_path: Path, broker: RedisServer, workers: Workers
) -> None:
    node = NodeProcess(tmp_path / "node", extra_toml=f'[broker]\nurl = "{broker.url}"\n')
    # The index exists before the workers' processes open it.
    open_database(load_settings(node.config).database_url).dispose()
    infer = workers.start(node, "infer")
    send = workers.start(node, "send")
    both = {worker_name(infer), worker_name(send)}
    wait_for(lambda: set(answering(broker.url)) == both, 60, "both workers answering")
    # One job id the worker finds nothing to do for: the task still counts as processed.
    celery = create_app(load_settings(node.config))
    celery.send_task(INFER_TASK, args=[424242], queue="infer", priority=5)
    wait_for(
        lambda: answering(broker.url)[worker_name(infer)]["processed"] == 1, 30, "one task done"
    )

    status = once_listed(lambda: node.cli_json("status"), lambda s: names(s) == both)
    assert status["broker"] == {"url": broker.url, "reachable": True, "error": None}
    assert status["queues"] == {"infer": 0, "send": 0}
    assert status["queues_without_worker"] == []
    by_name = {w["name"]: w for w in status["workers"]}
    assert by_name[worker_name(infer)] == {
        "name": worker_name(infer),
        "pid": infer.pid,
        "queues": ["infer"],
        "concurrency": 1,
        "device": "cpu",
        "active": [],
        "processed": 1,
        "uptime_s": by_name[worker_name(infer)]["uptime_s"],
    }
    assert by_name[worker_name(send)]["queues"] == ["send"]
    assert by_name[worker_name(send)]["processed"] == 0

    # The send worker goes; deliveries pile up with nobody to take them.
    Workers.stop(send)
    for delivery_id in (1, 2, 3):
        celery.send_task(SEND_TASK, args=[delivery_id], queue="send", priority=5)
    celery.close()
    wait_for(lambda: set(answering(broker.url)) == {worker_name(infer)}, 10, "send worker gone")
    text = once_listed(lambda: node.cli("status"), lambda t: worker_name(infer) in t.stdout)
    assert text.returncode == 1, text.stderr  # the node's listener is not running here
    assert f"broker {broker.url}: reachable" in text.stdout
    assert "queue infer: 0 waiting\n" in text.stdout
    assert "queue send: 3 waiting, NO WORKER consumes it" in text.stdout
    assert worker_name(infer) in text.stdout and worker_name(send) not in text.stdout
    after = broker_status(broker.url)
    assert after["queues"] == {"infer": 0, "send": 3}
    assert after["queues_without_worker"] == ["send"]
    # /metrics says the same, for an alert on depth > 0 with no consumer.
    (tmp_path / "web").mkdir()
    with web_client(tmp_path / "web") as (_client, ctx):
        ctx.broker_url = broker.url
        registry = CollectorRegistry(auto_describe=False)
        registry.register(NodeCollector(ctx))
        found = {
            (s.name, tuple(s.labels.values())): s.value
            for family in text_string_to_metric_families(generate_latest(registry).decode())
            for s in family.samples
        }
    assert found[("pacs_ai_workers", ())] == 1
    assert found[("pacs_ai_queue_consumers", ("infer",))] == 1
    assert found[("pacs_ai_queue_consumers", ("send",))] == 0
    assert found[("pacs_ai_queue_depth", ("send",))] == 3

    # The broker dies: status still answers, quickly, and says so.
    broker.stop()
    started = time.monotonic()
    down = broker_status(broker.url)
    assert time.monotonic() - started < 2.5
    assert down["broker"]["reachable"] is False and down["broker"]["error"]
    assert (down["queues"], down["workers"]) == (None, [])
    text = node.cli("status")
    assert "broker unreachable" in text.stdout and "Traceback" not in text.stderr


@pytest.mark.slow
def test_remote_status_shows_the_nodes_embedded_broker_and_workers(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "node", ai_worker=True).start()
    try:
        # The CLI on the node's host finds the embedded broker from the data dir alone.
        url = node_broker_url(load_settings(node.config))
        assert url.startswith("redis+socket://")
        wait_for(lambda: len(answering(url)) == 2, 60, "the embedded workers answering")
        token = node.token("admin")
        remote = once_listed(
            lambda: node.cli_json("status", "--url", node.url, "--token", token),
            lambda s: len(s["workers"]) == 2,
        )
        admin = LocalAdmin(load_settings(node.config))
        try:
            # What `pacs-ai status` on the node's host prints.
            local = once_listed(admin.status, lambda s: len(s["workers"]) == 2)
        finally:
            admin.close()
        for status in (remote, local):
            assert status["broker"] == {"url": url, "reachable": True, "error": None}
            assert status["queues"] == {"infer": 0, "send": 0}
            assert status["queues_without_worker"] == []
            # One process infers, one delivers, in threads: neither waits behind the other.
            by_queues = {tuple(w["queues"]): w for w in status["workers"]}
            assert set(by_queues) == {("infer",), ("send",)}
            assert by_queues[("infer",)]["device"] == "auto"
            assert by_queues[("infer",)]["concurrency"] == 1
            assert by_queues[("send",)]["concurrency"] == 4  # [worker] send_concurrency
        assert {w["name"] for w in remote["workers"]} == {w["name"] for w in local["workers"]}
    finally:
        node.stop()


def test_a_broker_that_never_answers_is_reported_within_the_bound(tmp_path: Path) -> None:
    # Accepts connections (the kernel's backlog) but never speaks: only timeouts end a wait.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        started = time.monotonic()
        report = broker_status(url)
        assert time.monotonic() - started < 2.5
    assert report["broker"]["reachable"] is False
    assert (report["queues"], report["workers"]) == (None, [])


def test_status_json_never_shows_the_broker_password(tmp_path: Path) -> None:
    assert masked_url("redis://:s3cret@10.0.0.5:6379/0") == "redis://:***@10.0.0.5:6379/0"
    assert masked_url("rediss://ops:s3cret@redis.example:6380/1?ssl_cert_reqs=required") == (
        "rediss://ops:***@redis.example:6380/1?ssl_cert_reqs=required"
    )
    assert "s3cret" not in masked_url("redis://redis.example/0?password=s3cret")
    assert masked_url("redis+socket:///var/run/redis.sock") == "redis+socket:///var/run/redis.sock"
    assert masked_url("unix:///run/redis.sock?password=s3cret&db=1") == (
        "unix:///run/redis.sock?password=***&db=1"
    )
    # The masked URL is what the status carries, even when the broker is not there.
    report = broker_status(f"redis://:s3cret@127.0.0.1:{free_port()}/0")
    assert "s3cret" not in json.dumps(report)
    assert report["broker"]["url"].startswith("redis://:***@127.0.0.1:")

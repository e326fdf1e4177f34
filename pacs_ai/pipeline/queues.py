"""The Celery application: long GPU tasks on a Redis broker, job ids only in the messages.

Built here, configured from the node's settings, and used both by the node (to enqueue) and
by :mod:`workers.celery_app` (to run the tasks).
"""

from __future__ import annotations

from celery import Celery

from pacs_ai.config import Settings
from pacs_ai.errors import ConfigError

INFER_TASK = "pacs_ai.infer"
SEND_TASK = "pacs_ai.send"
QUEUES = ("infer", "send")
# kombu's Redis transport keeps one list per priority step: "infer" for step 0 and
# "infer<sep><step>" for the others (kombu.transport.redis.Channel._q_for_pri).
PRIORITY_STEPS = tuple(range(10))
PRIORITY_SEP = ":"


def create_app(settings: Settings, broker_url: str | None = None) -> Celery:
    url = broker_url or settings.broker.url
    if not url:
        raise ConfigError(
            [
                (
                    "broker.url",
                    "no broker configured; set it (redis://host:6379/0) or "
                    "PACS_AI_BROKER__URL, or run the worker inside `pacs-ai serve`",
                )
            ]
        )
    limit = settings.worker.task_time_limit_s
    app = Celery("pacs_ai", broker=url, include=["workers.tasks"])
    app.conf.update(
        # A task is acknowledged when it finishes, and given back if its worker dies.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_time_limit=limit,
        task_soft_time_limit=limit * 0.95,
        broker_transport_options={
            # Longer than any task: Redis must never hand a running task to a second worker.
            "visibility_timeout": int(limit * 2 + 600),
            # Priorities 0 (STAT) .. 9 in separate lists, served strictly in order.
            "priority_steps": list(PRIORITY_STEPS),
            "sep": PRIORITY_SEP,
            "queue_order_strategy": "priority",
        },
        # The two queues are created on first use (task_create_missing_queues): "infer" for
        # GPU workers, "send" for I/O, so a slow PACS never holds a GPU.
        task_routes={INFER_TASK: {"queue": "infer"}, SEND_TASK: {"queue": "send"}},
        task_default_queue="infer",
        # CUDA must not be initialised in a forked parent: pool children are spawned.
        worker_pool_start_method="spawn",
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
    )
    return app


def queue_keys(queue: str) -> list[str]:
    """The Redis lists that hold ``queue``'s messages, one per priority step."""
    return [queue] + [f"{queue}{PRIORITY_SEP}{step}" for step in PRIORITY_STEPS if step]


def redis_py_url(broker_url: str) -> str:
    """A kombu broker URL as redis-py spells it (kombu's ``redis+socket://`` is ``unix://``)."""
    return broker_url.replace("redis+socket://", "unix://", 1)


def broker_reachable(broker_url: str, timeout_s: float = 2.0) -> bool:
    """Whether the broker answers a PING (for /readyz)."""
    import redis

    try:
        client = redis.Redis.from_url(
            redis_py_url(broker_url), socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, ValueError):
        return False


def queue_depths(broker_url: str, timeout_s: float = 2.0) -> dict[str, int]:
    """Messages waiting in each queue (all priorities); raises ``redis.RedisError``."""
    import redis

    client = redis.Redis.from_url(
        redis_py_url(broker_url), socket_timeout=timeout_s, socket_connect_timeout=timeout_s
    )
    try:
        with client.pipeline(transaction=False) as pipe:
            for queue in QUEUES:
                for key in queue_keys(queue):
                    pipe.llen(key)
            lengths = iter(pipe.execute())
        return {queue: sum(next(lengths) for _ in queue_keys(queue)) for queue in QUEUES}
    finally:
        client.close()

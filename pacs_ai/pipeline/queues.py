"""The Celery application: long GPU tasks on a Redis broker, job ids only in the messages.

Built here, configured from the node's settings, and used both by the node (to enqueue) and
by :mod:`workers.celery_app` (to run the tasks).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from celery import Celery

from pacs_ai.config import Settings
from pacs_ai.errors import ConfigError

INFER_TASK = "pacs_ai.infer"
SEND_TASK = "pacs_ai.send"
# Read a series during its study's quiet period (pacs_ai.pipeline.prepare); on "infer", so
# that the worker that will run the job reads it.
PREPARE_TASK = "pacs_ai.prepare"
QUEUES = ("infer", "send")
# kombu's Redis transport keeps one list per priority step: "infer" for step 0 and
# "infer<sep><step>" for the others (kombu.transport.redis.Channel._q_for_pri).
PRIORITY_STEPS = tuple(range(10))
PRIORITY_SEP = ":"
# The remote-control command each pacs-ai worker answers with everything `pacs-ai status`
# shows of it, in one round trip (see register_control_commands).
REPORT_COMMAND = "pacs_ai_worker"


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
        # What a worker reports of itself to `pacs-ai status` (REPORT_COMMAND).
        pacs_ai_device=settings.worker.device,
        # The two queues are created on first use (task_create_missing_queues): "infer" for
        # GPU workers, "send" for I/O, so a slow PACS never holds a GPU.
        task_routes={
            INFER_TASK: {"queue": "infer"},
            PREPARE_TASK: {"queue": "infer"},
            SEND_TASK: {"queue": "send"},
        },
        task_default_queue="infer",
        # CUDA must not be initialised in a forked parent: pool children are spawned.
        worker_pool_start_method="spawn",
        # A spawned pool process imports torch and builds its context before it reports up
        # (tasks._warm_up): seconds on a loaded machine, beyond Celery's 4 s default.
        worker_proc_alive_timeout=60,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
    )
    register_control_commands()
    return app


def send_item(app: Celery, task: str, item_id: int, queue: str, priority: int) -> None:
    """Put a job or delivery id on its queue: messages carry ids only, the index the rest."""
    app.send_task(task, args=[item_id], queue=queue, priority=priority)


def register_control_commands() -> None:
    """Teach this process's Celery workers :data:`REPORT_COMMAND` (idempotent).

    Celery keeps remote-control commands in one registry per process; every ``pacs-ai
    worker`` builds its app with :func:`create_app`, so each of them answers it.
    """
    from celery.worker.control import inspect_command

    inspect_command(name=REPORT_COMMAND)(_report_command)


def _report_command(state: Any) -> dict[str, Any]:
    # Celery's own inspect commands (stats, active_queues, active) in one answer, so that
    # `pacs-ai status` needs one round trip; plus the configured device. Runs in the worker's
    # main process between two broker events: nothing slow here (resolving "auto" would
    # import torch; the pool's children do that).
    from celery.worker import control

    return {
        "stats": control.stats(state),
        "active_queues": control.active_queues(state),
        "active": control.active(state),
        "device": state.consumer.app.conf.get("pacs_ai_device"),
    }


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


def masked_url(url: str) -> str:
    """``url`` with its password (in the authority or a ``password=`` parameter) as ``***``."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        credentials, _, host = netloc.rpartition("@")
        user = credentials.split(":", 1)[0]
        netloc = f"{user}:***@{host}"
    query = parts.query
    if "password=" in query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "***" if k == "password" else v) for k, v in pairs], safe="*/")
    masked = urlunsplit(parts._replace(netloc=netloc, query=query))
    if url.startswith(f"{parts.scheme}://") and not masked.startswith(f"{parts.scheme}://"):
        # A socket path (redis+socket:///run/redis.sock): urlunsplit drops the empty "//".
        masked = f"{parts.scheme}://{masked.removeprefix(parts.scheme + ':')}"
    return masked


# --- workers, through Celery's remote control ------------------------------------------------


@dataclass(frozen=True)
class ActiveTask:
    """A task a worker runs now: ``item_id`` is the job's or the delivery's id."""

    task: str
    item_id: int | None
    started_at: float | None  # UNIX seconds on the worker's clock

    def as_json(self) -> dict[str, Any]:
        return {"task": self.task, "id": self.item_id, "started_at": self.started_at}


@dataclass(frozen=True)
class WorkerInfo:
    """One Celery worker as it answered; None where it did not answer that question.

    ``processed`` counts the tasks it has taken since it started (running, done or failed),
    ``concurrency`` its pool's size (processes; threads for a send-only worker), ``device``
    the configured one (``auto`` unresolved).
    """

    name: str
    pid: int | None
    queues: tuple[str, ...] | None
    concurrency: int | None
    device: str | None
    active: tuple[ActiveTask, ...] | None
    processed: int | None
    uptime_s: int | None

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pid": self.pid,
            "queues": None if self.queues is None else list(self.queues),
            "concurrency": self.concurrency,
            "device": self.device,
            "active": None if self.active is None else [t.as_json() for t in self.active],
            "processed": self.processed,
            "uptime_s": self.uptime_s,
        }


def broker_errors() -> tuple[type[Exception], ...]:
    """What talking to an absent or failing broker raises (kombu wraps most of redis-py's)."""
    import redis
    from kombu.exceptions import OperationalError

    return (OperationalError, redis.RedisError, OSError, ValueError)


_T = TypeVar("_T")


def _within(call: Callable[[], _T], timeout_s: float) -> _T:
    """``call()``, or TimeoutError after ``timeout_s``: kombu's broadcast publish retries a
    connection lost mid-call without end, and a status must answer whatever the broker does."""
    box: list[_T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            box.append(call())
        except BaseException as exc:  # handed to the caller's thread as is
            errors.append(exc)

    thread = threading.Thread(target=run, name="worker-report", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if errors:
        raise errors[0]
    if not box:
        raise TimeoutError(f"the broker did not answer within {timeout_s:.0f} s")
    return box[0]


def worker_report(app_or_broker_url: Celery | str, timeout_s: float = 2.0) -> list[WorkerInfo]:
    """The workers that answer on the broker, sorted by name, in about ``timeout_s`` at most
    (TimeoutError a second after that, whatever the broker does).

    One broadcast of :data:`REPORT_COMMAND` waits half the time for every worker's answer
    (nothing says how many there are); a worker that does not know the command (not a
    pacs-ai worker, or an older one) is asked Celery's own inspect commands in what is left.

    Raises one of :func:`broker_errors` when the broker cannot be reached; the broker is
    never retried, so that a status never hangs on it.
    """
    return _within(lambda: _ask_workers(app_or_broker_url, timeout_s), timeout_s + 1.0)


def _ask_workers(app_or_broker_url: Celery | str, timeout_s: float) -> list[WorkerInfo]:
    deadline = time.monotonic() + timeout_s
    # No socket wait may outlast the whole budget (connect, publish, read).
    wait_s = timeout_s / 2
    if isinstance(app_or_broker_url, str):
        # The key separator must be the workers' (create_app's), or their replies are lost.
        url, options = app_or_broker_url, {"sep": PRIORITY_SEP}
    else:
        conf = app_or_broker_url.conf
        url, options = conf.broker_url, dict(conf.broker_transport_options or {})
    # An app of its own, closed here: a caller's app keeps its pools and retry policy.
    app = Celery("pacs_ai_status", broker=url, set_as_current=False)
    app.conf.broker_connection_timeout = wait_s
    app.conf.broker_transport_options = {
        **options,
        "max_retries": 0,
        "socket_connect_timeout": wait_s,
        "socket_timeout": wait_s,
    }

    def ask(command: str, names: list[str] | None, timeout: float) -> dict[str, Any]:
        # A fresh connection per question: kombu remembers the reply queue as declared on a
        # channel, but deletes it after each collection, so a second question on the same
        # channel may publish before the queue exists again and lose the reply.
        with app.connection_for_write() as conn:
            replies = app.control.broadcast(
                command,
                destination=names,
                connection=conn,
                reply=True,
                timeout=timeout,
                limit=len(names) if names else None,
            )
        return {name: answer for reply in replies or [] for name, answer in reply.items()}

    try:
        # Half of what is left once the app is built (imports take a while the first time).
        reports = ask(REPORT_COMMAND, None, max(deadline - time.monotonic(), 0.1) / 2)
        unknown = sorted(name for name, report in reports.items() if _is_error(report))
        for command in ("active_queues", "stats", "active") if unknown else ():
            left = deadline - time.monotonic()
            answers = ask(command, unknown, min(left, wait_s)) if left > 0 else {}
            for name in unknown:
                reports[name] = {**_dict(reports[name]), command: answers.get(name)}
    finally:
        app.close()
    return [_worker_info(name, _dict(reports[name])) for name in sorted(reports)]


def _is_error(answer: Any) -> bool:
    return isinstance(answer, dict) and "error" in answer


def _dict(answer: Any) -> dict[str, Any]:
    return {k: v for k, v in answer.items() if k != "error"} if isinstance(answer, dict) else {}


def _worker_info(name: str, report: dict[str, Any]) -> WorkerInfo:
    # Anything missing or malformed (an answer lost, another version) reads as None.
    stats = _dict(report.get("stats"))
    pool = _dict(stats.get("pool"))
    totals = stats.get("total")
    queues = report.get("active_queues")
    active = report.get("active")
    return WorkerInfo(
        name=name,
        pid=stats.get("pid"),
        queues=tuple(sorted(q["name"] for q in queues)) if isinstance(queues, list) else None,
        concurrency=pool.get("max-concurrency"),
        device=report.get("device"),
        active=tuple(_active_task(t) for t in active) if isinstance(active, list) else None,
        processed=sum(totals.values()) if isinstance(totals, dict) else None,
        uptime_s=stats.get("uptime"),
    )


def _active_task(info: dict[str, Any]) -> ActiveTask:
    args = info.get("args") or []
    item_id = args[0] if isinstance(args, list | tuple) and args else None
    return ActiveTask(
        task=str(info.get("name") or info.get("type") or "?"),
        item_id=item_id if isinstance(item_id, int) else None,
        started_at=info.get("time_start"),
    )
